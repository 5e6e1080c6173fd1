"""Sigmoid, group-limited top-k routing with a selection-only expert bias (DeepSeek-V3 "noaux_tc").

scores = sigmoid(logits); choose with scores + bias: keep the `topk_group` groups whose top-2 biased
scores sum highest, then the top-k experts inside them; weight with the unbiased scores, renormalised
to sum 1 (`norm_topk_prob`, for any k as SGLang and vLLM do: with k = 1 the weight is 1), times
`routed_scaling_factor`. (The HF remote code of the Bailing MoE family renormalises when k > 1 whatever
`norm_topk_prob` says and never when k = 1; the released models have k = 8 and `norm_topk_prob` true.)
"""

from __future__ import annotations

import torch


def grouped_topk(
    logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] (computed in fp32). Returns (topk_idx [T, k] int64, topk_weight [T, k] fp32).
    Experts come out sorted by index so that the weighted sum runs in one fixed order. `batch_invariant`: the
    renormalising sum adds the k weights left to right (a reduction kernel may vectorise a short row across rows,
    so its order, hence its bits, would follow the number of rows), and on the CPU the sigmoid runs on rows padded
    to whole vector chunks (a vectorised sigmoid and its scalar tail round differently)."""
    T, E = logits.shape
    if batch_invariant and not logits.is_cuda and E % 64:
        scores = torch.sigmoid(torch.nn.functional.pad(logits.float(), (0, 64 - E % 64)))[:, :E]
    else:
        scores = torch.sigmoid(logits.float())
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1).indices.sort(dim=-1).values
    weight = scores.gather(1, topk_idx)
    if norm_topk_prob:
        if batch_invariant:
            total = weight[:, :1]
            for j in range(1, top_k):
                total = total + weight[:, j : j + 1]
        else:
            total = weight.sum(-1, keepdim=True)
        weight = weight / (total + 1e-20)
    return topk_idx, weight * routed_scaling_factor
