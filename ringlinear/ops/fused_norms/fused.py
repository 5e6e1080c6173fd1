"""Triton kernels of the fused inference norms, forward only, each one launch that reads its inputs once and
writes each output once, computing in fp32 (see `naive.py` for the compositions they replace):

- `fused_qk_norm_rope`: program (token block, block of HEADS_PER_PROGRAM heads) of q, k or v; a head row is
  held as its rotary halves x1, x2 and the rest, so RoPE needs no permutation and cos/sin are computed once per
  (token, frequency) for all heads of the program.
- `fused_group_rmsnorm_gate`: program (row block, group).
- `fused_add_rmsnorm`: program (row block), the whole row in registers.

Tiles depend on the widths only, never on T, so a token's outputs are the same bits whatever batch holds it.
No host reads: every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.fused_norms import (
    check_add_rmsnorm_inputs,
    check_group_rmsnorm_gate_inputs,
    check_qk_norm_rope_inputs,
)
from ringlinear.ops.triton_common import round_cast

# elements per program tile (rows per tile = TILE // padded row width), heads per qk_norm_rope program (the
# largest power of two up to this that divides both head counts). Fixed: interpreter-safe and batch-invariant;
# not yet swept on the device (benchmarks/bench_fused_norms.py times them).
CONFIG = {"TILE": 1024, "HEADS_PER_PROGRAM": 4}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the ops allocate comes from here (tests swap in a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _warps(tile: int) -> int:
    return min(16, max(4, tile // 512))


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _store_head(out_ptr, y1, y2, yr, rt, lh, T, NH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                BH: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # y1, y2, yr: [BT, HB, BH | BR] fp32 -> out[t, lh, :] of a contiguous [T, NH, D] tensor, rounded once
    c1 = tl.arange(0, BH)[None, None, :]
    cr = tl.arange(0, BR)[None, None, :]
    tm = (rt < T)[:, None, None]
    base = out_ptr + rt.to(tl.int64)[:, None, None] * (NH * D) + (lh * D)[None, :, None]
    dt: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(base + c1, round_cast(y1, dt, UPCAST), mask=tm & (c1 < HALF))
    tl.store(base + HALF + c1, round_cast(y2, dt, UPCAST), mask=tm & (c1 < HALF))
    tl.store(base + 2 * HALF + cr, round_cast(yr, dt, UPCAST), mask=tm & (cr < D - 2 * HALF))


@triton.jit
def _norm_rope_store(x1, x2, xr, w_ptr, pos_ptr, freq_ptr, out_ptr, rt, lh, T, eps, scaling, NH: tl.constexpr,
                     D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr,
                     UPCAST: tl.constexpr):
    c1 = tl.arange(0, BH)
    cr = tl.arange(0, BR)
    if NORM:  # h * rsqrt(mean(h^2) + eps) * w, as naive_rmsnorm
        ss = tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2) + tl.sum(xr * xr, axis=2)
        rstd = (1.0 / tl.sqrt(ss / D + eps))[:, :, None]
        w1 = tl.load(w_ptr + c1, mask=c1 < HALF, other=0.0).to(tl.float32)[None, None, :]
        w2 = tl.load(w_ptr + HALF + c1, mask=c1 < HALF, other=0.0).to(tl.float32)[None, None, :]
        wr = tl.load(w_ptr + 2 * HALF + cr, mask=cr < D - 2 * HALF, other=0.0).to(tl.float32)[None, None, :]
        x1 = x1 * rstd * w1
        x2 = x2 * rstd * w2
        xr = xr * rstd * wr
    # angles as RotaryEmbedding: fp32(position) * inv_freq, one rounding; cos, sin once per (token, frequency)
    pos = tl.load(pos_ptr + rt, mask=rt < T, other=0).to(tl.float32)
    freq = tl.load(freq_ptr + c1, mask=c1 < HALF, other=0.0).to(tl.float32)
    angle = pos[:, None] * freq[None, :]
    cos = (tl.cos(angle) * scaling)[:, None, :]
    sin = (tl.sin(angle) * scaling)[:, None, :]
    _store_head(out_ptr, x1 * cos - x2 * sin, x2 * cos + x1 * sin, xr, rt, lh, T, NH, D, HALF, BH, BR, UPCAST)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr, T, stride_t, eps, scaling,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr,
                         HB: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, NORM_Q: tl.constexpr,
                         NORM_K: tl.constexpr, SILU: tl.constexpr, UPCAST: tl.constexpr):
    # heads [head0, head0 + HB) of the row: all q (head0 < H), all k, or all v (HB divides H and HKV)
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    head0 = tl.program_id(1) * HB
    rh = tl.arange(0, HB)
    c1 = tl.arange(0, BH)[None, None, :]
    cr = tl.arange(0, BR)[None, None, :]
    tm = (rt < T)[:, None, None]
    m1 = tm & (c1 < HALF)
    base = qkv_ptr + rt.to(tl.int64)[:, None, None] * stride_t + ((head0 + rh) * D)[None, :, None]
    x1 = tl.load(base + c1, mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + c1, mask=m1, other=0.0).to(tl.float32)
    xr = tl.load(base + 2 * HALF + cr, mask=tm & (cr < D - 2 * HALF), other=0.0).to(tl.float32)
    if SILU:
        x1, x2, xr = _silu(x1), _silu(x2), _silu(xr)
    if head0 < H:
        _norm_rope_store(x1, x2, xr, qw_ptr, pos_ptr, freq_ptr, q_ptr, rt, head0 + rh, T, eps, scaling, H, D, HALF,
                         BH, BR, NORM_Q, UPCAST)
    elif head0 < H + HKV:
        _norm_rope_store(x1, x2, xr, kw_ptr, pos_ptr, freq_ptr, k_ptr, rt, head0 - H + rh, T, eps, scaling, HKV, D,
                         HALF, BH, BR, NORM_K, UPCAST)
    else:
        _store_head(v_ptr, x1, x2, xr, rt, head0 - H - HKV + rh, T, HKV, D, HALF, BH, BR, UPCAST)


def heads_per_program(num_heads: int, num_kv_heads: int) -> int:
    hb = CONFIG["HEADS_PER_PROGRAM"]
    while num_heads % hb or num_kv_heads % hb:
        hb //= 2
    return hb


def fused_qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                       attention_scaling: float = 1.0, silu: bool = False,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`naive_qk_norm_rope` in one launch (forward only; qkv rows may be strided, its columns contiguous)."""
    check_qk_norm_rope_inputs(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight, positions, inv_freq,
                              rotary_dim, out_dtype)
    H, HKV, D = num_heads, num_kv_heads, head_dim
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    T, dev = qkv.shape[0], qkv.device
    dt = out_dtype or qkv.dtype
    q, k, v = _empty((T, H, D), dt, dev), _empty((T, HKV, D), dt, dev), _empty((T, HKV, D), dt, dev)
    if T == 0:
        return q, k, v
    half = rotary_dim // 2
    BH, BR = triton.next_power_of_2(half), triton.next_power_of_2(max(1, D - rotary_dim))
    HB = heads_per_program(H, HKV)
    BT = _pow2_floor(CONFIG["TILE"] // (HB * (2 * BH + BR)))
    grid = (triton.cdiv(T, BT), (H + 2 * HKV) // HB)
    _qk_norm_rope_kernel[grid](
        qkv, q_weight if q_weight is not None else qkv, k_weight if k_weight is not None else qkv,
        positions.contiguous(), inv_freq.contiguous(), q, k, v, T, qkv.stride(0), float(eps), float(attention_scaling),
        H=H, HKV=HKV, D=D, HALF=half, BT=BT, HB=HB, BH=BH, BR=BR, NORM_Q=q_weight is not None,
        NORM_K=k_weight is not None, SILU=bool(silu), UPCAST=interpreting(), num_warps=_warps(BT * HB * (2 * BH + BR)))
    return q, k, v


@triton.jit
def _group_rmsnorm_gate_kernel(o_ptr, w_ptr, g_ptr, y_ptr, T, so, sg, eps, N: tl.constexpr, W: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    col = tl.program_id(1) * N + tl.arange(0, BN)
    cm = tl.arange(0, BN) < N
    m = (rm < T)[:, None] & cm[None, :]
    r64 = rm.to(tl.int64)[:, None]
    x = tl.load(o_ptr + r64 * so + col[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r64 * sg + col[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=cm, other=0.0).to(tl.float32)[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    # the layer's roundings: g_norm's output and sigmoid's are each in the dtype before the product
    normed = round_cast(x * rstd[:, None] * w, dt, UPCAST).to(tl.float32)
    gate = round_cast(1.0 / (1.0 + tl.exp(-g)), dt, UPCAST).to(tl.float32)
    tl.store(y_ptr + r64 * W + col[None, :], round_cast(normed * gate, dt, UPCAST), mask=m)


def fused_group_rmsnorm_gate(o: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                             gate: torch.Tensor) -> torch.Tensor:
    """`naive_group_rmsnorm_gate` in one launch (forward only; rows may be strided, columns contiguous)."""
    check_group_rmsnorm_gate_inputs(o, weight, groups, gate)
    o = o if o.stride(1) == 1 else o.contiguous()
    gate = gate if gate.stride(1) == 1 else gate.contiguous()
    T, W = o.shape
    y = _empty((T, W), o.dtype, o.device)
    if T == 0 or W == 0:
        return y
    N = W // groups
    BN = triton.next_power_of_2(N)
    BM = _pow2_floor(CONFIG["TILE"] // BN)
    _group_rmsnorm_gate_kernel[(triton.cdiv(T, BM), groups)](o, weight, gate, y, T, o.stride(0), gate.stride(0),
                                                            float(eps), N=N, W=W, BM=BM, BN=BN, UPCAST=interpreting(),
                                                            num_warps=_warps(BM * BN))
    return y


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, M, sx, sr, eps, N: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    cm = rn < N
    m = (rm < M)[:, None] & cm[None, :]
    r64 = rm.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sx + rn[None, :], mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + r64 * sr + rn[None, :], mask=m, other=0.0).to(tl.float32)
    dt: tl.constexpr = h_ptr.dtype.element_ty
    h = round_cast(r + x, dt, UPCAST)  # the residual stream stays in its dtype, as `x = x + attn(...)`
    tl.store(h_ptr + r64 * N + rn[None, :], h, mask=m)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / N + eps)
    w = tl.load(w_ptr + rn, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64 * N + rn[None, :], round_cast(hf * rstd[:, None] * w, dt, UPCAST), mask=m)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_add_rmsnorm` in one launch (forward only): returns (normed, new_residual), new tensors."""
    check_add_rmsnorm_inputs(x, residual, weight)
    shape, N = x.shape, x.shape[-1]
    x2, r2 = x.reshape(-1, N), residual.reshape(-1, N)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    M = x2.shape[0]
    y, h = _empty((M, N), x.dtype, x.device), _empty((M, N), x.dtype, x.device)
    if M and N:
        BN = triton.next_power_of_2(N)
        BM = _pow2_floor(CONFIG["TILE"] // BN)
        _add_rmsnorm_kernel[(triton.cdiv(M, BM),)](x2, r2, weight, y, h, M, x2.stride(0), r2.stride(0), float(eps),
                                                   N=N, BM=BM, BN=BN, UPCAST=interpreting(), num_warps=_warps(BM * BN))
    return y.view(shape), h.view(shape)
