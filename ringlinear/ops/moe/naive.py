"""Readable PyTorch references for the fused MoE kernels: the router (logits = x W^T in fp32, sigmoid, biased
group-limited top-k, renormalised unbiased weights x scale) and the routed SwiGLU experts
y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tj, summed over slots j in order in fp32.

Ties: an equal score goes to the lower expert index (and an equal group score to the lower group index), the
order of a stable descending sort; `fused_router_topk` follows the same rule.
The dispatch / combine references: `xs = x[order // k]` and `y[t] = sum_j w[t, j] * ys[inv[t*k + j]]` in fp32,
autograd through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _first(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest entries of each row; equal values in ascending index order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def naive_router_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H], weight: [E, H], expert_bias: [E] or None -> (topk_idx [T, k] int64 ascending,
    topk_weight [T, k] fp32). Renormalises whenever `norm_topk_prob` (top_k == 1 then gives weight 1 x scale)."""
    T, E = x.shape[0], weight.shape[0]
    logits = x.float() @ weight.float().T
    scores = torch.sigmoid(logits)
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1:
        gs = E // n_group
        top2 = torch.sort(choice.view(T, n_group, gs), dim=-1, descending=True, stable=True).values
        group_score = top2[..., 0] + top2[..., 1]  # [T, n_group]
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
        keep.scatter_(1, _first(group_score, topk_group), True)
        choice = choice.masked_fill(~keep.repeat_interleave(gs, dim=1), float("-inf"))
    topk_idx = _first(choice, top_k).sort(dim=-1).values
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor


def naive_moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x: [T, H]; topk_idx, topk_weight: [T, k]; w_gate, w_up: [E, I, H]; w_down: [E, H, I] -> [T, H] in x's dtype.
    The GEMMs accumulate in fp32; the SwiGLU activation silu(g) * u is rounded to x's dtype before the down
    projection (the fused kernel stores it so); the k weighted expert outputs are summed in slot order in fp32."""
    T, k = topk_idx.shape
    H = x.shape[1]
    ys = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)
    for e in topk_idx.unique().tolist():
        t, j = (topk_idx == e).nonzero(as_tuple=True)
        xe = x[t].float()
        h = F.silu(xe @ w_gate[e].float().T) * (xe @ w_up[e].float().T)
        ys[t, j] = h.to(x.dtype).float() @ w_down[e].float().T
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for j in range(k):
        out = out + topk_weight[:, j, None].float() * ys[:, j]
    return out.to(x.dtype)


def naive_moe_dispatch(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return x[order // k]


def naive_moe_combine(ys: torch.Tensor, order: torch.Tensor, weight: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    T, k = weight.shape
    out = torch.empty_like(ys)
    out[order] = ys
    out = (out.view(T, k, ys.shape[1]).float() * weight.float()[..., None]).sum(1)
    return out.to(out_dtype or ys.dtype)
