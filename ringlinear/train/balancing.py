"""Aux-loss-free MoE load balancing (DeepSeek-V3 §2.1.2): after each optimizer step every router's
selection bias moves by `b_e += u * sign(mean_load - load_e)` (under-loaded experts become more likely to
be chosen), from the token counts the routers accumulated since the last update (summed over DP ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ringlinear.layers.moe import Router


def routers(model: nn.Module) -> list[tuple[str, Router]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float) -> dict[str, float]:
    """Apply the sign update to every router with an expert bias, reset the counters, and return load
    statistics over all MoE layers: `moe/max_min_ratio` (max load / min load, worst layer; inf when an
    expert got no token), `moe/cv` (coefficient of variation std/mean, averaged over layers)."""
    rs = [r for _, r in routers(model)]
    if not rs:
        return {}
    # One collective for all layers: counts must be the global ones so that every rank moves its
    # (replicated) biases identically.
    counts = torch.stack([r.tokens_per_expert for r in rs])  # [L, E]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    ratios, cvs = [], []
    for r, load in zip(rs, counts):
        mean = load.mean()
        if r.expert_bias is not None and rate > 0 and mean > 0:
            r.expert_bias += rate * torch.sign(mean - load).to(r.expert_bias.dtype)
        r.tokens_per_expert.zero_()
        if mean > 0:
            cvs.append((load.std(unbiased=False) / mean).item())
            ratios.append((load.max() / load.min()).item() if load.min() > 0 else float("inf"))
    if not cvs:
        return {}
    return {"moe/max_min_ratio": max(ratios), "moe/cv": sum(cvs) / len(cvs)}
