"""Routed SwiGLU experts: y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tj.

Tokens are sorted by expert (stable), each expert runs one GEMM over its tokens (`torch._grouped_mm`
on CUDA when available, a loop elsewhere), and results are summed over the k choices in a fixed order,
so the output is deterministic and batch-invariant per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert
from ringlinear.ops.swiglu import swiglu


def expert_counts(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert, [E] int64. A scatter-add rather than `torch.bincount`, which reads the largest index
    back to the host on CUDA (a stream sync in every MoE layer)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=flat_idx.device).scatter_add_(
        0, flat_idx, torch.ones_like(flat_idx))


def _expert_loop(xs, counts, w_gate, w_up, w_down):
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            xe = xs[start : start + n]
            outs.append(F.linear(swiglu(F.linear(xe, w_gate[e]), F.linear(xe, w_up[e])), w_down[e]))
        start += n
    return torch.cat(outs, 0) if outs else xs.new_zeros(0, w_down.shape[1])


def _grouped(xs, counts_t, w_gate, w_up, w_down):
    offs = counts_t.cumsum(0).to(torch.int32)
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
) -> torch.Tensor:
    """x: [T, H]; topk_idx/topk_weight: [T, k]; w_gate, w_up: [E, I, H]; w_down: [E, H, I] -> [T, H]."""
    T, k = topk_idx.shape
    E = w_gate.shape[0]
    flat = topk_idx.reshape(-1)
    order, inv = sort_by_expert(topk_idx)
    xs = moe_dispatch(x, order, inv, k)
    counts_t = expert_counts(flat, E)
    if use_grouped_mm is None:
        use_grouped_mm = x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
    if use_grouped_mm:
        ys = _grouped(xs, counts_t, w_gate, w_up, w_down)
    else:
        ys = _expert_loop(xs, counts_t.tolist(), w_gate, w_up, w_down)
    return moe_combine(ys, order, inv, topk_weight, x.dtype)
