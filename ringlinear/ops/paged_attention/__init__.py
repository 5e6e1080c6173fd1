"""Decode attention over a paged KV cache: one query token per sequence. The Triton kernel (`decode.py`) on the
Triton backend, the PyTorch reference (`naive.py`) otherwise (`ringlinear.ops.backend`)."""

from __future__ import annotations

from ringlinear.ops.backend import use_triton
from ringlinear.ops.paged_attention.naive import naive_paged_decode_attention

__all__ = ["paged_decode_attention", "naive_paged_decode_attention"]


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, W] int32/int64;
    seq_lens: [N] int (0 = padding row) -> o: [N, H, D] in q's dtype."""
    if use_triton(q):
        from ringlinear.ops.paged_attention.decode import fused_paged_decode_attention

        return fused_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return naive_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
