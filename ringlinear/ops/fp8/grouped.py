"""FP8 grouped GEMM for MoE experts in Triton, rowwise scales: out[t, n] = sa[t] * sb[e, n] * (a8[t] . b8[e, n])
for the tokens t of expert e (tokens sorted by expert, `offs` = cumulative token counts, as `torch._grouped_mm`).

The FP8 recipe's default expert GEMM (`fp8_grouped_gemm: torch` picks `torch._scaled_grouped_mm` instead;
the measured comparison is in benchmarks/NOTES_kernels.md).

Schedule: each program takes one (expert, 128-row tile) x one N tile. The row tiles of all experts are numbered
consecutively (expert e owns ceil(M_e / BM) of them); a program finds its expert by binary search over the
cumulative tile counts, computed on the GPU, so the launch needs no host sync: the grid is sized by the bound
ceil(T / BM) + E and programs beyond the last tile return at once.
Reference: `ringlinear.ops.fp8.naive.naive_fp8_grouped_gemm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def expert_tile_rows(pid_m, cum_ptr, offs_ptr, T, E: tl.constexpr, LOG_E: tl.constexpr, BM: tl.constexpr):
    """Row tile `pid_m` of the experts' consecutive row tiles -> (its expert e, its BM row indices, their mask): e is
    the smallest expert with cum[e] > pid_m (cum: inclusive cumulative row-tile counts), found by binary search."""
    lo = pid_m * 0
    hi = lo + E
    for _ in tl.static_range(LOG_E + 1):
        mid = (lo + hi) // 2
        go_left = tl.load(cum_ptr + tl.minimum(mid, E - 1)) > pid_m
        hi = tl.where(go_left, mid, hi)
        lo = tl.where(go_left, lo, mid + 1)
    e = lo
    tiles_before = tl.where(e > 0, tl.load(cum_ptr + tl.maximum(e - 1, 0)), 0)
    row_start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
    row_end = tl.load(offs_ptr + e)
    rows = row_start + (pid_m - tiles_before) * BM + tl.arange(0, BM)
    return e, rows, (rows < row_end) & (rows < T)  # offs[-1] > T (a caller's bug) must not write past `out`


@triton.jit
def _grouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, offs_ptr, cum_ptr, out_ptr, T, N, K: tl.constexpr,
                    E: tl.constexpr, LOG_E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs + k0, mask=rmask[:, None], other=0.0)
        b = tl.load(b_ptrs + k0, mask=cmask[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    sa = tl.load(sa_ptr + rows, mask=rmask, other=0.0)
    sb = tl.load(sb_ptr + e * N + cols, mask=cmask, other=0.0)
    out = acc * sa[:, None] * sb[None, :]
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def fused_fp8_grouped_gemm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                            offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a8: [T, K] e4m3 (rows sorted by expert), sa: [T] fp32; b8: [E, N, K] e4m3 (K contiguous), sb: [E, N]
    fp32; offs: [E] int32 cumulative row counts (offs[-1] <= T; rows beyond it are left unwritten, as torch's
    grouped GEMMs leave them) -> [T, N] out_dtype."""
    T, K = a8.shape
    E, N, K2 = b8.shape
    if K2 != K or sa.shape != (T,) or sb.shape != (E, N) or offs.shape != (E,):
        raise ValueError(f"fused_fp8_grouped_gemm: shapes a8 {tuple(a8.shape)}, sa {tuple(sa.shape)}, "
                         f"b8 {tuple(b8.shape)}, sb {tuple(sb.shape)}, offs {tuple(offs.shape)} do not agree "
                         "(want a8 [T, K], sa [T], b8 [E, N, K], sb [E, N], offs [E])")
    interp = a8.device.type == "cpu"
    # tiles, warps and stages from the sweep in benchmarks/NOTES_kernels.md
    BM, BN = (16, 16) if interp else (128, 256)
    BK = next((b for b in ((32,) if interp else (128, 64, 32)) if K % b == 0), None)
    if BK is None:
        raise ValueError(f"fused_fp8_grouped_gemm: K={K} must be a multiple of 32")
    a8, b8 = a8.contiguous(), b8.contiguous()
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    cum = torch.cumsum((counts + BM - 1) // BM, 0).to(torch.int32)
    out = torch.empty(T, N, dtype=out_dtype, device=a8.device)
    grid = (triton.cdiv(T, BM) + E, triton.cdiv(N, BN))
    kw = {} if interp else {"num_warps": 8, "num_stages": 4}
    _grouped_kernel[grid](a8, sa.float().contiguous(), b8, sb.float().contiguous(), offs.to(torch.int32).contiguous(),
                          cum, out, T, N, K, E=E, LOG_E=max(1, (E - 1).bit_length()), BM=BM, BN=BN, BK=BK, **kw)
    return out
