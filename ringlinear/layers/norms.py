"""RMSNorm and group RMSNorm (normalise each group of whole heads separately), computed in fp32
(`ringlinear.ops.rmsnorm`: the reference and the fused kernels).

`rmsnorm(x) = x / sqrt(mean(x^2) + eps) * w`; the group form takes the mean over each of
`groups` equal slices of the last dimension (docs/architecture.md: the linear layers' output norm).
"""

from __future__ import annotations

import torch
from torch import nn

from ringlinear.ops.rmsnorm import rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"RMSNorm: dim={dim} is not divisible by groups={groups}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused Triton kernels on CUDA, the PyTorch reference elsewhere (ringlinear.ops.rmsnorm)
        return rmsnorm(x, self.weight, self.eps, self.groups)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GroupRMSNorm(RMSNorm):
    """RMSNorm over `groups` slices of the last dim (heads grouped in order: group j = heads j*H/G ...)."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-6):
        super().__init__(dim, eps, groups)
