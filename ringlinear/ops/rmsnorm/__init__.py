"""RMSNorm and group RMSNorm (docs/architecture.md: input norms, QK-norm, the linear layers' group norm):
`rmsnorm` runs the fused Triton kernels (`fused.py`) on the Triton backend and `naive_rmsnorm` (`naive.py`)
otherwise (`ringlinear.ops.backend`)."""

from __future__ import annotations

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.rmsnorm.naive import naive_rmsnorm

MAX_DIM = 16384  # one row (all its groups) is held in registers by the fused kernels

__all__ = ["naive_rmsnorm", "rmsnorm"]


def check_rmsnorm_inputs(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rmsnorm: weight must be [{D}] (x's last dim), got {tuple(weight.shape)}")
    if groups < 1 or D % groups:
        raise ValueError(f"rmsnorm: groups={groups} must be >= 1 and divide the last dim {D}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """RMSNorm over the last dim of x (in `groups` equal slices), weight [D]; output in x's dtype."""
    check_rmsnorm_inputs(x, weight, groups)  # on both paths: the reference would broadcast a wrong-sized weight
    if not use_triton(x) or x.shape[-1] > MAX_DIM:
        return naive_rmsnorm(x, weight, eps, groups)
    from ringlinear.ops.rmsnorm.fused import fused_rmsnorm

    return fused_rmsnorm(x, weight, eps, groups)
