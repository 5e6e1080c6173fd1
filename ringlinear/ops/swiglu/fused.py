"""Fused SwiGLU forward and backward as single Triton passes in fp32, rounded once: one pass reads g, u (and dh)
and writes h (and dg, du; optionally h too, which the down projection's weight gradient needs). g, u, dg, du may
be strided row views (the two halves of one [M, 2I] buffer), so no concatenation is needed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.swiglu import check_rows

# fixed tile (interpreter-safe), chosen by the sweep in benchmarks/NOTES_kernels.md
CONFIG = {"BM": 4, "BI": 512, "num_warps": 4}


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


def fused_swiglu_forward(g: torch.Tensor, u: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """h = silu(g) * u for [M, I] g, u (row views allowed) -> [M, I] contiguous in `out_dtype` (default g's)."""
    check_rows(g, u)
    M, n_i = g.shape
    h = torch.empty(M, n_i, dtype=out_dtype or g.dtype, device=g.device)
    if M and n_i:
        BM, BI = CONFIG["BM"], CONFIG["BI"]
        _fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(n_i, BI))](g, u, h, M, n_i, g.stride(0), u.stride(0), h.stride(0),
                                                                BM=BM, BI=BI, num_warps=CONFIG["num_warps"])
    return h


def fused_swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                    h: torch.Tensor | None = None) -> None:
    """Writes dg, du (and h, when given) for [M, I] g, u, dh; every tensor may be a row view."""
    M, n_i = g.shape
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
        return fused_swiglu_forward(g2, u2).view(shape)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.reshape(g.shape)
        dh = dh if dh.stride(-1) == 1 else dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        fused_swiglu_backward(g, u, dh, dg, du)
        return dg.view(ctx.shape), du.view(ctx.shape)


def fused_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`naive_swiglu` with the Triton kernels (differentiable)."""
    return _SwiGLU.apply(g, u)
