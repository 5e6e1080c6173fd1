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


def naive_paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                  max_seqlen_q=None):
    """Reference of `paged_prefill_attention`, one masked SDPA per sequence in fp32. q: [Tq, H, D] packed
    (cu_seqlens_q: [N+1]); k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, W]; seq_lens: [N].
    Sequence n's queries are its last q_len of seq_lens[n] positions; query i sees keys 0..seq_len - q_len + i.
    max_seqlen_q is accepted for the same signature and unused. -> o: [Tq, H, D] in q's dtype."""
    H, D = q.shape[1:]
    Hkv = k_cache.shape[2]
    bounds, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    o = torch.zeros_like(q)
    for n, L in enumerate(lens):
        a, b = bounds[n], bounds[n + 1]
        if b == a:
            continue
        pages = block_tables[n].long()
        k = k_cache[pages].flatten(0, 1)[:L].float()  # [L, Hkv, D]: the sequence's keys in order
        v = v_cache[pages].flatten(0, 1)[:L].float()
        qn = q[a:b].float().transpose(0, 1).reshape(Hkv, H // Hkv * (b - a), D)  # the GQA group as query rows
        # query i (of b - a) is position L - (b - a) + i: it sees keys 0..that position
        qpos = torch.arange(L - (b - a), L, device=q.device).repeat(H // Hkv)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        on = F.scaled_dot_product_attention(qn, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        o[a:b] = on.reshape(H, b - a, D).transpose(0, 1).to(q.dtype)
    return o
