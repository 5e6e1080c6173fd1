"""Reference decode attention over a paged KV cache: gather each sequence's pages, mask keys past its length,
one SDPA call. The query heads sharing a KV head become the query length, so K/V are never repeated."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, W] int;
    seq_lens: [N] int (keys 0..len-1 of each sequence; 0 = padding row, output 0) -> o: [N, H, D]."""
    N, H, D = q.shape
    Hkv = k_cache.shape[2]
    bt = block_tables.long()
    k = k_cache[bt].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [N, Hkv, W * bs, D]
    v = v_cache[bt].flatten(1, 2).transpose(1, 2).to(q.dtype)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens.long()[:, None]
    qh = q.view(N, Hkv, H // Hkv, D)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return torch.where(seq_lens.view(N, 1, 1, 1) > 0, o, 0).reshape(N, H, D)
