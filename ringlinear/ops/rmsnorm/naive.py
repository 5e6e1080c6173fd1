"""Reference RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w` in fp32, the mean over each of `groups` equal slices of
the last dim, rounded once to x's dtype (autograd through PyTorch)."""

from __future__ import annotations

import torch


def naive_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    if groups > 1:
        h = h.unflatten(-1, (groups, -1))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if groups > 1:
        h = h.flatten(-2)
    return (h * weight.float()).to(dtype)
