"""Rotary position embedding, NeoX (rotate-half) style, on the first `rotary_dim` dims of each head, fp32.

`x'[:r/2] = m (x1 cos - x2 sin)`, `x'[r/2:r] = m (x2 cos + x1 sin)` with angles `pos * f_i`, `f_i = theta^(-2i/r)`
rescaled by `rope_scaling` as transformers defines it (linear: `f_i / s`; YaRN: a ramp between `f_i` and `f_i / s`
with `m = 0.1 ln s + 1`; dynamic NTK: theta enlarged for `s` times the context), `m = 1` otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ringlinear.ops.batch_invariant import current_alignment


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict | None = None,
                     max_position_embeddings: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] fp32, attention factor m) for `rope_scaling` (None or a type validated by
    `RingLinearConfig`), computed in fp64 and rounded once. The formulas are transformers'
    (`modeling_rope_utils._compute_{linear_scaling,dynamic_ntk,yarn}_parameters`); dynamic NTK is the static form
    vLLM and SGLang serve: the frequencies transformers uses once a sequence reaches `factor * max_position_embeddings`
    (transformers recomputes them per forward from the longest sequence in the batch, which makes a token's
    encoding depend on its batch)."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    dim = rotary_dim

    def inv_freq(base: float) -> torch.Tensor:
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    if kind == "default":
        return inv_freq(theta).float(), 1.0
    if kind == "linear":
        return (inv_freq(theta) / scaling["factor"]).float(), 1.0
    if kind == "dynamic":
        factor = scaling["factor"]
        base = theta * (factor * factor - (factor - 1)) ** (dim / (dim - 2))  # seq_len = factor * max_position
        return inv_freq(base).float(), 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not one of default, linear, dynamic, yarn")

    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
        raise ValueError("yarn rope_scaling needs original_max_position_embeddings or max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the dim whose wavelength fits `num_rotations` times into the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep f_i (high frequencies), 0: interpolate to f_i / factor
    base_freq = inv_freq(theta)
    blended = base_freq / factor * (1 - extrapolation) + base_freq * extrapolation
    return blended.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None = None,
                 max_position_embeddings: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_factor = self._frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _frequencies(self) -> tuple[torch.Tensor, float]:
        return rope_frequencies(self.rotary_dim, self.theta, self.scaling, self.max_position_embeddings)

    def reset_buffers(self) -> None:
        self.inv_freq = self._frequencies()[0].to(self.inv_freq.device)
        self._table = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int -> (cos, sin) fp32 [T, r/2], the attention factor applied."""
        if current_alignment().rope:
            cos, sin = self.table(positions.device)
            cos, sin = cos.index_select(0, positions), sin.index_select(0, positions)
        else:
            angles = positions.float()[:, None] * self.inv_freq[None, :]
            cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) fp32 [max_position_embeddings, r/2] of the fp32 angles pos * f_i, evaluated once in fp64 (the
        `rope` alignment switch: a position's values never depend on the call that asks for them)."""
        cached = getattr(self, "_table", None)
        if cached is None or cached[0].device != torch.device(device):
            n = self.max_position_embeddings or 4096
            pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
            angles = (pos[:, None] * self.inv_freq[None, :]).double()
            cached = tuple(t.float().to(device) for t in (angles.cos(), angles.sin()))
            self._table = cached
        return cached

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (any float dtype), positions: [T] int -> fp32 [T, H, D] with RoPE applied."""
        x = x.float()
        cos, sin = self.cos_sin(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        half = self.rotary_dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
