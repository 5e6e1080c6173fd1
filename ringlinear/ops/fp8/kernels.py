"""Fused Triton FP8 kernels (one pass over the input instead of 3-5 PyTorch passes), 1x128 e4m3 scaling
as in DeepSeek-V3 §3.3.2: quantize (+ transposed copy for the weight-gradient GEMM), SwiGLU + quantize,
RMSNorm + quantize; per-row quantize (MoE expert GEMMs: activations, SwiGLU output, stacked weights) and
128x128-block weight quantize (+ transposed copy for the input-gradient GEMM).
References: `ringlinear/ops/fp8/naive.py`. Fixed block configs (interpreter-safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.fp8.naive import BLOCK, FP8, FP8_MAX

_EPS = 1e-12


@triton.jit
def fast_div(a, b):
    # `/` compiles to the GPU's fast division (within 2 ulp of IEEE; exact in the interpreter): a value at an
    # e4m3 rounding tie can land one step away from torch's, which the GPU tests allow (IEEE division costs these
    # memory-bound kernels 2-2.5x: benchmarks/NOTES_kernels.md).
    return a / b


@triton.jit
def round_e4m3(y):
    # Round fp32 (|y| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic: the final cast
    # is then exact, so every backend (GPU cvt.rn, the CPU interpreter's emulation, which mis-rounds
    # carries) stores the same bits as torch's `.to(float8_e4m3fn)`.
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # e4m3 subnormals share the 2^-9 spacing of the lowest binade
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    q = (fast_div(a, ulp) + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds to an integer, ties to even
    return tl.where(y < 0, -q * ulp, q * ulp)


@triton.jit
def _quant_transpose_kernel(x_ptr, y_ptr, s_ptr, yt_ptr, st_ptr, M, K,
                            TRANSPOSE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # One [BM, BK] = [128, 128] tile: row amax -> 1x128 scales along K; column amax -> 1x128 along M.
    pm, pk = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rk = pk * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    s = fast_div(tl.maximum(tl.max(ax, axis=1), 1e-12), 448.0)
    y = round_e4m3(tl.clamp(fast_div(x, s[:, None]), -448.0, 448.0))
    tl.store(y_ptr + rm[:, None] * K + rk[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pk * M + rm, s, mask=rm < M)  # M-major, the layout the blockwise GEMM reads
    if TRANSPOSE:
        st = fast_div(tl.maximum(tl.max(ax, axis=0), 1e-12), 448.0)
        yt = round_e4m3(tl.clamp(fast_div(x, st[None, :]), -448.0, 448.0))
        nmb = tl.cdiv(M, BM)
        tl.store(yt_ptr + rk[None, :] * M + rm[:, None], yt.to(yt_ptr.dtype.element_ty), mask=mask)
        tl.store(st_ptr + rk * nmb + pm, st, mask=rk < K)


def quantize_transpose(x: torch.Tensor, transpose: bool = True):
    """x: [M, K] (K % 128 == 0) -> x8 [M, K], s [M, K/128] and, if `transpose`, xt8 [K, M],
    st [K, ceil(M/128)] (1x128 along M; a partial last M tile is scaled over its valid rows).
    `s` is stored M-major (strides (1, M)), as `fp8_gemm_blockwise` wants it: no re-layout per GEMM."""
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"quantize_transpose: need [M, K] with K % 128 == 0, got {tuple(x.shape)}")
    x = x.contiguous()
    M, K = x.shape
    y = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(K // BLOCK, M, dtype=torch.float32, device=x.device).t()
    nmb = triton.cdiv(M, BLOCK)
    yt = torch.empty(K, M, dtype=FP8, device=x.device) if transpose else y
    st = torch.empty(K, nmb, dtype=torch.float32, device=x.device) if transpose else s
    _quant_transpose_kernel[(nmb, K // BLOCK)](x, y, s, yt, st, M, K, TRANSPOSE=transpose, BM=BLOCK, BK=BLOCK,
                                               num_warps=8)
    return (y, s, yt, st) if transpose else (y, s)


@triton.jit
def _swiglu_quant_kernel(g_ptr, u_ptr, y_ptr, s_ptr, M, N_I, stride_in, BM: tl.constexpr, BK: tl.constexpr):
    pm, pk = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rk = pk * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < N_I)
    off = rm[:, None] * N_I + rk[None, :]
    off_in = rm[:, None] * stride_in + rk[None, :]
    g = tl.load(g_ptr + off_in, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off_in, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    s = fast_div(tl.maximum(tl.max(tl.abs(h), axis=1), 1e-12), 448.0)
    y = round_e4m3(tl.clamp(fast_div(h, s[:, None]), -448.0, 448.0))
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pk * M + rm, s, mask=rm < M)  # M-major, as the blockwise GEMM reads it


def swiglu_quantize(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up: [M, I] (I % 128 == 0) -> (h8 [M, I] e4m3, s [M, I/128], stored M-major) of
    h = silu(gate) * up. gate and up may be the two column halves of one [M, 2I] GEMM output (read in place)."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.shape[1] % BLOCK:
        raise ValueError(f"swiglu_quantize: need equal [M, I] with I % 128 == 0, got {tuple(gate.shape)}, {tuple(up.shape)}")
    if gate.stride(1) != 1 or up.stride(1) != 1 or gate.stride(0) != up.stride(0):
        gate, up = gate.contiguous(), up.contiguous()
    M, n_i = gate.shape
    y = torch.empty(M, n_i, dtype=FP8, device=gate.device)
    s = torch.empty(n_i // BLOCK, M, dtype=torch.float32, device=gate.device).t()
    BM = 32
    if M:
        _swiglu_quant_kernel[(triton.cdiv(M, BM), n_i // BLOCK)](gate, up, y, s, M, n_i, gate.stride(0), BM=BM,
                                                                 BK=BLOCK, num_warps=4)
    return y, s


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, w_ptr, y_ptr, s_ptr, h_ptr, rstd_ptr, M, H: tl.constexpr, eps, BM: tl.constexpr,
                          BH: tl.constexpr, EMIT_NORM: tl.constexpr):
    # One block of BM rows, the whole hidden dim in registers (H <= 8192): norm, then per-128 amax; with EMIT_NORM
    # also the normalised rows in x's dtype and 1/rms (what the weight-gradient GEMM and the norm's backward read).
    pm = tl.program_id(0)
    rm = pm * BM + tl.arange(0, BM)
    rh = tl.arange(0, BH)
    mask = (rm[:, None] < M) & (rh[None, :] < H)
    x = tl.load(x_ptr + rm[:, None] * H + rh[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rh, mask=rh < H, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    y = x * rstd[:, None] * w[None, :]
    if EMIT_NORM:
        tl.store(h_ptr + rm[:, None] * H + rh[None, :], y.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rm, rstd, mask=rm < M)
    y3 = tl.reshape(y, (BM, BH // 128, 128))
    s = fast_div(tl.maximum(tl.max(tl.abs(y3), axis=2), 1e-12), 448.0)  # [BM, BH/128]
    q = tl.reshape(round_e4m3(tl.clamp(fast_div(y3, s[:, :, None]), -448.0, 448.0)), (BM, BH))
    tl.store(y_ptr + rm[:, None] * H + rh[None, :], q.to(y_ptr.dtype.element_ty), mask=mask)
    rb = tl.arange(0, BH // 128)
    tl.store(s_ptr + rm[:, None] * (H // 128) + rb[None, :], s, mask=(rm[:, None] < M) & (rb[None, :] < H // 128))


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, emit_norm: bool = False):
    """x: [M, H] (H % 128 == 0, H <= 8192), weight: [H] -> (y8 [M, H] e4m3, s [M, H/128]) of rmsnorm(x) * w; with
    `emit_norm` also (h [M, H] in x's dtype: rmsnorm(x) * w itself, rstd [M] fp32: 1 / rms of each row), from the
    same pass over x."""
    if x.dim() != 2 or x.shape[1] % BLOCK or x.shape[1] > 8192 or weight.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm_quantize: need x [M, H], H % 128 == 0, H <= 8192, weight [H]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}")
    x = x.contiguous()
    M, H = x.shape
    y = torch.empty(M, H, dtype=FP8, device=x.device)
    s = torch.empty(M, H // BLOCK, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x) if emit_norm else y
    rstd = torch.empty(M, dtype=torch.float32, device=x.device) if emit_norm else s
    BH = triton.next_power_of_2(H)
    BM = max(1, min(16, 8192 // BH))
    if M:
        _rmsnorm_quant_kernel[(triton.cdiv(M, BM),)](x, weight.contiguous(), y, s, h, rstd, M, H, eps, BM=BM, BH=BH,
                                                    EMIT_NORM=emit_norm, num_warps=8)
    return (y, s, h, rstd) if emit_norm else (y, s)


@triton.jit
def _quant_rows_kernel(x_ptr, y_ptr, s_ptr, M, K, rows_per_group, dst_group_rows, dst_row0,
                       BM: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr):
    # BM rows per program, each whole row (K <= BK) in registers: one amax per row. Source row r goes to
    # destination row (r // rows_per_group) * dst_group_rows + dst_row0 + r % rows_per_group, which lets the
    # gate and up weights [E, I, K] land in one [E, 2I, K] buffer. SWIGLU: the source row is [gate | up]
    # (2K wide) and the quantized value is silu(gate) * up.
    pm = tl.program_id(0)
    rm = pm * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    if SWIGLU:
        g = tl.load(x_ptr + rm[:, None] * (2 * K) + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + rm[:, None] * (2 * K) + K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        x = g * tl.sigmoid(g) * u
    else:
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = fast_div(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), 448.0)
    y = round_e4m3(tl.clamp(fast_div(x, s[:, None]), -448.0, 448.0))
    dst = (rm // rows_per_group) * dst_group_rows + dst_row0 + rm % rows_per_group
    tl.store(y_ptr + dst[:, None] * K + rk[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + dst, s, mask=rm < M)


def _rows_launch(x, y, s, M, K, rows_per_group, dst_group_rows, dst_row0, swiglu):
    if K > 16384:
        raise ValueError(f"quantize_rows: rows of {K} > 16384 values are not supported")
    BK = triton.next_power_of_2(K)
    BM = max(1, min(64, 8192 // BK))
    _quant_rows_kernel[(triton.cdiv(M, BM),)](x, y, s, M, K, rows_per_group, dst_group_rows, dst_row0, BM=BM, BK=BK,
                                              SWIGLU=swiglu, num_warps=4)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization in one pass. x: [M, K] -> (x8 [M, K], scale [M] fp32); reference
    `quantize_rowwise` (whose scale is [M, 1])."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: need [M, K], got {tuple(x.shape)}")
    x = x.contiguous()
    M, K = x.shape
    y = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _rows_launch(x, y, s, M, K, max(M, 1), 0, 0, False)
    return y, s


def quantize_rows_cat(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights [E, N_i, K] (same E, K) quantized per row into one [E, sum N_i, K] e4m3 tensor and
    [E, sum N_i] scales, as if concatenated along dim 1 first (no bf16 concatenation is made)."""
    E, _, K = parts[0].shape
    if any(p.dim() != 3 or p.shape[0] != E or p.shape[2] != K for p in parts):
        raise ValueError(f"quantize_rows_cat: need [E, N_i, K] parts, got {[tuple(p.shape) for p in parts]}")
    total = sum(p.shape[1] for p in parts)
    y = torch.empty(E, total, K, dtype=FP8, device=parts[0].device)
    s = torch.empty(E, total, dtype=torch.float32, device=parts[0].device)
    row0 = 0
    for p in parts:
        n = p.shape[1]
        if E * n:
            _rows_launch(p.contiguous(), y, s, E * n, K, n, total, row0, False)
        row0 += n
    return y, s


def swiglu_quantize_rows(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gu: [M, 2I] = [gate | up] -> (h8 [M, I] e4m3, scale [M] fp32) of h = silu(gate) * up, per-row scaled;
    reference `quantize_rowwise(silu(gate) * up)` in fp32."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"swiglu_quantize_rows: need [M, 2I], got {tuple(gu.shape)}")
    gu = gu.contiguous()
    M, n_i = gu.shape[0], gu.shape[1] // 2
    y = torch.empty(M, n_i, dtype=FP8, device=gu.device)
    s = torch.empty(M, dtype=torch.float32, device=gu.device)
    if M:
        _rows_launch(gu, y, s, M, n_i, max(M, 1), 0, 0, True)
    return y, s


@triton.jit
def _quant_block_kernel(w_ptr, y_ptr, s_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    # One 128x128 block, one scale.
    pn, pk = tl.program_id(0), tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    rk = pk * BK + tl.arange(0, BK)
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :]).to(tl.float32)
    s = fast_div(tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-12), 448.0)
    y = round_e4m3(tl.clamp(fast_div(w, s), -448.0, 448.0))
    tl.store(y_ptr + rn[:, None] * K + rk[None, :], y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + pn * (K // BK) + pk, s)


def quantize_blocks(w: torch.Tensor, transpose: bool = False):
    """128x128-block e4m3 quantization in one pass. w: [N, K] (both % 128 == 0) -> (w8 [N, K], scale
    [N/128, K/128]) and, with `transpose`, also w8^T [K, N] contiguous (its block scales are scale^T; a byte copy,
    because Triton 3.6 writes corrupt bytes from an in-kernel transposed fp8 store on Hopper); reference
    `quantize_128x128`."""
    if w.dim() != 2 or w.shape[0] % BLOCK or w.shape[1] % BLOCK:
        raise ValueError(f"quantize_blocks: need [N, K] with N, K % 128 == 0, got {tuple(w.shape)}")
    w = w.contiguous()
    N, K = w.shape
    y = torch.empty(N, K, dtype=FP8, device=w.device)
    s = torch.empty(N // BLOCK, K // BLOCK, dtype=torch.float32, device=w.device)
    _quant_block_kernel[(N // BLOCK, K // BLOCK)](w, y, s, N, K, BN=BLOCK, BK=BLOCK, num_warps=8)
    return (y, s, y.t().contiguous()) if transpose else (y, s)


__all__ = ["quantize_transpose", "swiglu_quantize", "rmsnorm_quantize", "quantize_rows", "quantize_rows_cat",
           "swiglu_quantize_rows", "quantize_blocks", "_EPS", "FP8_MAX"]
