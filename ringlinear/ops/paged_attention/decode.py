"""Triton decode attention over a paged KV cache (flash-decoding): program (sequence, KV head, split) runs an
online softmax over its share of the sequence's keys for all query heads of that KV head, reading pages through
the block table; the splits are merged by their log-sum-exp. Reads only each sequence's own length, takes
device-side lengths and tables (so it runs under CUDA graphs), never copies K/V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting

SPLITS = 16  # key-range splits per (sequence, KV head): enough programs at batch 1, cheap to merge
TILE = 64  # keys per inner step


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, scale,
                         s_qn, s_qh, s_kb, s_ks, s_kh, s_btn,
                         H: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    n = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + n)
    n_tiles = tl.cdiv(L, TILE)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t = sp * per_split
    t_end = tl.minimum(t + per_split, n_tiles)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = r < REP
    dmask = d < D
    heads = hk * REP + r
    q = tl.load(q_ptr + n * s_qn + heads[:, None] * s_qh + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    kk = tl.arange(0, TILE)
    while t < t_end:
        pos = t * TILE + kk
        kmask = pos < L
        page = tl.load(bt_ptr + n * s_btn + pos // BS, mask=kmask, other=0).to(tl.int64)
        base = page * s_kb + (pos % BS) * s_ks + hk * s_kh
        kv_mask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [R, TILE] fp32
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
        t += 1
    has = l_sum > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))
    row = (n * H + heads) * SPLITS + sp
    tl.store(o_ptr + row[:, None] * D + d[None, :], o, mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row, lse, mask=rmask)


def fused_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Same contract as `naive_paged_decode_attention`; k_cache/v_cache need a unit stride on the head dim."""
    N, H, D = q.shape
    nb, bs, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or H % Hkv:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} (need equal head dims and H divisible by Hkv)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention: k_cache and v_cache need equal strides, unit on the head dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    REP = H // Hkv
    o_part = torch.empty(N, H, SPLITS, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(N, H, SPLITS, device=q.device, dtype=torch.float32)
    if N:
        _paged_decode_kernel[(N, Hkv, SPLITS)](
            q, k_cache, v_cache, block_tables, seq_lens, o_part, lse, float(scale),
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            H=H, REP=REP, D=D, BS=bs, BLOCK_R=max(16, triton.next_power_of_2(REP)),
            BLOCK_D=max(16, triton.next_power_of_2(D)), TILE=TILE, SPLITS=SPLITS, UPCAST=interpreting(),
            # fp32 caches: three-pass TF32 (fp32-level error; plain TF32 gave 7e-4); bf16 operands ignore it
            DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32", num_warps=4)
    # merge the splits: weights exp(lse_s - max lse); rows with no key (padding) give 0
    mx = lse.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    w = torch.exp(lse - mx)
    o = (o_part * w[..., None]).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return o.to(q.dtype)
