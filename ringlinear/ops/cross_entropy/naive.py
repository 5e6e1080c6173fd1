"""Reference: fp32 logits of the lm_head, then mean cross entropy over the labelled tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """hidden: [T, H]; weight: [V, H]; labels: [T] -> mean over tokens with labels != ignore_index of
    -log softmax(hidden @ weight^T)[label], computed in fp32 (NaN when no token is labelled, as F.cross_entropy)."""
    logits = F.linear(hidden.float(), weight.float())
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)
