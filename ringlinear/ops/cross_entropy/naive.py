"""References: fp32 logits of the lm_head, then mean cross entropy over the labelled tokens; the per-row loss and
logit gradient that the fused kernel computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """hidden: [T, H]; weight: [V, H]; labels: [T] -> mean over tokens with labels != ignore_index of
    -log softmax(hidden @ weight^T)[label], computed in fp32 (NaN when no token is labelled, as F.cross_entropy)."""
    logits = F.linear(hidden.float(), weight.float())
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def naive_softmax_ce_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int = -100,
                        grad_dtype: torch.dtype | None = torch.bfloat16):
    """`fused_softmax_ce_grad` in PyTorch (the unfused path of `linear_cross_entropy`)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, -1)
    loss = torch.where(valid, lse - logits.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    if grad_dtype is None:
        return loss, None
    g = torch.softmax(logits, -1)
    g[torch.arange(len(labels), device=logits.device), safe] -= 1.0
    return loss, (g * (valid.float() * scale.float())[:, None]).to(grad_dtype)
