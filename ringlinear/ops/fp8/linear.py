"""FP8 linear layers for training (DeepSeek-V3 §3.3): y = x W^T with x quantized per 1x128 tile and W per
128x128 block (fp32 accumulation); backward: dX = dY W in FP8 (dY 1x128, W^T's blocks are W's blocks
transposed), dW = dY^T X in BF16 (the weight gradient is the most precision-sensitive GEMM).
Grouped variant for MoE experts: per-row scales through `torch._scaled_grouped_mm`, backward in BF16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringlinear.ops.fp8.gemm import fp8_gemm_blockwise, fp8_grouped_gemm_rowwise
from ringlinear.ops.fp8.kernels import quantize_transpose
from ringlinear.ops.fp8.quant import quantize_128x128, quantize_rowwise


def _pad_rows(x: torch.Tensor, multiple: int = 128) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


class Fp8LinearFn(torch.autograd.Function):
    """x: [M, K] bf16, w: [N, K] (K, N % 128 == 0) -> [M, N] bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        x8, sx = quantize_transpose(_pad_rows(x.to(torch.bfloat16)), transpose=False)
        w8, sw = quantize_128x128(w)
        ctx.save_for_backward(x, w8, sw)
        ctx.w_dtype = w.dtype
        return fp8_gemm_blockwise(x8, sx, w8, sw)[:M]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w8, sw = ctx.saved_tensors
        M = dy.shape[0]
        dy = dy.to(torch.bfloat16).contiguous()
        dy8, sdy = quantize_transpose(_pad_rows(dy), transpose=False)
        dx = fp8_gemm_blockwise(dy8, sdy, w8.t().contiguous(), sw.t())[:M]
        dw = (dy.t() @ x.to(torch.bfloat16)).to(ctx.w_dtype)
        return dx.to(x.dtype), dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] through `Fp8LinearFn`."""
    y = Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


class Fp8GroupedLinearFn(torch.autograd.Function):
    """xs: [T, K] bf16 (tokens sorted by expert), w: [E, N, K], offs: [E] int32 -> [T, N] bf16."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        E, N, K = w.shape
        x8, sx = quantize_rowwise(xs)
        w8, sw = quantize_rowwise(w.reshape(E * N, K))
        ctx.save_for_backward(xs, w, offs)
        return fp8_grouped_gemm_rowwise(x8, sx.view(-1), w8.view(E, N, K), sw.view(E, N), offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xs, w, offs = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        wb = w.to(torch.bfloat16)
        dx = torch._grouped_mm(dy, wb, offs=offs)  # [T, N] x [E, N, K] -> [T, K]
        dw = torch._grouped_mm(dy.t(), xs.to(torch.bfloat16), offs=offs)  # [N, T] x [T, K] -> [E, N, K]
        return dx.to(xs.dtype), dw.to(w.dtype), None
