"""Rotary position embedding, NeoX (rotate-half) style, on the first `rotary_dim` dims of each head, fp32.

`x'[:r/2] = x1 cos - x2 sin`, `x'[r/2:r] = x2 cos + x1 sin` with angles `pos * theta^(-2i/r)`.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        return (1.0 / self.theta**exps).float()

    def reset_buffers(self) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (any float dtype), positions: [T] int -> fp32 [T, H, D] with RoPE applied."""
        x = x.float()
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, r/2]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = self.rotary_dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
