"""Reference SwiGLU: `h = silu(g) * u` (autograd through PyTorch) and its backward in fp32:
`dg = dh * u * s * (1 + g * (1 - s))`, `du = dh * silu(g)` with `s = sigmoid(g)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def naive_swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """(h, dg, du) in fp32."""
    g, u, dh = g.float(), u.float(), dh.float()
    s = torch.sigmoid(g)
    silu = g * s
    return silu * u, dh * u * s * (1 + g * (1 - s)), dh * silu


def naive_swiglu_backward_into(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                          h: torch.Tensor | None = None) -> None:
    """`swiglu_backward`'s outputs from `naive_swiglu_backward` (fp32), copied into dg, du and h."""
    for out, val in zip((h, dg, du), naive_swiglu_backward(g, u, dh)):
        if out is not None:
            out.copy_(val)
