"""MoE token dispatch and combine around the grouped expert GEMMs, as gathers (no scatters, no atomics).

Tokens are sorted by expert: `order` ([T*k] int64) lists the flat choice indices `t*k + j` in expert order
and `inv` is its inverse (`inv[order] = arange`), so choice `t*k + j` sits at sorted row `inv[t*k + j]`.

- dispatch: `xs = x[order // k]` (a row gather). Its backward sums each token's k row gradients:
  `dx[t] = sum_j dxs[inv[t*k + j]]`, one read of dxs in a fixed order (PyTorch's index backward is an
  accumulating `index_put_`, which sorts the indices and adds in x's dtype).
- combine: `y[t] = sum_j w[t, j] * ys[inv[t*k + j]]` in fp32, one rounding to the output dtype. PyTorch's
  sequence (`out[order] = ys`, `.float()`, `* w`, `.sum(1)`, `.to`) writes the [T*k, H] rows three more times,
  twice in fp32; its backward as many again. Backward here: `dys[inv[t*k+j]] = w[t, j] * dy[t]` and
  `dw[t, j] = dy[t] . ys[inv[t*k+j]]`, one pass.

References: `moe_dispatch_ref`, `moe_combine_ref` (the PyTorch sequences, autograd through them).
`moe_dispatch` / `moe_combine` take the Triton path on CUDA (or with `RINGLINEAR_BACKEND=triton`, which runs
the kernels in Triton's interpreter on the CPU), the references elsewhere. Every token is computed by one
program in a fixed order: deterministic and independent of the batch it is in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sort_by_expert(topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, k] -> (order, inv), both [T*k] int64: a stable sort of the choices by expert and its inverse."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return order, inv


def moe_dispatch_ref(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return x[order // k]


def moe_combine_ref(ys: torch.Tensor, order: torch.Tensor, weight: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    T, k = weight.shape
    out = torch.empty_like(ys)
    out[order] = ys
    out = (out.view(T, k, ys.shape[1]).float() * weight.float()[..., None]).sum(1)
    return out.to(out_dtype or ys.dtype)


def _block_h(H: int) -> int:
    return min(1024, triton.next_power_of_2(H))


@triton.jit
def _gather_sum_kernel(src_ptr, inv_ptr, w_ptr, out_ptr, H, K: tl.constexpr, HAS_W: tl.constexpr,
                       BH: tl.constexpr):
    # out[t, h-block] = sum_j (w[t, j] *) src[inv[t*K + j], h-block], fp32, j in order
    t = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    m = rh < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(inv_ptr + t * K + j).to(tl.int64)
        v = tl.load(src_ptr + p * H + rh, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * H + rh, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd_kernel(dy_ptr, ys_ptr, inv_ptr, w_ptr, dys_ptr, dw_ptr, H: tl.constexpr, K: tl.constexpr,
                        BH: tl.constexpr):
    # dys[inv[t*K + j]] = w[t, j] * dy[t];  dw[t, j] = dy[t] . ys[inv[t*K + j]]
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        p = tl.load(inv_ptr + t * K + j).to(tl.int64)
        wj = tl.load(w_ptr + t * K + j).to(tl.float32)
        dot = tl.zeros([BH], dtype=tl.float32)
        for h0 in range(0, H, BH):
            rh = h0 + tl.arange(0, BH)
            m = rh < H
            g = tl.load(dy_ptr + t * H + rh, mask=m, other=0.0).to(tl.float32)
            y = tl.load(ys_ptr + p * H + rh, mask=m, other=0.0).to(tl.float32)
            tl.store(dys_ptr + p * H + rh, (wj * g).to(dys_ptr.dtype.element_ty), mask=m)
            dot += g * y
        tl.store(dw_ptr + t * K + j, tl.sum(dot, axis=0).to(dw_ptr.dtype.element_ty))


def _gather_sum(src: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor | None, T: int, k: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    H = src.shape[1]
    out = torch.empty(T, H, dtype=out_dtype, device=src.device)
    if T and H:
        BH = _block_h(H)
        w = weight if weight is not None else inv  # unused when HAS_W is off
        _gather_sum_kernel[(T, triton.cdiv(H, BH))](src, inv, w, out, H, K=k, HAS_W=weight is not None, BH=BH,
                                                    num_warps=4)
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inv, k):
        ctx.save_for_backward(inv)
        ctx.k, ctx.T = k, x.shape[0]
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        return _gather_sum(dxs.contiguous(), inv, None, ctx.T, ctx.k, dxs.dtype), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, inv, weight, out_dtype):
        T, k = weight.shape
        ys, weight = ys.contiguous(), weight.contiguous()
        ctx.save_for_backward(ys, inv, weight)
        return _gather_sum(ys, inv, weight, T, k, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        ys, inv, weight = ctx.saved_tensors
        T, k = weight.shape
        H = ys.shape[1]
        dys = torch.empty_like(ys)
        dw = torch.empty_like(weight)
        if T and H:
            BH = _block_h(H)
            _combine_bwd_kernel[(T,)](dy.contiguous(), ys, inv, weight, dys, dw, H, K=k, BH=BH, num_warps=4)
        elif T:
            dw.zero_()
        return dys, None, dw, None


def _use_triton(x: torch.Tensor) -> bool:
    from ringlinear.ops.lightning import backend_for

    return backend_for(x) == "triton"


def _check(order: torch.Tensor, inv: torch.Tensor, rows: int, what: str) -> None:
    if order.shape != (rows,) or inv.shape != (rows,):
        raise ValueError(f"{what}: order and inv must be [T*k] = [{rows}], got {tuple(order.shape)} and "
                         f"{tuple(inv.shape)}")


def moe_dispatch(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, H] -> xs [T*k, H], row i = x[order[i] // k] (tokens in expert order)."""
    _check(order, inv, x.shape[0] * k, "moe_dispatch")
    if not _use_triton(x):
        return moe_dispatch_ref(x, order, k)
    return _Dispatch.apply(x.contiguous(), order, inv, k)


def moe_combine(ys: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ys [T*k, H] (expert order), weight [T, k] -> [T, H]: each token's k expert outputs, weighted, summed in
    fp32 and rounded once to `out_dtype` (default ys's dtype)."""
    if ys.dim() != 2 or weight.dim() != 2 or ys.shape[0] != weight.numel():
        raise ValueError(f"moe_combine: need ys [T*k, H] and weight [T, k], got {tuple(ys.shape)} and "
                         f"{tuple(weight.shape)}")
    _check(order, inv, ys.shape[0], "moe_combine")
    if not _use_triton(ys):
        return moe_combine_ref(ys, order, weight, out_dtype)
    return _Combine.apply(ys, inv, weight, out_dtype or ys.dtype)
