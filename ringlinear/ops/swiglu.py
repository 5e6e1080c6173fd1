"""SwiGLU activation `h = silu(g) * u` forward and backward as single Triton passes, in fp32, rounded once.

Backward: `dg = dh * u * s * (1 + g * (1 - s))`, `du = dh * silu(g)` with `s = sigmoid(g)`. PyTorch's
autograd through `F.silu(g) * u` runs four kernels forward and backward (and the FP8 recipes' fp32
`_swiglu_backward` eight, plus casts and a concatenation); here one pass reads g, u (and dh) and writes h
(and dg, du; optionally h too, which the down projection's weight gradient needs). g, u, dg, du may be
strided row views (the two halves of one [M, 2I] buffer), so no concatenation is needed.

Reference: `swiglu_ref` (PyTorch autograd), `swiglu_backward_ref`. `swiglu` takes the Triton path on CUDA
(or with `RINGLINEAR_BACKEND=triton`: the interpreter on the CPU), the reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# fixed tile (interpreter-safe). H100 sweep (2026-11-24, [65536, 512] and [8192, 5120] bf16): 4 x 512, 4 warps
# runs at ~2.8 TB/s forward and backward; 16 x 128 at a third of that, 32 x 512 spills in the backward.
CONFIG = {"BM": 4, "BI": 512, "num_warps": 4}


def swiglu_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_backward_ref(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """(h, dg, du) in fp32."""
    g, u, dh = g.float(), u.float(), dh.float()
    s = torch.sigmoid(g)
    silu = g * s
    return silu * u, dh * u * s * (1 + g * (1 - s)), dh * silu


@triton.jit
def _fwd_kernel(g_ptr, u_ptr, h_ptr, M, n_i, sg, su, sh, BM: tl.constexpr, BI: tl.constexpr):
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (rm[:, None] < M) & (ri[None, :] < n_i)
    g = tl.load(g_ptr + rm[:, None] * sg + ri[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rm[:, None] * su + ri[None, :], mask=m, other=0.0).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + rm[:, None] * sh + ri[None, :], h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(g_ptr, u_ptr, dh_ptr, h_ptr, dg_ptr, du_ptr, M, n_i, sg, su, sdh, sh, sdg, sdu,
                STORE_H: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr):
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (rm[:, None] < M) & (ri[None, :] < n_i)
    g = tl.load(g_ptr + rm[:, None] * sg + ri[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rm[:, None] * su + ri[None, :], mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rm[:, None] * sdh + ri[None, :], mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    tl.store(dg_ptr + rm[:, None] * sdg + ri[None, :], (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty),
             mask=m)
    tl.store(du_ptr + rm[:, None] * sdu + ri[None, :], (dh * silu).to(du_ptr.dtype.element_ty), mask=m)
    if STORE_H:
        tl.store(h_ptr + rm[:, None] * sh + ri[None, :], (silu * u).to(h_ptr.dtype.element_ty), mask=m)


def _rows(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape or t.stride(1) != 1:
            raise ValueError(f"swiglu: need [M, I] tensors of one shape with unit column stride, got "
                             f"{[(tuple(x.shape), x.stride()) for x in ts]}")


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """h = silu(g) * u for [M, I] g, u (row views allowed) -> [M, I] contiguous in `out_dtype` (default g's)."""
    _rows(g, u)
    M, n_i = g.shape
    h = torch.empty(M, n_i, dtype=out_dtype or g.dtype, device=g.device)
    if M and n_i:
        BM, BI = CONFIG["BM"], CONFIG["BI"]
        _fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(n_i, BI))](g, u, h, M, n_i, g.stride(0), u.stride(0), h.stride(0),
                                                                BM=BM, BI=BI, num_warps=CONFIG["num_warps"])
    return h


def swiglu_backward_torch(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                          h: torch.Tensor | None = None) -> None:
    """`swiglu_backward`'s outputs from the PyTorch reference (fp32, copied into dg, du and h)."""
    for out, val in zip((h, dg, du), swiglu_backward_ref(g, u, dh)):
        if out is not None:
            out.copy_(val)


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                    h: torch.Tensor | None = None) -> None:
    """Writes dg, du (and h, when given) for [M, I] g, u, dh; every tensor may be a row view. Fused on CUDA,
    `swiglu_backward_ref` elsewhere."""
    from ringlinear.ops.lightning import backend_for

    _rows(*(t for t in (g, u, dh, dg, du, h) if t is not None))
    M, n_i = g.shape
    if backend_for(g) != "triton":
        swiglu_backward_torch(g, u, dh, dg, du, h)
        return
    if M and n_i:
        hh = h if h is not None else dg
        BM, BI = CONFIG["BM"], CONFIG["BI"]
        _bwd_kernel[(triton.cdiv(M, BM), triton.cdiv(n_i, BI))](
            g, u, dh, hh, dg, du, M, n_i, g.stride(0), u.stride(0), dh.stride(0), hh.stride(0), dg.stride(0),
            du.stride(0), STORE_H=h is not None, BM=BM, BI=BI, num_warps=CONFIG["num_warps"])


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        shape = g.shape
        g2, u2 = g.reshape(-1, shape[-1]), u.reshape(-1, shape[-1])
        g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
        u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
        ctx.save_for_backward(g2, u2)
        ctx.shape = shape
        return swiglu_forward(g2, u2).view(shape)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.reshape(g.shape)
        dh = dh if dh.stride(-1) == 1 else dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        swiglu_backward(g, u, dh, dg, du)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (same shapes and dtype), differentiable; fused on CUDA, `swiglu_ref` elsewhere."""
    from ringlinear.ops.lightning import backend_for

    if g.shape != u.shape or g.dtype != u.dtype:  # checked on both paths (the reference would broadcast)
        raise ValueError(f"swiglu: g and u must match, got {tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype}")
    if backend_for(g) != "triton":
        return swiglu_ref(g, u)
    return _SwiGLU.apply(g, u)
