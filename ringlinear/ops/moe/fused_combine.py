"""Triton gathers of MoE dispatch and combine (forward and backward, one program per token, fixed order): the
fast paths of `ringlinear.ops.moe.combine`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


class FusedDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inv, k):
        ctx.save_for_backward(inv)
        ctx.k, ctx.T = k, x.shape[0]
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        return _gather_sum(dxs.contiguous(), inv, None, ctx.T, ctx.k, dxs.dtype), None, None, None


class FusedCombine(torch.autograd.Function):
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
