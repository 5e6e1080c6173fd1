"""SwiGLU `h = silu(g) * u` (docs/architecture.md: dense MLPs, experts, shared experts): the fused Triton
passes (`fused.py`) on the Triton backend, the PyTorch reference (`naive.py`) otherwise (`ringlinear.ops.backend`).
`swiglu` is the differentiable op; `swiglu_forward` / `swiglu_backward` are its two halves for autograd functions
that hold their own activations (the FP8 recipe)."""

from __future__ import annotations

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.swiglu.naive import naive_swiglu, naive_swiglu_backward, naive_swiglu_backward_into

__all__ = ["naive_swiglu", "naive_swiglu_backward", "swiglu", "swiglu_backward", "swiglu_forward"]


def check_rows(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape or t.stride(1) != 1:
            raise ValueError(f"swiglu: need [M, I] tensors of one shape with unit column stride, got "
                             f"{[(tuple(x.shape), x.stride()) for x in ts]}")


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """h = silu(g) * u for [M, I] g, u (row views allowed) -> [M, I] contiguous in `out_dtype` (default g's)."""
    check_rows(g, u)
    if not use_triton(g):
        return naive_swiglu(g.float(), u.float()).to(out_dtype or g.dtype)
    from ringlinear.ops.swiglu.fused import fused_swiglu_forward

    return fused_swiglu_forward(g, u, out_dtype)


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                    h: torch.Tensor | None = None) -> None:
    """Writes dg, du (and h, when given) for [M, I] g, u, dh; every tensor may be a row view."""
    check_rows(*(t for t in (g, u, dh, dg, du, h) if t is not None))
    if not use_triton(g):
        naive_swiglu_backward_into(g, u, dh, dg, du, h)
        return
    from ringlinear.ops.swiglu.fused import fused_swiglu_backward

    fused_swiglu_backward(g, u, dh, dg, du, h)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (same shapes and dtype), differentiable; fused on CUDA, `naive_swiglu` elsewhere."""
    if g.shape != u.shape or g.dtype != u.dtype:  # checked on both paths (the reference would broadcast)
        raise ValueError(f"swiglu: g and u must match, got {tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype}")
    if not use_triton(g):
        return naive_swiglu(g, u)
    from ringlinear.ops.swiglu.fused import fused_swiglu

    return fused_swiglu(g, u)
