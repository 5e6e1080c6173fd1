"""Triton kernels of the fused inference norms, forward only, each one launch that reads its inputs once and
writes each output once, computing in fp32 (see `naive.py` for the compositions they replace):

- `fused_qk_norm_rope`: program (token block, block of HEADS_PER_PROGRAM heads of q, k or v), looping over its
  heads; a head row is held as its rotary halves x1, x2 and the rest, so RoPE needs no permutation, and cos/sin
  are computed once per (token, frequency) for all heads of the program.
- `fused_group_rmsnorm_gate`: program (row block, group); rounds to the dtype where the layer does (the norm's
  output, the sigmoid, the product), so bf16 results are the layer's bits up to last-place differences in
  rsqrt/exp (rounding once instead would leave ~65% of them equal).
- `fused_add_rmsnorm`: program (row block), the whole row in registers; the sum is rounded to the dtype (the
  residual stream) before the norm reads it.

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

# Elements per row-block tile (rows = TILE // padded row width); qk_norm_rope: elements per head tile (tokens =
# QK_TILE // padded head width) and heads per program (the largest power of two up to HEADS_PER_PROGRAM dividing
# both head counts), looped over so cos/sin are computed once for them. Fixed: interpreter-safe and
# batch-invariant; not yet swept on the device (benchmarks/bench_fused_norms.py times them).
CONFIG = {"TILE": 1024, "QK_TILE": 512, "HEADS_PER_PROGRAM": 4}


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
def _norm_rope_head(src, w_ptr, dst, cos, sin, m1, mr, eps, D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr,
                    BR: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, SILU: tl.constexpr,
                    UPCAST: tl.constexpr):
    # one head of BT tokens: src/dst point at its row starts ([BT, 1]); the row is held as its rotary halves
    # x1, x2 ([BT, BH]) and the rest xr ([BT, BR]), so RoPE pairs sit in the same registers
    c1 = tl.arange(0, BH)[None, :]
    cr = tl.arange(0, BR)[None, :]
    x1 = tl.load(src + c1, mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + c1, mask=m1, other=0.0).to(tl.float32)
    xr = tl.load(src + 2 * HALF + cr, mask=mr, other=0.0).to(tl.float32)
    if SILU:
        x1, x2, xr = _silu(x1), _silu(x2), _silu(xr)
    if NORM:  # h * rsqrt(mean(h^2) + eps) * w, as naive_rmsnorm
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xr * xr, axis=1)
        rstd = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        x1 = x1 * rstd * tl.load(w_ptr + c1, mask=c1 < HALF, other=0.0).to(tl.float32)
        x2 = x2 * rstd * tl.load(w_ptr + HALF + c1, mask=c1 < HALF, other=0.0).to(tl.float32)
        xr = xr * rstd * tl.load(w_ptr + 2 * HALF + cr, mask=cr < D - 2 * HALF, other=0.0).to(tl.float32)
    if ROPE:
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    dt: tl.constexpr = dst.dtype.element_ty
    tl.store(dst + c1, round_cast(x1, dt, UPCAST), mask=m1)
    tl.store(dst + HALF + c1, round_cast(x2, dt, UPCAST), mask=m1)
    tl.store(dst + 2 * HALF + cr, round_cast(xr, dt, UPCAST), mask=mr)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, pos_ptr, freq_ptr, q_ptr, k_ptr, v_ptr, T, stride_t, eps, scaling,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr,
                         HB: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, NORM_Q: tl.constexpr,
                         NORM_K: tl.constexpr, SILU: tl.constexpr, UPCAST: tl.constexpr):
    # heads [head0, head0 + HB) of BT tokens: all q (head0 < H), all k, or all v (HB divides H and HKV)
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    head0 = tl.program_id(1) * HB
    tm = (rt < T)[:, None]
    m1 = tm & (tl.arange(0, BH)[None, :] < HALF)
    mr = tm & (tl.arange(0, BR)[None, :] < D - 2 * HALF)
    t64 = rt.to(tl.int64)[:, None]
    src = qkv_ptr + t64 * stride_t + head0 * D
    if head0 < H + HKV:
        # angles as RotaryEmbedding: fp32(position) * inv_freq, one rounding; cos, sin once for the HB heads
        pos = tl.load(pos_ptr + rt, mask=rt < T, other=0).to(tl.float32)
        freq = tl.load(freq_ptr + tl.arange(0, BH), mask=tl.arange(0, BH) < HALF, other=0.0).to(tl.float32)
        angle = pos[:, None] * freq[None, :]
        cos = tl.cos(angle) * scaling
        sin = tl.sin(angle) * scaling
        if head0 < H:
            dst = q_ptr + t64 * (H * D) + head0 * D
            for j in tl.static_range(HB):
                _norm_rope_head(src + j * D, qw_ptr, dst + j * D, cos, sin, m1, mr, eps, D, HALF, BH, BR, NORM_Q,
                                True, SILU, UPCAST)
        else:
            dst = k_ptr + t64 * (HKV * D) + (head0 - H) * D
            for j in tl.static_range(HB):
                _norm_rope_head(src + j * D, kw_ptr, dst + j * D, cos, sin, m1, mr, eps, D, HALF, BH, BR, NORM_K,
                                True, SILU, UPCAST)
    else:
        dst = v_ptr + t64 * (HKV * D) + (head0 - H - HKV) * D
        for j in tl.static_range(HB):
            _norm_rope_head(src + j * D, qw_ptr, dst + j * D, 0.0, 0.0, m1, mr, eps, D, HALF, BH, BR, False, False,
                            SILU, UPCAST)


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
    BT = _pow2_floor(CONFIG["QK_TILE"] // (2 * BH + BR))
    grid = (triton.cdiv(T, BT), (H + 2 * HKV) // HB)
    _qk_norm_rope_kernel[grid](
        qkv, q_weight if q_weight is not None else qkv, k_weight if k_weight is not None else qkv,
        positions.contiguous(), inv_freq.contiguous(), q, k, v, T, qkv.stride(0), float(eps), float(attention_scaling),
        H=H, HKV=HKV, D=D, HALF=half, BT=BT, HB=HB, BH=BH, BR=BR, NORM_Q=q_weight is not None,
        NORM_K=k_weight is not None, SILU=bool(silu), UPCAST=interpreting(), num_warps=_warps(BT * (2 * BH + BR)))
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
