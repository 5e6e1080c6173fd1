"""Fused RMSNorm / group RMSNorm forward + backward as two Triton kernels (`fused_rmsnorm`, autograd through
`_RMSNorm`): the forward reads x once and writes y and one fp32 rstd per row and group; the backward reads x and
dy once and writes dx, with the weight gradient summed per program, then over programs (fixed order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tile size in elements (rows per tile = TILE // padded row), warps, backward programs per SM (fixed: interpreter-safe;
# chosen by the sweep in benchmarks/NOTES_kernels.md)
CONFIG = {"TILE": 2048, "num_warps": 4, "bwd_programs_per_sm": 8}


def _tiles(G: int, N: int) -> tuple[int, int, int]:
    BG, BN = triton.next_power_of_2(G), triton.next_power_of_2(N)
    BM = max(1, min(64, CONFIG["TILE"] // (BG * BN)))
    return BM, BG, BN


@triton.jit
def _tile(M, G: tl.constexpr, N: tl.constexpr, row0, BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr):
    rm = row0 + tl.arange(0, BM)
    rg = tl.arange(0, BG)
    rn = tl.arange(0, BN)
    col = rg[None, :, None] * N + rn[None, None, :]  # [1, BG, BN]
    offs = rm[:, None, None].to(tl.int64) * (G * N) + col
    cmask = (rg[None, :, None] < G) & (rn[None, None, :] < N)
    return rm, rg, col, offs, cmask, (rm[:, None, None] < M) & cmask


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, eps, G: tl.constexpr, N: tl.constexpr, BM: tl.constexpr,
                BG: tl.constexpr, BN: tl.constexpr):
    rm, rg, col, offs, cmask, mask = _tile(M, G, N, tl.program_id(0) * BM, BM, BG, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=2) / N + eps)  # [BM, BG]
    tl.store(y_ptr + offs, (x * rstd[:, :, None] * w).to(y_ptr.dtype.element_ty), mask=mask)
    rmask = (rm[:, None] < M) & (rg[None, :] < G)
    tl.store(rstd_ptr + rm[:, None] * G + rg[None, :], rstd, mask=rmask)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, M, tiles_per_prog, G: tl.constexpr,
                N: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(w*dy * xhat)) per row and group; dw partial = sum over rows of dy * xhat
    pid = tl.program_id(0)
    rg = tl.arange(0, BG)
    rn = tl.arange(0, BN)
    col = rg[:, None] * N + rn[None, :]
    cmask = (rg[:, None] < G) & (rn[None, :] < N)
    w = tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BM, BG, BN], dtype=tl.float32)  # reduced over rows once, after the loop
    i = 0
    while i < tiles_per_prog:  # a while loop: the interpreter cannot take a runtime bound in range()
        rm, rg3, col3, offs, cmask3, mask = _tile(M, G, N, (pid * tiles_per_prog + i) * BM, BM, BG, BN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rm[:, None] * G + rg3[None, :], mask=(rm[:, None] < M) & (rg3[None, :] < G),
                       other=0.0)
        xhat = x * rstd[:, :, None]
        wdy = dy * w[None, :, :]
        c = tl.sum(wdy * xhat, axis=2) / N  # [BM, BG]
        dx = rstd[:, :, None] * (wdy - xhat * c[:, :, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
        i += 1
    tl.store(dw_ptr + pid * (G * N) + col, tl.sum(dw, axis=0), mask=cmask)


def _as_rows(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, int, int]:
    """x as contiguous rows [M, D] (shapes checked by `rmsnorm`, which routes D > MAX_DIM to the reference)."""
    D = x.shape[-1]
    return x.reshape(-1, D).contiguous(), groups, D // groups


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, groups):
        x2, G, N = _as_rows(x, groups)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, G, dtype=torch.float32, device=x.device)
        BM, BG, BN = _tiles(G, N)
        if M:
            _fwd_kernel[(triton.cdiv(M, BM),)](x2, weight, y, rstd, M, eps, G=G, N=N, BM=BM, BG=BG, BN=BN,
                                               num_warps=CONFIG["num_warps"])
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.G, ctx.N = x.shape, G, N
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(x2, weight, rstd, dy, ctx.G, ctx.N)
        return dx.view(ctx.shape), dw, None, None


def rmsnorm_backward(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, G: int = 1,
                     N: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, G N], dweight) of y = rmsnorm(x) * w from the forward's rows x2: [M, G N], its rstd: [M, G] fp32 and
    dy (any shape of M G N elements)."""
    M = x2.shape[0]
    N = N or x2.shape[1] // G
    dy2 = dy.reshape(M, G * N).contiguous()
    dx = torch.empty_like(x2)
    if not M:
        return dx, torch.zeros_like(weight)
    BM, BG, BN = _tiles(G, N)
    tiles = triton.cdiv(M, BM)
    per_prog = triton.cdiv(tiles, min(tiles, CONFIG["bwd_programs_per_sm"] * _sm_count(x2.device)))
    programs = triton.cdiv(tiles, per_prog)
    dw = torch.empty(programs, G * N, dtype=torch.float32, device=x2.device)  # every program writes its row
    _bwd_kernel[(programs,)](x2, weight, dy2, rstd.reshape(M, G).contiguous(), dx, dw, M, per_prog, G=G, N=N, BM=BM,
                             BG=BG, BN=BN, num_warps=CONFIG["num_warps"])
    return dx, dw.sum(0).to(weight.dtype)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, each over several tiles (exercises the loop)




def fused_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """`naive_rmsnorm` with the Triton kernels (last dim <= `ringlinear.ops.rmsnorm.MAX_DIM`; differentiable)."""
    return _RMSNorm.apply(x, weight, eps, groups)
