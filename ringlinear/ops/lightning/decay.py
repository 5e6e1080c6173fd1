"""Per-head log decay of the Lightning attention layers.

`g_h = -slope_h * layer_decay_factor(i, L)`, with `slope_h` the ALiBi slopes (Press et al.) and the
factor weakening the decay with depth. Both readings of the factor live here and nowhere else.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes: `r^(h+1)` with `r = 2^(-2^-(log2(H) - 3))` for H a power of two; otherwise the
    slopes of the nearest lower power of two followed by every other slope of twice that count."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        r = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [r ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def layer_decay_factor(layer_idx: int, num_layers: int, layerwise: bool = True) -> float:
    """Depth scaling of the decay: `1 - (i - 1) / (L - 1) + 1e-5`.

    Source followed: the official Hugging Face remote code of Ring-linear
    (`BailingMoeV2LinearAttention`: `1 - (self.layer_idx - 1) / (num_hidden_layers - 1) + 1e-5`),
    whose reading is also the one of the upstreamed InclusionAI/HF port (`BailingHybridLightningAttention`).
    SGLang's Lightning backend uses `i` instead of `i - 1`; an MLX port clamps `max(0, i - 1)`.
    The unclamped `i - 1` makes layer 0's factor `1 + 1/(L-1) + 1e-5`.
    """
    if not layerwise or num_layers <= 1:
        return 1.0 + 1e-5
    return 1.0 - (layer_idx - 1) / (num_layers - 1) + 1e-5


def decay_slopes(num_heads: int, layer_idx: int, num_layers: int, layerwise: bool = True) -> torch.Tensor:
    """Log decay `g: [H]` fp32 (negative) of linear layer `layer_idx` in a stack of `num_layers`."""
    factor = layer_decay_factor(layer_idx, num_layers, layerwise)
    return -torch.tensor(alibi_slopes(num_heads), dtype=torch.float64).mul(factor).to(torch.float32)
