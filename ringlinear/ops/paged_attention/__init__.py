"""Attention over a paged KV cache (`[num_blocks, block_size, Hkv, D]` pages, a block table per sequence):
decode (one query token per sequence, `decode.py`) and prefill (a batch of prompt chunks, each over its cached
prefix and itself, causally, `prefill.py`). The Triton kernels on the Triton backend, the PyTorch references
(`naive.py`) otherwise (`ringlinear.ops.backend`)."""

from __future__ import annotations

from ringlinear.ops.backend import use_triton
from ringlinear.ops.paged_attention.naive import naive_paged_decode_attention, naive_paged_prefill_attention

__all__ = ["naive_paged_decode_attention", "naive_paged_prefill_attention", "paged_decode_attention",
           "paged_prefill_attention"]


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, W] int32/int64;
    seq_lens: [N] int (0 = padding row) -> o: [N, H, D] in q's dtype."""
    if use_triton(q):
        from ringlinear.ops.paged_attention.decode import fused_paged_decode_attention

        return fused_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return naive_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_seqlen_q=None):
    """q: [Tq, H, D] packed chunks of N sequences (`cu_seqlens_q: [N+1]`); sequence n's queries are the last
    `q_len_n` of its `seq_lens[n]` keys (its chunk's K/V already in the pages) and attend causally; block_tables:
    [N, W] int -> o: [Tq, H, D] in q's dtype. `max_seqlen_q`: the longest chunk as a host int (sizes the grid)."""
    if use_triton(q):
        from ringlinear.ops.paged_attention.prefill import fused_paged_prefill_attention

        return fused_paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                             max_seqlen_q)
    return naive_paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                         max_seqlen_q)
