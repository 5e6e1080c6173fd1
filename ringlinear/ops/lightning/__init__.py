"""Lightning attention (docs/architecture.md, "Linear attention layer"): `lightning_attn` (chunked prefill,
forward + backward, varlen) and `lightning_decode` (one token per sequence over a pool of fp32 states) run the
Triton kernels (`chunk.py`, `fused_recurrent.py`) on the Triton backend and the PyTorch references (`naive.py`)
otherwise (`ringlinear.ops.backend`)."""

from __future__ import annotations

from ringlinear.ops.backend import use_triton
from ringlinear.ops.lightning.decay import alibi_slopes, decay_slopes, layer_decay_factor
from ringlinear.ops.lightning.naive import (
    naive_chunk_lightning_attn,
    naive_lightning_commit,
    naive_lightning_decode,
    naive_lightning_verify,
    naive_recurrent_lightning_attn,
)

__all__ = [
    "alibi_slopes",
    "decay_slopes",
    "layer_decay_factor",
    "lightning_attn",
    "lightning_commit",
    "lightning_decode",
    "lightning_verify",
    "naive_chunk_lightning_attn",
    "naive_lightning_commit",
    "naive_lightning_decode",
    "naive_lightning_verify",
    "naive_recurrent_lightning_attn",
]


def lightning_attn(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   cu_seqlens_host=None):
    """Chunked-prefill Lightning attention. q, k: [B, T, H, D]; v: [B, T, H, Dv]; g: [H] fp32 log decay;
    initial_state: [B or N, H, D, Dv] fp32; cu_seqlens: [N+1] int32 (B == 1), optionally also as a host list
    `cu_seqlens_host` (the Triton path then reads nothing back from the device). Returns (o, final_state)."""
    if use_triton(q):
        from ringlinear.ops.lightning.chunk import chunk_lightning_attn

        return chunk_lightning_attn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                                    cu_seqlens_host=cu_seqlens_host)
    return naive_chunk_lightning_attn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def lightning_decode(q, k, v, g, state_pool, slots, scale=None):
    """Single-token step for N sequences whose fp32 states live in `state_pool[slots]` (updated in place)."""
    if use_triton(q):
        from ringlinear.ops.lightning.fused_recurrent import fused_recurrent_lightning_decode

        return fused_recurrent_lightning_decode(q, k, v, g, state_pool, slots, scale)
    return naive_lightning_decode(q, k, v, g, state_pool, slots, scale)


def lightning_verify(q, k, v, g, state_pool, slots, scale=None):
    """Speculative decoding's verify pass: L tokens per sequence from `state_pool[slots]`, the pool not written.
    q, k: [N, L, H, D]; v: [N, L, H, Dv] -> o: [N, L, H, Dv]."""
    if use_triton(q):
        from ringlinear.ops.lightning.fused_recurrent import fused_recurrent_lightning_verify

        return fused_recurrent_lightning_verify(q, k, v, g, state_pool, slots, scale)
    return naive_lightning_verify(q, k, v, g, state_pool, slots, scale)


def lightning_commit(k, v, g, state_pool, slots, accepted):
    """Advance `state_pool[slots[n]]` by the first `accepted[n]` of the verified tokens (k, v: [N, L, H, D|Dv])."""
    if use_triton(k):
        from ringlinear.ops.lightning.fused_recurrent import fused_recurrent_lightning_commit

        return fused_recurrent_lightning_commit(k, v, g, state_pool, slots, accepted)
    return naive_lightning_commit(k, v, g, state_pool, slots, accepted)
