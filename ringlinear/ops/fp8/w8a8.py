"""FP8 inference GEMM for the dense projections (Triton): y = q(x) W^T with W in e4m3 and one scale per 128x128
block (`weight_scale_inv` of HF FP8 checkpoints), x quantized per 1x128 group at run time (DeepSeek-V3 §3.3.2).
Two launches: `quantize_groups` writes x8 and its scales once; `w8a8_gemm` reads the e4m3 weight once (half the
bytes of bf16: what makes decode faster) and, per 128-wide K step, adds (x8 . w8) * sx * sw in fp32.

Any M, N, K (edge groups and blocks scaled over their valid part). The tiles suit decode (M <= 64): each
program takes BM rows (all of them at decode) and BN weight rows, so the weight is read once however many
programs there are. Reference: `ringlinear.ops.fp8.naive.naive_w8a8_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.fp8.kernels import fast_div, round_e4m3
from ringlinear.ops.fp8.naive import BLOCK, FP8
from ringlinear.ops.triton_common import round_cast


@triton.jit
def _quant_groups_kernel(x_ptr, y_ptr, s_ptr, M, K, stride_xm, G, BM: tl.constexpr, BK: tl.constexpr):
    # one [BM, 128] tile: a scale per row of the group, amax over the valid columns
    pm, pg = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rk = pg * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = fast_div(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), 448.0)
    y = round_e4m3(tl.clamp(fast_div(x, s[:, None]), -448.0, 448.0))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm * G + pg, s, mask=rm < M)


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (any K, unit column stride) -> (x8 [M, K] e4m3, scale [M, ceil(K/128)] fp32), one pass; the
    reference is `ringlinear.ops.fp8.naive.quantize_groups`."""
    if x.dim() != 2:
        raise ValueError(f"quantize_groups: need [M, K], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    G = triton.cdiv(K, BLOCK)
    y = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, G, dtype=torch.float32, device=x.device)
    if M and K:
        BM = 16
        _quant_groups_kernel[(triton.cdiv(M, BM), G)](x, y, s, M, K, x.stride(0), G, BM=BM, BK=BLOCK, num_warps=4)
    return y, s


@dataclass(frozen=True)
class W8A8Config:
    """Tiles of `w8a8_gemm`: `block_n` weight rows per program (decode reads N*K weight bytes once; small tiles put
    enough programs in flight to reach the bandwidth), rows per program by M (`block_m_max` at most). Defaults: the
    best of the H200 sweep (`benchmarks/bench_tp_fp8.py --mode gemm`, `benchmarks/results/bench_tp_fp8_gemm_h200.txt`):
    32-row tiles at M <= 16 for every N, 64-row tiles above 8192 columns at larger M, 5 stages."""

    block_n: int = 32
    block_n_large: int = 64  # N > 8192 and M > 16
    block_m_max: int = 64
    warps: int = 4
    stages: int = 5


@triton.jit
def _w8a8_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, o_ptr, M, N, K: tl.constexpr, G: tl.constexpr,
                 HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask, nmask = rm < M, rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    sw_ptrs = sw_ptr + (rn // BK) * G
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in tl.range(0, G):  # BK == 128: one activation group and one weight block column per step
        kmask = g * BK + rk < K
        a = tl.load(x_ptrs + g * BK, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs + g * BK, mask=nmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
        if UPCAST:  # the interpreter multiplies the exactly upcast values, as the tensor cores do
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        part = tl.dot(a, tl.trans(b))
        sa = tl.load(sx_ptr + rm * G + g, mask=mmask, other=0.0)
        sb = tl.load(sw_ptrs + g, mask=nmask, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(o_ptrs, round_cast(acc, o_ptr.dtype.element_ty, UPCAST), mask=mmask[:, None] & nmask[None, :])


def w8a8_gemm(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              config: W8A8Config | None = None) -> torch.Tensor:
    """x8: [M, K] e4m3 with sx: [M, ceil(K/128)]; w8: [N, K] e4m3 with sw: [ceil(N/128), ceil(K/128)]; bias: [N]
    or None -> [M, N] out_dtype = (x8 * sx)(w8 * sw)^T + bias, fp32 accumulation, one rounding."""
    M, K = x8.shape
    N = w8.shape[0]
    G = triton.cdiv(K, BLOCK)
    if w8.shape != (N, K) or sx.shape != (M, G) or sw.shape != (triton.cdiv(N, BLOCK), G):
        raise ValueError(f"w8a8_gemm: shapes x8 {tuple(x8.shape)}, sx {tuple(sx.shape)}, w8 {tuple(w8.shape)}, "
                         f"sw {tuple(sw.shape)} do not agree (want x8 [M, K], sx [M, K/128], w8 [N, K], "
                         "sw [N/128, K/128], edge blocks rounded up)")
    if x8.dtype != FP8 or w8.dtype != FP8:
        raise ValueError(f"w8a8_gemm: x8 and w8 must be float8_e4m3fn, got {x8.dtype} and {w8.dtype}")
    x8, w8, sx, sw = x8.contiguous(), w8.contiguous(), sx.float().contiguous(), sw.float().contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x8.device)
    if M == 0 or N == 0:
        return out
    cfg = config or W8A8Config()
    BM = min(cfg.block_m_max, max(16, triton.next_power_of_2(M)))
    BN = cfg.block_n if N <= 8192 or M <= 16 else cfg.block_n_large
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    b = bias if bias is not None else out
    _w8a8_kernel[grid](x8, sx, w8, sw, b, out, M, N, K, G, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BLOCK,
                       UPCAST=interpreting(), num_warps=cfg.warps, num_stages=cfg.stages)
    return out
