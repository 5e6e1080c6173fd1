"""Decode attention over a paged KV cache: one query token per sequence. The Triton kernel (`decode.py`) on
CUDA, the PyTorch reference (`naive.py`) elsewhere; RINGLINEAR_BACKEND=triton|torch forces one."""

from __future__ import annotations

from ringlinear.ops.lightning import backend_for
from ringlinear.ops.paged_attention.naive import paged_decode_attention_torch

__all__ = ["paged_decode_attention", "paged_decode_attention_torch"]


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, W] int32/int64;
    seq_lens: [N] int (0 = padding row) -> o: [N, H, D] in q's dtype."""
    if backend_for(q) == "triton":
        from ringlinear.ops.paged_attention.decode import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)
