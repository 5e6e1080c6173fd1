"""Routed SwiGLU experts: y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tj.

Tokens are sorted by expert (stable), each expert runs one GEMM over its tokens (`torch._grouped_mm`
on CUDA when available, a loop elsewhere), and results are summed over the k choices in a fixed order,
so the output is deterministic and batch-invariant per token.

FP8 weights (`w_scales`, e4m3 with 128x128 block scales): the expert GEMMs read them as they are
(`ringlinear.ops.fp8.inference.w8a16_grouped`), the reference loop dequantizes each expert it runs.
Expert parallel (`expert_offset`): the weights hold experts [offset, offset + E); choices of other experts are
sorted last and add nothing, so the output is this rank's part of the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringlinear.ops.backend import use_triton
from ringlinear.ops.fp8.naive import dequantize_blockwise
from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert
from ringlinear.ops.swiglu import swiglu


def expert_counts(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert, [E] int64. A scatter-add rather than `torch.bincount`, which reads the largest index
    back to the host on CUDA (a stream sync in every MoE layer)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=flat_idx.device).scatter_add_(
        0, flat_idx, torch.ones_like(flat_idx))


def _expert_loop(xs, counts, w_gate, w_up, w_down, w_scales=None):
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            xe = xs[start : start + n]
            wg, wu, wd = w_gate[e], w_up[e], w_down[e]
            if w_scales is not None:
                wg, wu, wd = (dequantize_blockwise(w, sc[e]).to(xs.dtype) for w, sc in zip((wg, wu, wd), w_scales))
            outs.append(F.linear(swiglu(F.linear(xe, wg), F.linear(xe, wu)), wd))
        start += n
    rest = xs.shape[0] - start  # choices of experts outside this rank's: zero rows
    outs.append(xs.new_zeros(rest, w_down.shape[1]))
    return torch.cat(outs, 0)


def _grouped(xs, counts_t, w_gate, w_up, w_down, w_scales=None):
    offs = counts_t.cumsum(0).to(torch.int32)
    if w_scales is not None:
        from ringlinear.ops.fp8.inference import w8a16_grouped

        sg, su, sd = w_scales
        h = swiglu(w8a16_grouped(xs, w_gate, sg, offs), w8a16_grouped(xs, w_up, su, offs))
        return w8a16_grouped(h, w_down, sd, offs)
    h = swiglu(torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs),
               torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs))
    return torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    use_grouped_mm: bool | None = None,
    w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    expert_offset: int | None = None,
) -> torch.Tensor:
    """x: [T, H]; topk_idx/topk_weight: [T, k]; w_gate, w_up: [E, I, H]; w_down: [E, H, I] -> [T, H].
    `w_scales`: (gate, up, down) block scales of e4m3 weights. `expert_offset`: None when every id is one of these
    experts; else the weights are experts [offset, offset + E) of more (ids global, the others add nothing)."""
    T, k = topk_idx.shape
    E = w_gate.shape[0]
    local, outside = topk_idx, None
    if expert_offset is not None:  # choices of other experts: sorted last, as expert E, and dropped
        local = topk_idx - expert_offset if expert_offset else topk_idx
        outside = (local < 0) | (local >= E)
        local = local.masked_fill(outside, E)
    flat = local.reshape(-1)
    order, inv = sort_by_expert(local)
    xs = moe_dispatch(x, order, inv, k)
    counts_t = expert_counts(flat, E + 1)[:E]
    if use_grouped_mm is None:
        use_grouped_mm = x.is_cuda and hasattr(torch, "_grouped_mm") and (
            x.dtype == torch.bfloat16 or w_scales is not None and use_triton(x))
    if use_grouped_mm:
        ys = _grouped(xs, counts_t, w_gate, w_up, w_down, w_scales)
        if outside is not None:  # rows of other experts' choices are left unwritten by the grouped GEMMs
            ys = ys.masked_fill(outside.reshape(-1)[order][:, None], 0)
    else:
        ys = _expert_loop(xs, counts_t.tolist(), w_gate, w_up, w_down, w_scales)
    return moe_combine(ys, order, inv, topk_weight, x.dtype)
