"""Fused routed SwiGLU experts for decode: y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tj,
reading each touched expert's weights once per block of up to BLOCK_M of its pairs, i.e. once per call at decode
sizes (Triton; the scheme of vLLM's fused_moe, on our stacked, unconcatenated weights).

Four launches, none reading back to the host (CUDA-graph safe): (1) one program sorts the T*k (token, slot) pairs
by expert, stably, into BLOCK_M-padded blocks in fixed-size buffers; (2) program (block, I tile) computes the gate
and up tiles of its expert from the two weight tensors and stores h = silu(g) * u; (3) program (block, H tile)
computes w * (h W_down^T) in fp32 into the pair's own row; (4) program (token, H tile) sums its k rows in slot
order in fp32 and rounds once. Batch-invariant per token for a fixed config: a tile row is computed by the same
instruction sequence whatever the other rows hold, and no order depends on T.

FP8 weights (`w_scales`: e4m3 experts with one fp32 scale per 128x128 block, the engine's FP8 mode): each weight
tile is upcast in registers (exact: e4m3 values are bf16 values), the dot runs in fp32 and its block's scale
multiplies that partial sum; half the weight bytes of bf16, activations as they are (W8A16).
Expert parallel (`expert_offset`): a rank holding experts [offset, offset + E) passes the global ids; the others
add nothing, so each rank's output is its part of the sum (`ringlinear.distributed.tensor_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.moe import DECODE_MAX_PAIRS as MAX_PAIRS
from ringlinear.ops.triton_common import exact_dot, round_cast


@dataclass(frozen=True)
class FusedMoEConfig:
    """Tiles and launch shapes. `block_m` pairs per block (tl.dot's M, >= 16); gate/up tiles run over I
    (`gate_up_block_n`) and reduce over H (`gate_up_block_k`); down tiles run over H and reduce over I. Defaults:
    the H200 sweep of `benchmarks/bench_moe.py --sweep` at Ring-mini shapes, T = 8 and 64 (NOTES_kernels.md)."""

    block_m: int = 16
    gate_up_block_n: int = 32
    gate_up_block_k: int = 64
    gate_up_warps: int = 8
    gate_up_stages: int = 3
    down_block_n: int = 128
    down_block_k: int = 128
    down_warps: int = 4
    down_stages: int = 3



def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the op allocates comes from here (tests swap in a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def max_blocks(T: int, k: int, E: int, block_m: int) -> int:
    """Blocks the alignment can produce for T*k pairs over E experts: each touched expert (at most min(T*k, E))
    pads its pairs up to a multiple of block_m."""
    n = T * k
    return triton.cdiv(n + min(n, E) * (block_m - 1), block_m)


@triton.jit
def _align_kernel(idx_ptr, sorted_ptr, block_expert_ptr, off_ptr, N, E, NUM_BLOCKS, OFFSET,
                  BM: tl.constexpr, E_PAD: tl.constexpr, NP: tl.constexpr, FILL: tl.constexpr):
    # One program. sorted[p] = pair index t*k + j at padded position p (N = padding), pairs in (expert, pair)
    # order; expert e owns positions [start_e, start_e + cdiv(count_e, BM) * BM). block_expert[b] = owner of
    # block b, or -1 past the last block (those programs return at once). Out-of-range ids are left out.
    # Integer counting and one sort of the unique keys (expert, pair): nothing depends on scheduling.
    r = tl.arange(0, NP)
    e = tl.arange(0, E_PAD)
    fb = tl.arange(0, FILL)
    ex = tl.load(idx_ptr + r, mask=r < N, other=0).to(tl.int32) - OFFSET
    ok = (r < N) & (ex >= 0) & (ex < E)
    ex = tl.where(ok, ex, 0)
    counts = tl.histogram(ex, E_PAD, mask=ok)
    padded = (counts + BM - 1) // BM * BM
    start = tl.cumsum(padded, axis=0) - padded  # first padded slot of each expert
    first = tl.cumsum(counts, axis=0) - counts  # rank of each expert's first pair in the sorted order
    n_blocks = tl.sum(padded, axis=0) // BM
    tl.store(off_ptr + e, start - first)
    # block -> expert: each expert writes its own blocks, the tail gets -1
    nb = padded // BM
    j = 0
    while j < tl.max(nb, axis=0):  # while loops: the interpreter cannot take a runtime bound in range()
        tl.store(block_expert_ptr + start // BM + j, e, mask=j < nb)
        j += 1
    b0 = n_blocks
    while b0 < NUM_BLOCKS:
        tl.store(block_expert_ptr + b0 + fb, -1 + 0 * fb, mask=b0 + fb < NUM_BLOCKS)
        b0 += FILL
    p0 = 0
    while p0 < n_blocks * BM:
        tl.store(sorted_ptr + p0 + fb, N + 0 * fb, mask=p0 + fb < n_blocks * BM)
        p0 += FILL
    tl.debug_barrier()  # padding and offsets land before the pairs are placed
    # sorted rank q of pair (e, p) -> slot start_e + (q - first_e)
    key = tl.sort(tl.where(ok, (ex << 16) | r, 0x7FFFFFFF))
    placed = key != 0x7FFFFFFF
    ke = key >> 16
    slot = tl.load(off_ptr + ke, mask=placed, other=0) + r
    tl.store(sorted_ptr + slot, key & 0xFFFF, mask=placed)


@triton.jit
def _load_tile(ptrs, rmask, cmask, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr, POLICY: tl.constexpr):
    # a [R, C] tile, masking only the dims that have a tail (a mask-free K keeps the loads vectorised)
    if EVEN_R and EVEN_C:
        return tl.load(ptrs, eviction_policy=POLICY)
    elif EVEN_C:
        return tl.load(ptrs, mask=rmask[:, None], other=0.0, eviction_policy=POLICY)
    elif EVEN_R:
        return tl.load(ptrs, mask=cmask[None, :], other=0.0, eviction_policy=POLICY)
    else:
        return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0, eviction_policy=POLICY)


def align_by_expert(topk_idx: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, k] -> (sorted_ids [max_blocks * block_m] int32, block_expert [max_blocks] int32), on the device
    with no host sync. Pair p = t*k + j; expert e's pairs sit in ascending p order in its own run of whole blocks
    (padding slots hold T*k); block_expert[b] is the expert of block b, -1 for the unused tail (see `max_blocks`).
    Ids are taken relative to `expert_offset`; those outside [0, num_experts) then are left out."""
    T, k = topk_idx.shape
    n = T * k
    nb = max_blocks(T, k, num_experts, block_m)
    if n > MAX_PAIRS or num_experts > 32767:
        raise ValueError(f"align_by_expert: topk_idx has {n} pairs over {num_experts} experts; the one-program sort "
                         f"takes at most {MAX_PAIRS} pairs and 32767 experts (this is the decode path)")
    e_pad = triton.next_power_of_2(num_experts)
    sorted_ids = _empty((nb * block_m,), torch.int32, topk_idx.device)
    block_expert = _empty((nb,), torch.int32, topk_idx.device)
    offsets = _empty((e_pad,), torch.int32, topk_idx.device)
    if nb:
        np_ = triton.next_power_of_2(n)
        _align_kernel[(1,)](topk_idx.contiguous().view(-1), sorted_ids, block_expert, offsets, n, num_experts, nb,
                            expert_offset, BM=block_m, E_PAD=e_pad, NP=np_, FILL=256, num_warps=4 if np_ <= 2048 else 8)
    return sorted_ids, block_expert


@triton.jit
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, sorted_ptr, block_expert_ptr, N, stride_x,
                    stride_we, stride_wi, H: tl.constexpr, FF: tl.constexpr, TOP_K: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, W_FP8: tl.constexpr):
    # h[block rows, n tile] = silu(x W_gate[e]^T) * (x W_up[e]^T), all BM rows (padding rows give 0)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(FF, BN)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(block_expert_ptr + blk)
    if e < 0:
        return
    m = tl.arange(0, BM)
    pair = tl.load(sorted_ptr + blk * BM + m)
    real = pair < N
    tok = tl.where(real, pair // TOP_K, 0)
    n = nt * BN + tl.arange(0, BN)
    nmask = n < FF
    kk = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_x + kk[None, :]
    w_off = e.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wi + kk[None, :]
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    # FP8: the scales of [E, cdiv(FF, 128), cdiv(H, 128)] blocks, one per weight row of the tile and K step
    KB = tl.cdiv(H, 128)
    s_off = e.to(tl.int64) * tl.cdiv(FF, 128) * KB + (n // 128) * KB
    for k0 in range(0, H, BK):
        kmask = k0 + kk < H
        # weights stream through once (evict first); x rows are reread by every program of the block
        a = _load_tile(a_ptrs + k0, real, kmask, False, EVEN_K, "evict_last")
        bg = _load_tile(wg_ptr + w_off + k0, nmask, kmask, EVEN_N, EVEN_K, "evict_first")
        bu = _load_tile(wu_ptr + w_off + k0, nmask, kmask, EVEN_N, EVEN_K, "evict_first")
        if W_FP8:  # BK divides 128: the step lies in one scale block
            zero = tl.zeros([BM, BN], tl.float32)
            sg = tl.load(sg_ptr + s_off + k0 // 128, mask=nmask, other=0.0)
            su = tl.load(su_ptr + s_off + k0 // 128, mask=nmask, other=0.0)
            acc_g += exact_dot(a, tl.trans(bg.to(a.dtype)), zero, DOT_PREC, UPCAST) * sg[None, :]
            acc_u += exact_dot(a, tl.trans(bu.to(a.dtype)), zero, DOT_PREC, UPCAST) * su[None, :]
        else:
            acc_g = exact_dot(a, tl.trans(bg), acc_g, DOT_PREC, UPCAST)
            acc_u = exact_dot(a, tl.trans(bu), acc_u, DOT_PREC, UPCAST)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + (blk * BM + m)[:, None].to(tl.int64) * FF + n[None, :], round_cast(h, h_ptr.dtype.element_ty, UPCAST),
             mask=nmask[None, :])


@triton.jit
def _down_kernel(h_ptr, wd_ptr, sd_ptr, tw_ptr, ys_ptr, sorted_ptr, block_expert_ptr, N, stride_we, stride_wh,
                 H: tl.constexpr, FF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 W_FP8: tl.constexpr):
    # ys[pair, n tile] = w_pair * (h[row] W_down[e]^T) in fp32, for the block's real pairs
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BN)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(block_expert_ptr + blk)
    if e < 0:
        return
    m = tl.arange(0, BM)
    pair = tl.load(sorted_ptr + blk * BM + m)
    real = pair < N
    n = nt * BN + tl.arange(0, BN)
    nmask = n < H
    kk = tl.arange(0, BK)
    a_ptrs = h_ptr + (blk * BM + m)[:, None].to(tl.int64) * FF + kk[None, :]
    w_off = e.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wh + kk[None, :]
    acc = tl.zeros([BM, BN], tl.float32)
    KB = tl.cdiv(FF, 128)
    s_off = e.to(tl.int64) * tl.cdiv(H, 128) * KB + (n // 128) * KB
    for k0 in range(0, FF, BK):
        kmask = k0 + kk < FF
        a = _load_tile(a_ptrs + k0, m < BM, kmask, True, EVEN_K, "")  # every row of h was written
        b = _load_tile(wd_ptr + w_off + k0, nmask, kmask, EVEN_N, EVEN_K, "evict_first")
        if W_FP8:
            sd = tl.load(sd_ptr + s_off + k0 // 128, mask=nmask, other=0.0)
            acc += exact_dot(a, tl.trans(b.to(a.dtype)), tl.zeros([BM, BN], tl.float32), DOT_PREC, UPCAST) * sd[None, :]
        else:
            acc = exact_dot(a, tl.trans(b), acc, DOT_PREC, UPCAST)
    w = tl.load(tw_ptr + pair, mask=real, other=0.0).to(tl.float32)
    pair = tl.where(real, pair, 0).to(tl.int64)
    tl.store(ys_ptr + pair[:, None] * H + n[None, :], acc * w[:, None], mask=real[:, None] & nmask[None, :])


@triton.jit
def _sum_slots_kernel(ys_ptr, idx_ptr, out_ptr, H, E, OFFSET, TOP_K: tl.constexpr, BH: tl.constexpr,
                      UPCAST: tl.constexpr):
    # out[t, h tile] = sum_j ys[t*k + j, h tile], j in order, fp32, one rounding; an out-of-range id adds 0
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = hh < H
    acc = tl.zeros([BH], tl.float32)
    for j in tl.static_range(TOP_K):
        ex = tl.load(idx_ptr + t * TOP_K + j) - OFFSET
        ok = (ex >= 0) & (ex < E)
        acc += tl.load(ys_ptr + (t * TOP_K + j) * H + hh, mask=hm & ok, other=0.0)
    tl.store(out_ptr + t * H + hh, round_cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=hm)


def _check(x, topk_idx, topk_weight, w_gate, w_up, w_down, out, config, w_scales):
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape or w_gate.shape[2] != H:
        raise ValueError(f"fused_moe: w_gate and w_up must both be [E, I, H={H}], got {tuple(w_gate.shape)} and "
                         f"{tuple(w_up.shape)}")
    E, ff, _ = w_gate.shape
    if E < 1 or ff < 1:
        raise ValueError(f"fused_moe: w_gate {tuple(w_gate.shape)} needs at least one expert and I >= 1")
    if w_down.shape != (E, H, ff):
        raise ValueError(f"fused_moe: w_down must be [E, H, I] = {(E, H, ff)}, got {tuple(w_down.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != T or topk_weight.shape != topk_idx.shape:
        raise ValueError(f"fused_moe: topk_idx and topk_weight must be [T={T}, k], got {tuple(topk_idx.shape)} and "
                         f"{tuple(topk_weight.shape)}")
    if T * topk_idx.shape[1] > MAX_PAIRS:
        raise ValueError(f"fused_moe: topk_idx {tuple(topk_idx.shape)} has {T * topk_idx.shape[1]} pairs, more than "
                         f"MAX_PAIRS = {MAX_PAIRS} (the decode path; use routed_experts for larger batches)")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_idx must be int32 or int64, got {topk_idx.dtype}")
    fp8 = w_scales is not None
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != (torch.float8_e4m3fn if fp8 else x.dtype):
            raise ValueError(f"fused_moe: {name} is {w.dtype} but x is {x.dtype}; they must match (or be "
                             "float8_e4m3fn with w_scales)")
        if w.device != x.device:
            raise ValueError(f"fused_moe: {name} is on {w.device} but x on {x.device}")
        if w.stride(2) != 1:
            raise ValueError(f"fused_moe: {name} needs a unit stride on its last dim (no copy is made)")
    if w_up.stride() != w_gate.stride():
        raise ValueError(f"fused_moe: w_gate and w_up need equal strides, got {w_gate.stride()} and {w_up.stride()}")
    if fp8:
        nb = lambda n: -(-n // 128)  # noqa: E731 - 128x128 scale blocks, edges rounded up
        want = {"w_gate": (E, nb(ff), nb(H)), "w_up": (E, nb(ff), nb(H)), "w_down": (E, nb(H), nb(ff))}
        if len(w_scales) != 3:
            raise ValueError("fused_moe: w_scales must be (gate, up, down) block scales")
        for (name, shape), sc in zip(want.items(), w_scales):
            if sc.shape != shape or sc.dtype != torch.float32 or not sc.is_contiguous() or sc.device != x.device:
                raise ValueError(f"fused_moe: the {name} scales must be a contiguous fp32 {shape} tensor on "
                                 f"{x.device}, got {sc.dtype} {tuple(sc.shape)}")
        for f in ("gate_up_block_k", "down_block_k"):
            if getattr(config, f) > 128:
                raise ValueError(f"fused_moe: config.{f}={getattr(config, f)} must be <= 128 with FP8 weights (a K "
                                 "step must lie in one 128-wide scale block)")
    if out is not None and (out.shape != (T, H) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"fused_moe: out must be a contiguous [{T}, {H}] {x.dtype} tensor")
    for f in fields(config):
        v = getattr(config, f.name)
        if f.name.endswith("_warps") or f.name.endswith("_stages"):
            if v < 1:
                raise ValueError(f"fused_moe: config.{f.name}={v} must be >= 1")
        elif v < 16 or v & (v - 1):
            raise ValueError(f"fused_moe: config.{f.name}={v} must be a power of two >= 16 (tl.dot tiles)")


def fused_moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    out: torch.Tensor | None = None,
    config: FusedMoEConfig | None = None,
    w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    expert_offset: int = 0,
) -> torch.Tensor:
    """x: [T, H]; topk_idx [T, k] (int32/int64, in [0, E)), topk_weight [T, k]; w_gate, w_up: [E, I, H];
    w_down: [E, H, I] (x's dtype: bf16 on the GPU, fp32 or bf16 in tests) -> [T, H] in x's dtype (written into
    `out` when given). Any H and I; duplicate ids in a row count twice; ids outside [0, E) add nothing. The decode
    path: T*k at most MAX_PAIRS = 8192 (the alignment sorts all pairs in one program); larger batches belong to
    `routed_experts`. `w_scales`: (gate, up, down) fp32 block scales of e4m3 weights ([E, I/128, H/128] and
    [E, H/128, I/128], edges rounded up; reference: `naive_moe` on the dequantized weights). `expert_offset`: the
    weights are experts [offset, offset + E) of the model; ids are global, those outside add nothing."""
    config = config or FusedMoEConfig()
    _check(x, topk_idx, topk_weight, w_gate, w_up, w_down, out, config, w_scales)
    T, H = x.shape
    k = topk_idx.shape[1]
    E, ff, _ = w_gate.shape
    dev = x.device
    out = out if out is not None else _empty((T, H), x.dtype, dev)
    if T == 0 or H == 0:
        return out
    if k == 0:
        return out.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    idx = topk_idx.contiguous().view(-1)
    tw = topk_weight.contiguous().view(-1)
    N = T * k
    BM = config.block_m
    sorted_ids, block_expert = align_by_expert(idx.view(T, k), E, BM, expert_offset)
    nb = block_expert.numel()
    h = _empty((nb * BM, ff), x.dtype, dev)
    ys = _empty((N, H), torch.float32, dev)
    upcast = interpreting()
    prec = "tf32x3" if x.dtype == torch.float32 else "tf32"
    fp8 = w_scales is not None
    sg, su, sd = w_scales if fp8 else (w_gate, w_up, w_down)  # unread stand-ins without FP8
    bn, bk = config.gate_up_block_n, config.gate_up_block_k
    _gate_up_kernel[(nb * triton.cdiv(ff, bn),)](
        x, w_gate, w_up, sg, su, h, sorted_ids, block_expert, N, x.stride(0), w_gate.stride(0), w_gate.stride(1),
        H=H, FF=ff, TOP_K=k, BM=BM, BN=bn, BK=bk, EVEN_N=ff % bn == 0, EVEN_K=H % bk == 0, DOT_PREC=prec,
        UPCAST=upcast, W_FP8=fp8, num_warps=config.gate_up_warps, num_stages=config.gate_up_stages)
    bn, bk = config.down_block_n, config.down_block_k
    _down_kernel[(nb * triton.cdiv(H, bn),)](
        h, w_down, sd, tw, ys, sorted_ids, block_expert, N, w_down.stride(0), w_down.stride(1),
        H=H, FF=ff, BM=BM, BN=bn, BK=bk, EVEN_N=H % bn == 0, EVEN_K=ff % bk == 0, DOT_PREC=prec,
        UPCAST=upcast, W_FP8=fp8, num_warps=config.down_warps, num_stages=config.down_stages)
    bh = min(1024, triton.next_power_of_2(H))
    _sum_slots_kernel[(T, triton.cdiv(H, bh))](ys, idx, out, H, E, expert_offset, TOP_K=k, BH=bh, UPCAST=upcast,
                                               num_warps=4)
    return out
