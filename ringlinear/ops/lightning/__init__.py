"""Lightning attention: one dispatcher over the Triton kernels (CUDA) and the PyTorch reference.

`RINGLINEAR_BACKEND=triton|torch` forces a path; default is Triton on CUDA tensors, torch elsewhere.
With `TRITON_INTERPRET=1` and `triton` forced, the Triton kernels run on the CPU.
"""

from __future__ import annotations

import os

import torch

from ringlinear.ops.lightning.decay import alibi_slopes, decay_slopes, layer_decay_factor
from ringlinear.ops.lightning.naive import (
    lightning_attn_chunked,
    lightning_attn_recurrent,
    lightning_decode_torch,
)

__all__ = [
    "alibi_slopes",
    "decay_slopes",
    "layer_decay_factor",
    "lightning_attn",
    "lightning_decode",
    "lightning_attn_chunked",
    "lightning_attn_recurrent",
    "lightning_decode_torch",
    "backend_for",
]

_BACKENDS = ("triton", "torch")


def _triton_available() -> bool:
    try:
        from ringlinear.ops.lightning import chunk  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(x: torch.Tensor) -> str:
    """The path a call on tensor `x` takes: the env override, else Triton on CUDA, else torch."""
    forced = os.environ.get("RINGLINEAR_BACKEND", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"RINGLINEAR_BACKEND={forced!r} is not one of {_BACKENDS}")
        if forced == "triton" and not _triton_available():
            raise RuntimeError("RINGLINEAR_BACKEND=triton, but the Triton Lightning kernels are not available")
        return forced
    return "triton" if x.is_cuda and _triton_available() else "torch"


def lightning_attn(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   cu_seqlens_host=None):
    """Chunked-prefill Lightning attention. q, k: [B, T, H, D]; v: [B, T, H, Dv]; g: [H] fp32 log decay;
    initial_state: [B or N, H, D, Dv] fp32; cu_seqlens: [N+1] int32 (B == 1), optionally also as a host list
    `cu_seqlens_host` (the Triton path then reads nothing back from the device). Returns (o, final_state)."""
    if backend_for(q) == "triton":
        from ringlinear.ops.lightning.chunk import chunk_lightning_attn

        return chunk_lightning_attn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                                    cu_seqlens_host=cu_seqlens_host)
    return lightning_attn_chunked(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def lightning_decode(q, k, v, g, state_pool, slots, scale=None):
    """Single-token step for N sequences whose fp32 states live in `state_pool[slots]` (updated in place)."""
    if backend_for(q) == "triton":
        from ringlinear.ops.lightning.decode import decode_lightning_attn

        return decode_lightning_attn(q, k, v, g, state_pool, slots, scale)
    return lightning_decode_torch(q, k, v, g, state_pool, slots, scale)
