"""Fused MoE router in one Triton kernel: logits = x W^T (fp32), s = sigmoid(logits); choose with s + bias (keep the
`topk_group` groups whose top-2 biased scores sum highest, then the top-k experts inside them); weights = s of the
chosen experts, renormalised to sum 1 when `norm_topk_prob`, times `routed_scaling_factor` (DeepSeek-V3 noaux_tc).

Program (token block, expert block, H split) computes a [BLOCK_T, BLOCK_E] tile of partial logits over a fixed
H range with an fp32 FMA dot; the last program of a token block to finish (an atomic arrival count) sums the
partials in split order and makes the choice for the block's tokens. Tiles and splits depend on (E, H) only, so a
token's logits, choice and weights are bit-identical whatever batch it is in. Nothing is read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_T = 16  # tokens per program: tl.dot's smallest M
_NEG = -(1 << 62)  # below every key


@dataclass(frozen=True)
class RouterConfig:
    """Tiling of the logits GEMM. `split_h` (H per program, a multiple of `block_h`) sets the fixed reduction
    order over H; changing any field may change logits in the last bit (never with T)."""

    block_e: int = 16
    block_h: int = 64
    split_h: int = 256
    num_warps: int | None = None  # None: 4, or 8 from 256 experts (the [BLOCK_T, E] choice tile)
    # "fused": logits and choice in one kernel; "split": the same split-H partial logits, then a one-token-per-program
    # choice kernel that sums them in split order (both batch-invariant); "gemm": logits from one cuBLAS fp32 GEMM,
    # then that choice kernel (cuBLAS picks its algorithm by T: a token's logits may differ in the last bit with T)
    logits: str = "fused"


def router_counters(T: int, device) -> torch.Tensor:
    """Arrival counters for `fused_router_topk(..., counters=...)`: [cdiv(T, BLOCK_T)] int32 zeros. The kernel
    leaves them at zero again, so one buffer (sized for the largest T) serves every call and layer of a stream."""
    return torch.zeros(triton.cdiv(max(T, 1), BLOCK_T), dtype=torch.int32, device=device)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every uninitialised buffer the op allocates comes from here (tests swap in a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _key(v, e):
    # An int64 ordered like (v, -e): a larger score is a larger key, and of equal scores the lower expert index.
    # The fp32 bits are flipped into an order-preserving int; v + 0.0 turns -0.0 into +0.0 (they tie in PyTorch).
    b = (v + 0.0).to(tl.int32, bitcast=True)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (b.to(tl.int64) << 16) | (65535 - e).to(tl.int64)


@triton.jit
def _key_value(key):
    b = (key >> 16).to(tl.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _choose(part_ptr, bias_ptr, idx_ptr, wt_ptr, rows, rmask, T, E, scale, BT: tl.constexpr,
            HAS_BIAS: tl.constexpr, K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
            GS: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr, RENORM: tl.constexpr, S_H: tl.constexpr,
            NEG: tl.constexpr):
    # Experts live on a [GP, GSP] grid: expert e = g * GS + j sits at (g, j), so groups are one axis.
    g = tl.arange(0, GP)[None, :, None]
    j = tl.arange(0, GSP)[None, None, :]
    e = g * GS + j
    valid = (g < N_GROUP) & (j < GS)
    r3 = rows[:, None, None].to(tl.int64)
    m3 = rmask[:, None, None] & valid
    logit = tl.zeros([BT, GP, GSP], tl.float32)
    for sp in range(S_H):  # the partial sums, in split order
        logit += tl.load(part_ptr + (sp * T + r3) * E + e, mask=m3, other=0.0, cache_modifier=".cg")
    score = tl.sigmoid(logit)
    choice = score
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, _key(choice, e), NEG)
    if N_GROUP > 1:
        k1 = tl.max(key, axis=2)  # each group's best (value, index)
        k2 = tl.max(tl.where(key == k1[:, :, None], NEG, key), axis=2)  # and its second
        gi = tl.arange(0, GP)[None, :]
        gkey = tl.where(gi < N_GROUP, _key(_key_value(k1) + _key_value(k2), gi), NEG)
        keep = gkey != gkey  # all False, [BT, GP]
        for _ in tl.static_range(TOPK_GROUP):
            m = tl.max(gkey, axis=1)
            hit = (gkey == m[:, None]) & (m[:, None] > NEG)
            keep = keep | hit
            gkey = tl.where(hit, NEG, gkey)
        key = tl.where(keep[:, :, None], key, NEG)
    chosen = key != key  # all False, [BT, GP, GSP]
    for _ in tl.static_range(K):
        m = tl.max(tl.max(key, axis=2), axis=1)
        hit = (key == m[:, None, None]) & (m[:, None, None] > NEG)
        chosen = chosen | hit
        key = tl.where(hit, NEG, key)
    w = tl.where(chosen, score, 0.0)
    if RENORM:
        w = w / (tl.sum(tl.sum(w, axis=2), axis=1)[:, None, None] + 1e-20)
    w = w * scale
    # slot of a chosen expert = number of chosen experts with a lower index: outputs come sorted by expert
    c = chosen.to(tl.int32)
    per_group = tl.sum(c, axis=2)
    slot = (tl.cumsum(per_group, axis=1) - per_group)[:, :, None] + tl.cumsum(c, axis=2) - 1
    out = r3 * K + slot
    omask = chosen & rmask[:, None, None]
    tl.store(idx_ptr + out, (e + 0 * slot).to(tl.int64), mask=omask)
    tl.store(wt_ptr + out, w, mask=omask)


@triton.jit
def _select_kernel(logits_ptr, bias_ptr, idx_ptr, wt_ptr, T, E, scale, HAS_BIAS: tl.constexpr, K: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GS: tl.constexpr, GP: tl.constexpr,
                   GSP: tl.constexpr, RENORM: tl.constexpr, S_H: tl.constexpr):
    # One token per program, fp32 scores on a [GP, GSP] grid (expert e = g * GS + j); a pick is the highest score
    # among the experts not yet taken, ties to the lowest index (NaN scores count as -inf, so a NaN token still
    # picks k distinct experts and gets NaN weights).
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)[:, None]
    j = tl.arange(0, GSP)[None, :]
    e = g * GS + j
    valid = (g < N_GROUP) & (j < GS)
    logit = tl.zeros([GP, GSP], tl.float32)
    for sp in tl.static_range(S_H):  # the partial sums over H, in split order ([S_H, T, E]; one for a GEMM's logits)
        logit += tl.load(logits_ptr + (sp * T + t) * E + e, mask=valid, other=0.0)
    score = tl.sigmoid(logit)
    c = score
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    c = tl.where(valid & (c == c), c, float("-inf"))
    BIG: tl.constexpr = GP * GSP + GP
    if N_GROUP > 1:
        m1 = tl.max(c, axis=1)
        i1 = tl.min(tl.where(c == m1[:, None], j, BIG), axis=1)
        m2 = tl.max(tl.where(j == i1[:, None], float("-inf"), c), axis=1)
        gi = tl.arange(0, GP)
        gs = tl.where(gi < N_GROUP, m1 + m2, float("-inf"))
        gs = tl.where(gs == gs, gs, float("-inf"))
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            m = tl.max(tl.where(keep, float("-inf"), gs), axis=0)
            pick = tl.min(tl.where((gs == m) & ~keep & (gi < N_GROUP), gi, BIG), axis=0)
            keep = keep | (gi == pick)
        c = tl.where(keep[:, None], c, float("-inf"))
    chosen = e < 0
    for _ in tl.static_range(K):
        m = tl.max(tl.max(tl.where(chosen, float("-inf"), c), axis=1), axis=0)
        pick = tl.min(tl.min(tl.where((c == m) & ~chosen & valid, e, BIG), axis=1), axis=0)
        chosen = chosen | (e == pick)
    w = tl.where(chosen, score, 0.0)
    if RENORM:
        w = w / (tl.sum(tl.sum(w, axis=1), axis=0) + 1e-20)
    w = w * scale
    ci = chosen.to(tl.int32)
    per_group = tl.sum(ci, axis=1)
    slot = (tl.cumsum(per_group, axis=0) - per_group)[:, None] + tl.cumsum(ci, axis=1) - 1
    tl.store(idx_ptr + t * K + slot, e.to(tl.int64), mask=chosen)
    tl.store(wt_ptr + t * K + slot, w, mask=chosen)


@triton.jit
def _router_kernel(x_ptr, w_ptr, bias_ptr, part_ptr, cnt_ptr, idx_ptr, wt_ptr, T, H, E, stride_x, stride_w, scale,
                   HAS_BIAS: tl.constexpr, K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                   GS: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr, RENORM: tl.constexpr,
                   BT: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr, SPLIT_H: tl.constexpr, S_H: tl.constexpr,
                   NEG: tl.constexpr, CHOOSE: tl.constexpr):
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    eb = pid // S_H
    sp = pid % S_H
    rows = tb * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = eb * BE + tl.arange(0, BE)
    cmask = cols < E
    hk = tl.arange(0, BH)
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_x
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BT, BE], tl.float32)
    for i in range(SPLIT_H // BH):  # this split's H range, in order
        hh = sp * SPLIT_H + i * BH + hk
        hm = hh < H
        a = tl.load(x_base + hh[None, :], mask=rmask[:, None] & hm[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_base + hh[None, :], mask=cmask[:, None] & hm[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    tl.store(part_ptr + (sp * T + rows[:, None]).to(tl.int64) * E + cols[None, :], acc,
             mask=rmask[:, None] & cmask[None, :])
    if CHOOSE:
        # Publish the tile, then count arrivals; the last program of this token block sees every tile (acq_rel
        # atomic after a CTA barrier, partials read through L2) and chooses, then re-arms the counter.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tb, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            _choose(part_ptr, bias_ptr, idx_ptr, wt_ptr, rows, rmask, T, E, scale, BT, HAS_BIAS, K, N_GROUP,
                    TOPK_GROUP, GS, GP, GSP, RENORM, S_H, NEG)
            tl.atomic_xchg(cnt_ptr + tb, 0)


def _check(x, weight, expert_bias, top_k, n_group, topk_group, counters, config):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_router_topk: need x [T, H] and weight [E, H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    E = weight.shape[0]
    if x.device != weight.device:
        raise ValueError(f"fused_router_topk: x is on {x.device}, weight on {weight.device}")
    if not (1 <= E <= 65535):
        raise ValueError(f"fused_router_topk: weight has {E} experts; need 1..65535")
    if expert_bias is not None and expert_bias.shape != (E,):
        raise ValueError(f"fused_router_topk: expert_bias must be [{E}], got {tuple(expert_bias.shape)}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"fused_router_topk: n_group={n_group} must be >= 1 and divide the {E} experts")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"fused_router_topk: n_group={n_group} leaves {E // n_group} expert per group; the group "
                         "score needs 2")
    if not (1 <= topk_group <= n_group):
        raise ValueError(f"fused_router_topk: topk_group={topk_group} must be in [1, n_group={n_group}]")
    kept = topk_group * (E // n_group) if n_group > 1 else E
    if not (1 <= top_k <= kept):
        raise ValueError(f"fused_router_topk: top_k={top_k} must be in [1, {kept}] (experts in the kept groups)")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < triton.cdiv(x.shape[0], BLOCK_T)
                                 or counters.device != x.device):
        raise ValueError(f"fused_router_topk: counters must be int32 zeros on {x.device} with at least "
                         f"cdiv(T, {BLOCK_T}) = {triton.cdiv(x.shape[0], BLOCK_T)} entries (see router_counters)")
    if config.logits not in ("fused", "split", "gemm"):
        raise ValueError(f"fused_router_topk: config.logits={config.logits!r} must be 'fused', 'split' or 'gemm'")
    for name in ("block_e", "block_h"):
        v = getattr(config, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"fused_router_topk: config.{name}={v} must be a power of two >= 16")
    if config.split_h < config.block_h or config.split_h % config.block_h:
        raise ValueError(f"fused_router_topk: config.split_h={config.split_h} must be a multiple of "
                         f"block_h={config.block_h}")


def fused_router_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    counters: torch.Tensor | None = None,
    config: RouterConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] (bf16/fp16/fp32), weight: [E, H] (fp32; read as fp32), expert_bias: [E] or None ->
    (topk_idx [T, k] int64 sorted ascending, topk_weight [T, k] fp32). Same contract and tie rule as
    `naive_router_topk` (equal scores -> lower expert index; equal group scores -> lower group index).
    `counters`: optional reusable arrival counters from `router_counters` (else a zeroed buffer per call)."""
    config = config or RouterConfig()
    _check(x, weight, expert_bias, top_k, n_group, topk_group, counters, config)
    T, H = x.shape
    E = weight.shape[0]
    idx = _empty((T, top_k), torch.int64, x.device)
    wt = _empty((T, top_k), torch.float32, x.device)
    if T == 0:
        return idx, wt
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("fused_router_topk: weight needs a unit stride on H")
    n_tb = triton.cdiv(T, BLOCK_T)
    gs = E // n_group
    gp, gsp = triton.next_power_of_2(n_group), triton.next_power_of_2(gs)
    num_warps = config.num_warps or (8 if BLOCK_T * gp * gsp >= 4096 else 4)
    if config.logits == "gemm":
        logits = torch.mm(x.float(), weight.t())
        _select(logits, 1, expert_bias, weight, idx, wt, T, E, top_k, n_group, topk_group, gs, gp, gsp,
                norm_topk_prob, routed_scaling_factor)
        return idx, wt
    if counters is None:
        counters = torch.zeros(n_tb, dtype=torch.int32, device=x.device)
    split_h = min(config.split_h, triton.cdiv(H, config.block_h) * config.block_h)
    s_h = triton.cdiv(H, split_h)
    part = _empty((s_h, T, E), torch.float32, x.device)
    grid = (triton.cdiv(E, config.block_e) * s_h, n_tb)
    choose = config.logits == "fused"
    _router_kernel[grid](
        x, weight, expert_bias if expert_bias is not None else weight, part, counters, idx, wt,
        T, H, E, x.stride(0), weight.stride(0), float(routed_scaling_factor),
        HAS_BIAS=expert_bias is not None, K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, GS=gs, GP=gp, GSP=gsp,
        RENORM=bool(norm_topk_prob), BT=BLOCK_T, BE=config.block_e, BH=config.block_h, SPLIT_H=split_h, S_H=s_h,
        NEG=_NEG, CHOOSE=choose, num_warps=num_warps if choose else 4)
    if not choose:  # "split": the partial logits summed in split order by the one-token choice kernel
        _select(part, s_h, expert_bias, weight, idx, wt, T, E, top_k, n_group, topk_group, gs, gp, gsp,
                norm_topk_prob, routed_scaling_factor)
    return idx, wt


def _select(part, s_h, expert_bias, weight, idx, wt, T, E, top_k, n_group, topk_group, gs, gp, gsp, norm_topk_prob,
            routed_scaling_factor) -> None:
    _select_kernel[(T,)](
        part, expert_bias if expert_bias is not None else weight, idx, wt, T, E, float(routed_scaling_factor),
        HAS_BIAS=expert_bias is not None, K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, GS=gs, GP=gp, GSP=gsp,
        RENORM=bool(norm_topk_prob), S_H=s_h, num_warps=1 if gp * gsp <= 512 else 4)
