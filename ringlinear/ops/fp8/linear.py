"""FP8 linear layers for training (DeepSeek-V3 §3.3): y = x W^T with x quantized per 1x128 tile and W per
128x128 block (fp32 accumulation); backward: dX = dY W in FP8 (dY 1x128, W^T's blocks are W's blocks
transposed), dW = dY^T X in BF16 (the weight gradient is the most precision-sensitive GEMM).
MoE experts: per-row scales through `torch._scaled_grouped_mm` for the gate+up GEMM (one GEMM over the two
weights, quantized into one buffer) and the down GEMM (its input from the fused SwiGLU + quantize kernel);
backward in BF16. Weight quantizations are arguments, so callers can reuse them while the weights are
unchanged (gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringlinear.ops.fp8.gemm import fp8_gemm_blockwise, fp8_grouped_gemm_rowwise
from ringlinear.ops.fp8.kernels import (
    quantize_blocks,
    quantize_rows,
    quantize_rows_cat,
    quantize_transpose,
    swiglu_quantize_rows,
)


def _pad_rows(x: torch.Tensor, multiple: int = 128) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w8 [N, K], scale [N/128, K/128], w8^T [K, N]) for `Fp8LinearFn`."""
    with torch.no_grad():
        return quantize_blocks(w.detach(), transpose=True)


class Fp8LinearFn(torch.autograd.Function):
    """x: [M, K] bf16, w: [N, K] (K, N % 128 == 0) with its quantization (w8, sw, w8t) -> [M, N] bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, w8t: torch.Tensor):
        M = x.shape[0]
        x8, sx = quantize_transpose(_pad_rows(x.to(torch.bfloat16)), transpose=False)
        ctx.save_for_backward(x, w8t, sw)
        ctx.w_dtype = w.dtype
        return fp8_gemm_blockwise(x8, sx, w8, sw)[:M]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w8t, sw = ctx.saved_tensors
        M = dy.shape[0]
        dy = dy.to(torch.bfloat16).contiguous()
        dy8, sdy = quantize_transpose(_pad_rows(dy), transpose=False)
        dx = fp8_gemm_blockwise(dy8, sdy, w8t, sw.t())[:M]
        dw = (dy.t() @ x.to(torch.bfloat16)).to(ctx.w_dtype)
        return dx.to(x.dtype), dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               wq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] through `Fp8LinearFn`; `wq`: the weight's `quantize_weight_blocks` if known."""
    wq = wq if wq is not None else quantize_weight_blocks(weight)
    y = Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, *wq).view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


class Fp8GroupedLinearFn(torch.autograd.Function):
    """xs: [T, K] bf16 (tokens sorted by expert), w: [E, N, K], offs: [E] int32 -> [T, N] bf16."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        E, N, K = w.shape
        x8, sx = quantize_rows(xs.to(torch.bfloat16))
        w8, sw = quantize_rows(w.detach().reshape(E * N, K))
        ctx.save_for_backward(xs, w, offs)
        return fp8_grouped_gemm_rowwise(x8, sx, w8.view(E, N, K), sw.view(E, N), offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xs, w, offs = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        wb = w.to(torch.bfloat16)
        dx = torch._grouped_mm(dy, wb, offs=offs)  # [T, N] x [E, N, K] -> [T, K]
        dw = torch._grouped_mm(dy.t(), xs.to(torch.bfloat16), offs=offs)  # [N, T] x [T, K] -> [E, N, K]
        return dx.to(xs.dtype), dw.to(w.dtype), None


def quantize_expert_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """Per-row FP8 of the stacked expert weights for `Fp8ExpertsFn`: ([gate; up] as [E, 2I, H] e4m3 and its
    [E, 2I] scales, down [E, H, I] e4m3 and [E, H] scales)."""
    with torch.no_grad():
        w13 = quantize_rows_cat([w_gate.detach(), w_up.detach()])
        E, H, n_i = w_down.shape
        w2, s2 = quantize_rows(w_down.detach().reshape(E * H, n_i))
        return (*w13, w2.view(E, H, n_i), s2.view(E, H))


class Fp8ExpertsFn(torch.autograd.Function):
    """Routed SwiGLU experts over tokens sorted by expert: y = (silu(xs Wg^T) * (xs Wu^T)) Wd^T per expert.
    xs: [Tk, H] bf16 with its per-row FP8 (xs8, sxs); w_gate, w_up: [E, I, H]; w_down: [E, H, I]; offs: [E]
    int32 cumulative counts; wq: `quantize_expert_weights(...)` -> [Tk, H] bf16. Forward FP8, backward BF16."""

    @staticmethod
    def forward(ctx, xs, xs8, sxs, w_gate, w_up, w_down, offs, w13_8, s13, w2_8, s2):
        gu = fp8_grouped_gemm_rowwise(xs8, sxs, w13_8, s13, offs)  # [Tk, 2I]
        h8, sh = swiglu_quantize_rows(gu)
        y = fp8_grouped_gemm_rowwise(h8, sh, w2_8, s2, offs)
        ctx.save_for_backward(xs, gu, w_gate, w_up, w_down, offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, gu, wg, wu, wd, offs = ctx.saved_tensors
        bf = torch.bfloat16
        n_i = wg.shape[1]
        dy = dy.to(bf).contiguous()
        g, u = gu[:, :n_i].float(), gu[:, n_i:].float()
        sig = torch.sigmoid(g)
        silu = g * sig
        dwd = torch._grouped_mm(dy.t(), (silu * u).to(bf), offs=offs)  # [H, Tk] x [Tk, I] -> [E, H, I]
        dh = torch._grouped_mm(dy, wd.to(bf), offs=offs).float()  # [Tk, H] x [E, H, I] -> [Tk, I]
        dg = (dh * u * sig * (1 + g * (1 - sig))).to(bf)
        du = (dh * silu).to(bf)
        xsb = xs.to(bf)
        dwg = torch._grouped_mm(dg.t(), xsb, offs=offs)  # [E, I, H]
        dwu = torch._grouped_mm(du.t(), xsb, offs=offs)
        dxs = torch._grouped_mm(dg, wg.to(bf), offs=offs) + torch._grouped_mm(du, wu.to(bf), offs=offs)
        return (dxs.to(xs.dtype), None, None, dwg.to(wg.dtype), dwu.to(wu.dtype), dwd.to(wd.dtype),
                None, None, None, None, None)
