"""Scaled FP8 GEMMs y = (a8 * sa) @ (b8 * sb)^T with fp32 accumulation on Hopper tensor cores:
per-row scales through `torch._scaled_mm`, DeepSeek-V3 blockwise (1x128 x 128x128) through
`torch.nn.functional.scaled_mm`, and a grouped per-row variant for MoE experts. CUDA only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Fp8Unavailable(RuntimeError):
    """FP8 GEMMs need a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""


def require_fp8(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise Fp8Unavailable(f"FP8 training needs a CUDA GPU with FP8 tensor cores (sm_89+); this run is on "
                             f"{device.type!r}, where no FP8 GEMM exists. Drop --fp8/`fp8: true` to train in BF16.")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise Fp8Unavailable(f"FP8 GEMMs need compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")


def fp8_gemm_rowwise(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a8: [M, K] e4m3, sa: [M, 1]; b8: [N, K] e4m3 row-major, sb: [N, 1] -> [M, N] out_dtype."""
    return torch._scaled_mm(a8, b8.t(), scale_a=sa.float(), scale_b=sb.float().t(), out_dtype=out_dtype)


def blockwise_scale_b(sb: torch.Tensor) -> torch.Tensor:
    """128x128 block scales of a row-major [N, K] operand, sb: [N/128, K/128], in the layout cuBLAS reads for
    `scale_b` (DEVICE_NOTES.md): [K/128, N/128] column-major, the K-block dim padded to a multiple of 4 (torch
    2.11 on H100 asks for it: "scale_b must have shape 4 x 6" at K/128 = 2). Weights prepare this once."""
    nb, kb = sb.shape
    sb_c = torch.ones(nb, -(-kb // 4) * 4, device=sb.device, dtype=torch.float32)
    sb_c[:, :kb] = sb
    return sb_c.t()


def fp8_gemm_blockwise(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, sb_prepared: bool = False) -> torch.Tensor:
    """a8: [M, K] e4m3 with sa: [M, K/128] (1x128 tiles); b8: [N, K] e4m3 row-major with sb: [N/128, K/128]
    (128x128 blocks), or `blockwise_scale_b(sb)` with `sb_prepared` -> [M, N]. sa is used as is when stored
    M-major (as `quantize_transpose` writes it), else re-laid out."""
    ST = F.ScalingType
    sa_m = sa.float().t().contiguous().t()
    sb_c = sb if sb_prepared else blockwise_scale_b(sb)
    return F.scaled_mm(a8, b8.t(), scale_a=sa_m, scale_recipe_a=ST.BlockWise1x128, scale_b=sb_c,
                       scale_recipe_b=ST.BlockWise128x128, output_dtype=out_dtype)


def fp8_grouped_gemm_rowwise(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                             offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Expert GEMMs over tokens sorted by expert. a8: [T, K] e4m3, sa: [T] fp32; b8: [E, N, K] e4m3
    (row-major per expert), sb: [E, N] fp32; offs: [E] int32 cumulative token counts -> [T, N]."""
    return torch._scaled_grouped_mm(a8, b8.transpose(1, 2), sa.float(), sb.float(), offs=offs, out_dtype=out_dtype)
