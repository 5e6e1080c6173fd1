"""Triton prefill attention over a paged KV cache: a batch of prompt chunks in one launch, each chunk's queries
(the last q_len of its seq_len positions) attending causally, o_i = softmax(q_i K[:ctx+i+1]^T * scale) V[:ctx+i+1]
with ctx = seq_len - q_len, K/V read straight from the pages through the block table (flash-attention 2 style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch options of `paged_prefill_attention`. `block_m` rows of a program's tile are
    block_m // REP query positions x the REP query heads of one KV head; `block_n` keys per inner step."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def default_config(head_dim: int, dtype: torch.dtype, rep: int, max_seqlen_q: int | None = None) -> PrefillConfig:
    """A config for sm90 (227 KiB of shared memory, 64K registers per SM): the Q tile and `num_stages` K/V tiles
    fit in shared memory, the fp32 accumulator [block_m, D] and scores [block_m, block_n] in registers (checked
    with ptxas for D 16..256: no spills in bf16/fp16; fp32's three-pass TF32 spills a little at D >= 128). A
    known short longest chunk (`max_seqlen_q`, e.g. decode rows) shrinks the query tile to cut padding rows."""
    width = head_dim * dtype.itemsize  # bytes of one K or V row
    if width <= 256:  # bf16/fp16 D <= 128, fp32 D <= 64
        block_m, block_n, num_stages = 128, 64, 3
    elif width <= 512:  # bf16/fp16 D 256, fp32 D 128
        block_m, block_n, num_stages = (64, 32, 2) if head_dim > 128 else (128, 32, 3)
    else:  # fp32 D 256
        block_m, block_n, num_stages = 64, 16, 2
    if max_seqlen_q is not None:
        block_m = min(block_m, max(16, triton.next_power_of_2(max_seqlen_q * rep)))
    block_m = max(block_m, triton.next_power_of_2(rep))  # at least one query position per tile
    return PrefillConfig(block_m, block_n, 8 if block_m >= 128 or head_dim >= 256 else 4, num_stages)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, bt_row, t, seq_len, qpos, hk, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                 qk_scale, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over keys [t * BLOCK_N, (t + 1) * BLOCK_N). Unmasked tiles lie wholly inside every
    row's causal window; MASKED tiles (the diagonal) apply the causal mask and read no page past seq_len."""
    pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    if MASKED:
        kmask = pos < seq_len
        page = tl.load(bt_row + pos // BS, mask=kmask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + pos // BS).to(tl.int64)
    k_off = page * s_kb + (pos % BS) * s_ks + hk * s_kh
    v_off = page * s_vb + (pos % BS) * s_vs + hk * s_vh
    if MASKED:
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + k_off[:, None] + d[None, :])
        v = tl.load(v_ptr + v_off[:, None] + d[None, :])
    if INTERPRET:  # the interpreter's numpy dot has no bf16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:  # a cache stored in another dtype than q is read as q's
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
    if MASKED:  # a stored row has qpos < seq_len, so the causal test also drops the keys past the sequence
        s = tl.where(pos[None, :] <= qpos[:, None], s, float("-inf"))
    # every row saw key 0 in tile 0 (qpos >= 0), so m_i is finite from then on and no exp2(-inf + inf) occurs
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_q_ptr, lens_ptr, qk_scale, N,
                          s_qt, s_qh, s_ot, s_oh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btn,
                          REP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    # Sequence n owns programs [cu_q[n] // BLOCK_Q + n, ... + cdiv(q_len_n, BLOCK_Q)): disjoint ranges, found
    # without a host-side tile map by a binary search for the last n whose first program is <= pid.
    lo = pid * 0
    hi = lo + N - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(cu_q_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid - 1)
    n = lo
    q_beg = tl.load(cu_q_ptr + n).to(tl.int32)
    q_len = tl.load(cu_q_ptr + n + 1).to(tl.int32) - q_beg
    n_qt = tl.cdiv(q_len, BLOCK_Q)
    local = pid - (q_beg // BLOCK_Q + n)
    if local >= n_qt:  # a gap program of the upper-bound grid
        return
    q0 = (n_qt - 1 - local) * BLOCK_Q  # the last (longest) query tiles of a sequence start first
    seq_len = tl.load(lens_ptr + n).to(tl.int32)
    ctx = seq_len - q_len  # cached keys before the chunk

    # rows: query position q0 + r // REP, query head hk * REP + r % REP (the GQA group shares every K/V tile)
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // REP
    head = hk * REP + r % REP
    d = tl.arange(0, D)
    row_ok = (r < BLOCK_Q * REP) & (qi < q_len)
    tok = (q_beg + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * s_qt + head[:, None] * s_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
    qpos = ctx + qi  # the row's position among the sequence's keys: it sees keys 0..qpos

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + n.to(tl.int64) * s_btn
    q_last = tl.minimum(q0 + BLOCK_Q, q_len) - 1
    n_full = (ctx + q0 + 1) // BLOCK_N  # key tiles every row of the tile sees whole: no mask
    n_tiles = tl.cdiv(ctx + q_last + 1, BLOCK_N)  # key tiles any row sees; later ones are skipped
    if INTERPRET:  # the interpreter takes no runtime bound in range(): the same steps in while loops
        t = n_full * 0
        while t < n_full:
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, bt_row, t, seq_len, qpos, hk,
                                         s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, qk_scale, D, BS, BLOCK_N, False,
                                         INTERPRET, DOT_PREC)
            t += 1
        while t < n_tiles:
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, bt_row, t, seq_len, qpos, hk,
                                         s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, qk_scale, D, BS, BLOCK_N, True,
                                         INTERPRET, DOT_PREC)
            t += 1
    else:  # for loops: the compiler pipelines their K/V loads over num_stages
        for t in range(0, n_full):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, bt_row, t, seq_len, qpos, hk,
                                         s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, qk_scale, D, BS, BLOCK_N, False,
                                         INTERPRET, DOT_PREC)
        for t in range(n_full, n_tiles):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, bt_row, t, seq_len, qpos, hk,
                                         s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, qk_scale, D, BS, BLOCK_N, True,
                                         INTERPRET, DOT_PREC)
    o = acc / l_i[:, None]
    if INTERPRET:
        if o_ptr.dtype.element_ty == tl.bfloat16:
            # the interpreter truncates fp32 -> bf16 (twice the error, all toward zero); round to nearest even on
            # the bits first, as the GPU's conversion does, so CPU tests see the GPU's numerics
            bits = o.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            o = bits.to(tl.float32, bitcast=True)
    tl.store(o_ptr + tok[:, None] * s_ot + head[:, None] * s_oh + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def fused_paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, max_seqlen_q: int | None = None, *, out: torch.Tensor | None = None,
                            config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal GQA attention of N packed chunks over their paged keys, one kernel launch, no host sync.

    q: [Tq, H, D] (sequence n's rows cu_seqlens_q[n]:cu_seqlens_q[n+1] are its last q_len_n positions);
    k_cache, v_cache: [num_blocks, block_size, Hkv, D] with the chunks' own K/V already written;
    block_tables: [N, W] int32/int64 (pages of each sequence, W >= cdiv(seq_len, block_size));
    cu_seqlens_q: [N+1] int32/int64 on q's device, cu_seqlens_q[-1] == Tq; seq_lens: [N] int, keys per
    sequence, seq_lens[n] >= q_len_n (q_len 0 is allowed; q_len == seq_len: no prefix);
    max_seqlen_q: optional host int >= every q_len (a short one, e.g. decode rows, picks a smaller query tile);
    out: optional [Tq, H, D] buffer in q's dtype; config: tile sizes (default `default_config`).
    -> o: [Tq, H, D] in q's dtype. D a power of two 16..256, block_size a power of two, H a multiple of Hkv.
    """
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"paged_prefill_attention: q must be [Tq, H, D] and k_cache [num_blocks, block_size, Hkv, "
                         f"D], got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    Tq, H, D = q.shape
    _, bs, Hkv, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_prefill_attention: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    if Dk != D:
        raise ValueError(f"paged_prefill_attention: k_cache head dim {Dk} != q head dim {D}")
    if not (_is_pow2(D) and 16 <= D <= 256):
        raise ValueError(f"paged_prefill_attention: head dim D (q.shape[-1]) must be a power of two in 16..256, "
                         f"got {D}")
    if not _is_pow2(bs):
        raise ValueError(f"paged_prefill_attention: block_size (k_cache.shape[1]) must be a power of two, got {bs}")
    if H % Hkv:
        raise ValueError(f"paged_prefill_attention: query heads {H} (q.shape[1]) not a multiple of KV heads {Hkv}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"paged_prefill_attention: q dtype {q.dtype} is not fp32, bf16 or fp16")
    N = block_tables.shape[0]
    if block_tables.dim() != 2 or cu_seqlens_q.shape != (N + 1,) or seq_lens.shape != (N,):
        raise ValueError(f"paged_prefill_attention: need block_tables [N, W], cu_seqlens_q [N+1], seq_lens [N]; got "
                         f"{tuple(block_tables.shape)}, {tuple(cu_seqlens_q.shape)}, {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"paged_prefill_attention: {name} must be int32/int64 on {q.device}, got {t.dtype} on "
                             f"{t.device}")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_prefill_attention: k_cache and v_cache need a unit stride on the head dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(Tq, H, D, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"paged_prefill_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device} with a unit "
                         f"last stride, got {tuple(out.shape)} {out.dtype} on {out.device}")
    REP = H // Hkv
    cfg = config or default_config(D, q.dtype, REP, max_seqlen_q)
    if not (_is_pow2(cfg.block_m) and _is_pow2(cfg.block_n) and cfg.block_n >= 16 and cfg.block_m >= max(16, REP)):
        raise ValueError(f"paged_prefill_attention: config {cfg} needs powers of two, block_n >= 16 and "
                         f"block_m >= max(16, H // Hkv = {REP})")
    BLOCK_Q = cfg.block_m // REP
    # An upper bound on the query tiles of all sequences (sum of cdiv(q_len, BLOCK_Q) <= Tq // BLOCK_Q + N),
    # so the grid needs no device read; the few gap programs return at once.
    programs = Tq // BLOCK_Q + N
    if Tq == 0 or N == 0:
        return out
    _paged_prefill_kernel[(programs, Hkv)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, float(scale) * LOG2E, N,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        REP=REP, D=D, BS=bs, BLOCK_M=cfg.block_m, BLOCK_Q=BLOCK_Q, BLOCK_N=cfg.block_n, INTERPRET=interpreting(),
        # fp32: three-pass TF32 (fp32-level error, as in the decode kernel); bf16/fp16 operands ignore it
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out
