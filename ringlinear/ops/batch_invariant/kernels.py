"""Triton kernels of the aligned-numerics ops (`naive.py` holds their references). Batch invariance by
construction: tile sizes are fixed (never chosen from M, never autotuned, no split-K), so a row's reduction runs in
the same order whatever the batch; attention and the recurrence give each (query | sequence, head) a program of
its own that walks its keys | tokens in order. Sizes are read from device tensors, so they run under CUDA graphs.
Ideas from Thinking Machines' `batch_invariant_ops` ("Defeating Nondeterminism in LLM Inference", 2025)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting

# fixed tiles: (BM, BN, BK, warps, stages) per operand dtype
MM_TILES = {torch.bfloat16: (64, 64, 64, 4, 3), torch.float16: (64, 64, 64, 4, 3),
            torch.float32: (32, 32, 32, 4, 2)}
ROWS_BM, ROWS_BN, ROWS_BK = 16, 64, 64
ATTN_TILE = 64


@triton.jit
def _bi_mm_step(a_ptr, b_ptr, acc, rm, rmask, rn, rk, k0, N, K, s_am, s_bn, PREC: tl.constexpr):
    kk = k0 + rk
    a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0)
    b = tl.load(b_ptr + rn[:, None] * s_bn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
    return tl.dot(a, tl.trans(b), acc, input_precision=PREC)


@triton.jit
def _bi_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_bn, s_cm,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                  INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if INTERPRET:  # the interpreter takes no runtime bound in range(): the same steps in a while loop
        k0 = K * 0
        while k0 < K:
            acc = _bi_mm_step(a_ptr, b_ptr, acc, rm, rm < M, rn, rk, k0, N, K, s_am, s_bn, PREC)
            k0 += BK
    else:  # a for loop: the compiler pipelines the loads over num_stages
        for k0 in range(0, K, BK):
            acc = _bi_mm_step(a_ptr, b_ptr, acc, rm, rm < M, rn, rk, k0, N, K, s_am, s_bn, PREC)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def bi_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> fp32 [M, N] with one fixed tile shape per dtype."""
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if M == 0:
        return out
    BM, BN, BK, warps, stages = MM_TILES.get(x.dtype, MM_TILES[torch.float32])
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _bi_mm_kernel[grid](x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), BM=BM, BN=BN, BK=BK,
                        PREC=prec, INTERPRET=interpreting(), num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _bi_rows_kernel(x_ptr, w_ptr, order_ptr, bexp_ptr, brow_ptr, bn_ptr, y_ptr, N, K, s_xp, s_we, s_wn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                    INTERPRET: tl.constexpr):
    # block b holds rows brow[b] .. brow[b] + bn[b] - 1 of the expert-sorted pairs (all of expert bexp[b]):
    # one tl.dot tile per block, so a row's K-order never depends on which rows share its tile
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + b).to(tl.int64)
    r0 = tl.load(brow_ptr + b)
    nr = tl.load(bn_ptr + b)
    rm = tl.arange(0, BM)
    mrow = rm < nr
    pair = tl.load(order_ptr + r0 + rm, mask=mrow, other=0).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_end = tl.where(nr > 0, K, 0)
    if INTERPRET:
        k0 = K * 0
        while k0 < k_end:
            acc = _bi_mm_step(x_ptr, w_ptr + e * s_we, acc, pair, mrow, rn, rk, k0, N, K, s_xp, s_wn, PREC)
            k0 += BK
    else:
        for k0 in range(0, k_end, BK):
            acc = _bi_mm_step(x_ptr, w_ptr + e * s_we, acc, pair, mrow, rn, rk, k0, N, K, s_xp, s_wn, PREC)
    tl.store(y_ptr + pair[:, None] * N + rn[None, :], acc, mask=mrow[:, None] & (rn[None, :] < N))


def bi_rows_matmul(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[expert[r]]^T, fp32. x: [P, K]; w: [E, N, K]. Rows sorted by expert (stable) and cut into
    blocks of ROWS_BM rows of one expert (vLLM's moe_align_block_size, on the device: no host sync, so it runs under
    CUDA graphs); each block is one fixed-shape tile GEMM, which computes a row the same way whatever rows join it."""
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    x = x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    P, K = x.shape
    E, N = w.shape[:2]
    y = torch.empty(P, N, device=x.device, dtype=torch.float32)
    if P == 0:
        return y
    BM = ROWS_BM
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, expert.long(), torch.ones_like(
        expert, dtype=torch.int64))
    blocks = (counts + BM - 1) // BM
    cum = blocks.cumsum(0)
    first_row = counts.cumsum(0) - counts
    n_blocks = triton.cdiv(P, BM) + E  # an upper bound: sizes stay static
    b = torch.arange(n_blocks, device=x.device)
    bexp = torch.searchsorted(cum, b, right=True).clamp(max=E - 1)
    local = (b - (cum - blocks)[bexp]) * BM
    brow = (first_row[bexp] + local).to(torch.int32)
    bn = torch.where(b < cum[-1], (counts[bexp] - local).clamp(min=0, max=BM), 0).to(torch.int32)
    order = torch.sort(expert.long(), stable=True).indices.to(torch.int32)
    grid = (n_blocks, triton.cdiv(N, ROWS_BN))
    _bi_rows_kernel[grid](x, w, order, bexp.to(torch.int32), brow, bn, y, N, K, x.stride(0), w.stride(0),
                          w.stride(1), BM=BM, BN=ROWS_BN, BK=ROWS_BK,
                          PREC="ieee" if x.dtype == torch.float32 else "tf32", INTERPRET=interpreting(), num_warps=4)
    return y


@triton.jit
def _bi_attn_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, seq_ptr, keys_ptr, o_ptr, scale, H, REP, D, s_tab, BS,
                    s_kr, s_kh, BD: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hk = h // REP
    n = tl.load(seq_ptr + i).to(tl.int64)
    L = tl.load(keys_ptr + i).to(tl.int32)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + (i * H + h) * D + d, mask=dm, other=0.0).to(tl.float32)
    m = tl.full((1,), float("-inf"), tl.float32)
    l_sum = tl.zeros((1,), tl.float32)
    acc = tl.zeros((BD,), tl.float32)
    j0 = 0
    jj = tl.arange(0, TILE)
    while j0 < L:  # a while loop: the interpreter cannot take a runtime bound in range()
        j = j0 + jj
        jm = j < L
        page = tl.load(tab_ptr + n * s_tab + j // BS, mask=jm, other=0).to(tl.int64)
        row = page * BS + j % BS
        km = jm[:, None] & dm[None, :]
        kt = tl.load(k_ptr + row[:, None] * s_kr + hk * s_kh + d[None, :], mask=km, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + row[:, None] * s_kr + hk * s_kh + d[None, :], mask=km, other=0.0).to(tl.float32)
        s = tl.sum(kt * q[None, :], 1) * scale
        s = tl.where(jm, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
        m = m_new
        j0 += TILE
    o = acc / tl.maximum(l_sum, 1e-30)
    if UPCAST:
        o = o.to(tl.float32)
    tl.store(o_ptr + (i * H + h) * D + d, o.to(o_ptr.dtype.element_ty), mask=dm)


def bi_attention(q, k_src, v_src, tables, block_size, q_seq, q_keys, scale) -> torch.Tensor:
    """See `ringlinear.ops.batch_invariant.bi_attention`; k_src, v_src: [R, Hkv, D] with unit head-dim stride."""
    T, H, D = q.shape
    q = q.contiguous()
    o = torch.empty_like(q)
    if T == 0:
        return o
    if k_src.stride(-1) != 1 or v_src.stride() != k_src.stride():
        k_src, v_src = k_src.contiguous(), v_src.contiguous()
    tables = tables.contiguous()
    grid = (T, H)
    _bi_attn_kernel[grid](q, k_src, v_src, tables, q_seq.contiguous(), q_keys.contiguous(), o, float(scale), H,
                          H // k_src.shape[1], D, tables.stride(0), block_size, k_src.stride(0), k_src.stride(1),
                          BD=max(16, triton.next_power_of_2(D)), TILE=ATTN_TILE, UPCAST=interpreting(), num_warps=4)
    return o


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, pool_ptr, slots_ptr, cu_ptr, o_ptr, scale, H, K, V,
                      BK: tl.constexpr, BV: tl.constexpr):
    # q, k: [T, H, K], v: [T, H, V] contiguous; o: [T, H, V] fp32
    pid = tl.program_id(0)
    NV = tl.cdiv(V, BV)
    pid_v, rest = pid % NV, pid // NV
    h, n = rest % H, rest // H
    slot = tl.load(slots_ptr + n).to(tl.int64)
    valid = slot >= 0
    o_k = tl.arange(0, BK)
    o_v = pid_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m = m_k[:, None] & m_v[None, :] & valid
    p_s = pool_ptr + ((slot * H + h) * K + o_k[:, None]) * V + o_v[None, :]
    S = tl.load(p_s, mask=m, other=0.0)
    decay = tl.exp(tl.load(g_ptr + h))
    t = tl.load(cu_ptr + n).to(tl.int64)
    end = tl.load(cu_ptr + n + 1).to(tl.int64)
    while t < end:
        row = t * H + h
        b_k = tl.load(k_ptr + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v_ptr + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_q = tl.load(q_ptr + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        S = S * decay + b_k[:, None] * b_v[None, :]
        b_o = tl.where(valid, tl.sum(b_q[:, None] * S, 0) * scale, 0.0)
        tl.store(o_ptr + row * V + o_v, b_o, mask=m_v)
        t += 1
    tl.store(p_s, S, mask=m)


def recurrent_lightning(q, k, v, g, scale, state_pool, slots, cu_seqlens) -> torch.Tensor:
    """See `ringlinear.ops.batch_invariant.recurrent_lightning`."""
    if not state_pool.is_contiguous():
        raise ValueError("recurrent_lightning: state_pool must be contiguous (it is updated in place)")
    T, H, D = q.shape
    Dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.zeros(T, H, Dv, device=q.device, dtype=torch.float32)
    N = slots.shape[0]
    if N == 0 or T == 0:
        return o.to(q.dtype)
    BK = max(16, triton.next_power_of_2(D))
    BV = max(16, min(32, triton.next_power_of_2(Dv)))
    grid = (triton.cdiv(Dv, BV) * H * N,)
    _recurrent_kernel[grid](q, k, v, g.float().contiguous(), state_pool, slots.contiguous(), cu_seqlens.contiguous(),
                            o, float(scale), H, D, Dv, BK=BK, BV=BV, num_warps=4)
    return o.to(q.dtype)
