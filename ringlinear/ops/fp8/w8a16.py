"""Expert GEMMs with e4m3 weights for batches past the fused decode kernel (prefill): rows of a: [T, K] sorted by
expert (`offs` = cumulative counts, as `torch._grouped_mm`), b8: [E, N, K] e4m3 with one scale per 128x128 block.
Each weight tile is upcast to a's dtype in registers (exact: every e4m3 value is a bf16 value), multiplied with a
in fp32, and its block's scale applied to that fp32 partial sum: the weights stream as FP8 bytes, the activations
are not quantized (the same arithmetic as the FP8 variant of the fused decode kernel, `ops/moe/fused_moe.py`).

Schedule as `ringlinear.ops.fp8.grouped`: one program per (expert, BM-row tile) x N tile, the expert found by a
binary search over cumulative tile counts on the device (no host sync). Reference:
`ringlinear.ops.fp8.naive.naive_w8a16_grouped_gemm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.fp8.grouped import expert_tile_rows
from ringlinear.ops.fp8.naive import BLOCK, FP8
from ringlinear.ops.triton_common import exact_dot, round_cast


@triton.jit
def _w8a16_grouped_kernel(a_ptr, b_ptr, sb_ptr, offs_ptr, cum_ptr, out_ptr, T, N, K: tl.constexpr, NB, KB,
                          E: tl.constexpr,
                          LOG_E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    total = tl.load(cum_ptr + E - 1)
    if pid_m >= total:
        return
    e, rows, rmask = expert_tile_rows(pid_m, cum_ptr, offs_ptr, T, E, LOG_E, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * N * K + cols.to(tl.int64)[:, None] * K + ks[None, :]
    s_ptrs = sb_ptr + e.to(tl.int64) * NB * KB + (cols // 128) * KB
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # BK divides 128: a step never straddles two scale blocks
        kmask = k0 + ks < K
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=cmask[:, None] & kmask[None, :], other=0.0).to(a.dtype)
        part = exact_dot(a, tl.trans(b), tl.zeros((BM, BN), dtype=tl.float32), DOT_PREC, UPCAST)
        acc += part * tl.load(s_ptrs + k0 // 128, mask=cmask, other=0.0)[None, :]
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(o_ptrs, round_cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=rmask[:, None] & cmask[None, :])


def w8a16_grouped_gemm(a: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a: [T, K] (bf16/fp32, rows sorted by expert); b8: [E, N, K] e4m3 (K contiguous); sb: [E, ceil(N/128),
    ceil(K/128)] fp32; offs: [E] int32 cumulative row counts -> [T, N] (a's dtype); rows past offs[-1] are left
    unwritten, as torch's grouped GEMMs leave them."""
    T, K = a.shape
    E, N, K2 = b8.shape
    NB, KB = triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)
    if K2 != K or sb.shape != (E, NB, KB) or offs.shape != (E,):
        raise ValueError(f"w8a16_grouped_gemm: shapes a {tuple(a.shape)}, b8 {tuple(b8.shape)}, sb {tuple(sb.shape)}, "
                         f"offs {tuple(offs.shape)} do not agree (want a [T, K], b8 [E, N, K], sb [E, N/128, K/128], "
                         "offs [E])")
    if b8.dtype != FP8:
        raise ValueError(f"w8a16_grouped_gemm: b8 must be float8_e4m3fn, got {b8.dtype}")
    interp = interpreting()
    BM, BN, BK = (16, 16, 32) if interp else (64, 128, 64)
    a, b8 = a.contiguous(), b8.contiguous()
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    cum = torch.cumsum((counts + BM - 1) // BM, 0).to(torch.int32)
    out = torch.empty(T, N, dtype=out_dtype or a.dtype, device=a.device)
    if T == 0 or N == 0:
        return out
    grid = (triton.cdiv(T, BM) + E, triton.cdiv(N, BN))
    kw = {} if interp else {"num_warps": 4, "num_stages": 4}
    prec = "tf32x3" if a.dtype == torch.float32 else "tf32"
    _w8a16_grouped_kernel[grid](a, b8, sb.float().contiguous(), offs.to(torch.int32).contiguous(), cum, out, T, N, K,
                                NB, KB, E=E, LOG_E=max(1, (E - 1).bit_length()), BM=BM, BN=BN, BK=BK,
                                DOT_PREC=prec, UPCAST=interp, **kw)
    return out
