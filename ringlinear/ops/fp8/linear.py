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

from ringlinear.ops.fp8.gemm import blockwise_scale_b, fp8_gemm_blockwise
from ringlinear.ops.fp8.kernels import (
    quantize_blocks,
    quantize_rows,
    quantize_rows_cat,
    quantize_transpose,
    rmsnorm_quantize,
    swiglu_quantize,
    swiglu_quantize_rows,
)
from ringlinear.ops.swiglu import swiglu_backward


def _pad_rows(x: torch.Tensor, multiple: int = 128) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def quantize_activation(x: torch.Tensor, pre: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (x8 [Mp, K], sx [Mp, K/128]) 1x128, rows padded to a multiple of 128 (the GEMMs' operand);
    `pre`: that quantization already made (by the RMSNorm before the projection: `Fp8RMSNormFn`), used as is."""
    if pre is not None:
        return pre
    return quantize_transpose(_pad_rows(x.to(torch.bfloat16)), transpose=False)


class Fp8RMSNormFn(torch.autograd.Function):
    """h = rmsnorm(x) * w, x: [M, H] (H % 128 == 0, H <= 8192), and from the same pass over x its 1x128 FP8
    quantization (x8 [Mp, H], sx [Mp, H/128], rows padded to a multiple of 128: `quantize_activation`'s layout)
    for the FP8 projections that read h (`rmsnorm_quantize`). The quantization is returned without gradient; the
    backward is the RMSNorm's own (the fused kernel, from the saved 1/rms)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        M = x.shape[0]
        x8, sx, h, rstd = rmsnorm_quantize(_pad_rows(x), weight, eps, emit_norm=True)
        ctx.save_for_backward(x, weight, rstd[:M])
        ctx.mark_non_differentiable(x8, sx)
        return h[:M], x8, sx

    @staticmethod
    def backward(ctx, dh, _dx8, _dsx):
        from ringlinear.ops.rmsnorm.fused import rmsnorm_backward

        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(x.contiguous(), weight, rstd, dh)
        return dx, dw, None


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `Fp8LinearFn` needs of a weight w: [N, K]: (w8 [N, K], w8^T [K, N]) e4m3 with their 128x128 block
    scales already in the GEMM's layout (`blockwise_scale_b`), for the forward and the input-gradient GEMM."""
    with torch.no_grad():
        w8, sw, w8t = quantize_blocks(w.detach(), transpose=True)
        return w8, blockwise_scale_b(sw), w8t, blockwise_scale_b(sw.t())


class Fp8LinearFn(torch.autograd.Function):
    """x: [M, K] bf16, w: [N, K] (K, N % 128 == 0) with its `quantize_weight_blocks` -> [M, N] bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w8, sw, w8t, swt, pre=None):
        M = x.shape[0]
        x8, sx = quantize_activation(x, pre)
        ctx.save_for_backward(x, w8t, swt)
        ctx.w_dtype = w.dtype
        return fp8_gemm_blockwise(x8, sx, w8, sw, sb_prepared=True)[:M]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w8t, swt = ctx.saved_tensors
        M = dy.shape[0]
        dy = dy.to(torch.bfloat16).contiguous()
        dy8, sdy = quantize_transpose(_pad_rows(dy), transpose=False)
        dx = fp8_gemm_blockwise(dy8, sdy, w8t, swt, sb_prepared=True)[:M]
        dw = (dy.t() @ x.to(torch.bfloat16)).to(ctx.w_dtype)
        return dx.to(x.dtype), dw, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               wq: tuple[torch.Tensor, ...] | None = None,
               pre: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] through `Fp8LinearFn`; `wq`: the weight's `quantize_weight_blocks` if known; `pre`:
    x's own quantization if already made (`quantize_activation`)."""
    wq = wq if wq is not None else quantize_weight_blocks(weight)
    y = Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, *wq, pre).view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def _swiglu_grads(gu: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the gate+up GEMM output gu = [g | u] ([M, 2I]) and dL/dh ([M, I]) of h = silu(g) * u, one fused pass:
    (h [M, I], [dL/dg | dL/du] [M, 2I]), bf16."""
    M, n_i = dh.shape
    h = torch.empty(M, n_i, dtype=torch.bfloat16, device=dh.device)
    dgu = torch.empty(M, 2 * n_i, dtype=torch.bfloat16, device=dh.device)
    swiglu_backward(gu[:, :n_i], gu[:, n_i:], dh, dgu[:, :n_i], dgu[:, n_i:], h)
    return h, dgu


def quantize_swiglu_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`quantize_weight_blocks` of [gate; up] ([2I, H], one GEMM for both) and of down ([H, I]), for `Fp8SwiGLUFn`."""
    with torch.no_grad():
        return (*quantize_weight_blocks(torch.cat([w_gate.detach(), w_up.detach()])), *quantize_weight_blocks(w_down))


class Fp8SwiGLUFn(torch.autograd.Function):
    """y = (silu(x Wg^T) * (x Wu^T)) Wd^T. x: [M, H] bf16; w_gate, w_up: [I, H]; w_down: [H, I] (H, I % 128 == 0)
    with their `quantize_swiglu_weights` (and `pre`: x's quantization if already made) -> [M, H]. Forward: x
    quantized once (1x128) for one FP8 GEMM against
    [gate; up], SwiGLU + quantize in one Triton pass, FP8 down GEMM. Backward: both input-gradient GEMMs FP8,
    the weight gradients BF16 (as `Fp8LinearFn`)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, w13_8, s13, w13_8t, s13t, w2_8, s2, w2_8t, s2t, pre=None):
        M, n_i = x.shape[0], w_gate.shape[0]
        xb = x.to(torch.bfloat16)
        x8, sx = quantize_activation(xb, pre)
        gu = fp8_gemm_blockwise(x8, sx, w13_8, s13, sb_prepared=True)  # [Mp, 2I]
        h8, sh = swiglu_quantize(gu[:, :n_i], gu[:, n_i:])
        y = fp8_gemm_blockwise(h8, sh, w2_8, s2, sb_prepared=True)[:M]
        ctx.save_for_backward(xb, gu, w13_8t, s13t, w2_8t, s2t)
        ctx.dtypes = (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xb, gu, w13_8t, s13t, w2_8t, s2t = ctx.saved_tensors
        x_dt, g_dt, u_dt, d_dt = ctx.dtypes
        bf = torch.bfloat16
        M, n_i = dy.shape[0], gu.shape[1] // 2
        dy = dy.to(bf).contiguous()
        dy8, sdy = quantize_transpose(_pad_rows(dy), transpose=False)
        dh = fp8_gemm_blockwise(dy8, sdy, w2_8t, s2t, sb_prepared=True)  # [Mp, I]
        h, dgu = _swiglu_grads(gu, dh)  # dgu: [Mp, 2I]
        dw_down = dy.t() @ h[:M]  # [H, I]
        dgu8, sdgu = quantize_transpose(dgu, transpose=False)
        dx = fp8_gemm_blockwise(dgu8, sdgu, w13_8t, s13t, sb_prepared=True)[:M]
        dw13 = dgu[:M].t() @ xb  # [2I, H]
        return (dx.to(x_dt), dw13[:n_i].to(g_dt), dw13[n_i:].to(u_dt), dw_down.to(d_dt),
                None, None, None, None, None, None, None, None, None)


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
    def forward(ctx, xs, xs8, sxs, w_gate, w_up, w_down, offs, w13_8, s13, w2_8, s2, gemm):
        # gemm: the FP8 grouped GEMM, `fp8_grouped_gemm_rowwise` (torch's) or `fused_fp8_grouped_gemm` (ours)
        gu = gemm(xs8, sxs, w13_8, s13, offs)  # [Tk, 2I]
        h8, sh = swiglu_quantize_rows(gu)
        y = gemm(h8, sh, w2_8, s2, offs)
        ctx.save_for_backward(xs, gu, w_gate, w_up, w_down, offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, gu, wg, wu, wd, offs = ctx.saved_tensors
        bf = torch.bfloat16
        dy = dy.to(bf).contiguous()
        dh = torch._grouped_mm(dy, wd.to(bf), offs=offs)  # [Tk, H] x [E, H, I] -> [Tk, I]
        n_i = dh.shape[1]
        h, dg, du = (torch.empty_like(dh, dtype=bf) for _ in range(3))
        swiglu_backward(gu[:, :n_i], gu[:, n_i:], dh, dg, du, h)  # one fused pass, bf16 out
        dwd = torch._grouped_mm(dy.t(), h, offs=offs)  # [H, Tk] x [Tk, I] -> [E, H, I]
        xsb = xs.to(bf)
        dwg = torch._grouped_mm(dg.t(), xsb, offs=offs)  # [E, I, H]
        dwu = torch._grouped_mm(du.t(), xsb, offs=offs)
        dxs = torch._grouped_mm(dg, wg.to(bf), offs=offs) + torch._grouped_mm(du, wu.to(bf), offs=offs)
        return (dxs.to(xs.dtype), None, None, dwg.to(wg.dtype), dwu.to(wu.dtype), dwd.to(wd.dtype),
                None, None, None, None, None, None)
