"""FP8 weights at inference (the engine's `quantization="fp8"` and HF FP8 checkpoints): e4m3 weights with one
scale per 128x128 block. Dense projections run W8A8 (`w8a8_linear`: activations quantized per 1x128 group at run
time, DeepSeek-V3 §3.3); expert GEMMs run W8A16 (`w8a16_grouped`, and the FP8 variant of the fused decode MoE:
weights upcast in registers, block scale on the fp32 partial sums). Each dispatches to its Triton kernel on the
Triton backend and to its reference (`naive.py`) otherwise (`ringlinear.ops.backend`).
"""

from __future__ import annotations

import functools

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.fp8.naive import (
    BLOCK,
    FP8,
    naive_w8a8_linear,
    naive_w8a16_grouped_gemm,
    quantize_blockwise,
)

# from this many rows on, a CUDA W8A8 GEMM with aligned N and K goes to cuBLAS's blockwise-scaled GEMM (prefill);
# below it, the Triton kernel that reads each weight byte once (decode)
SCALED_MM_MIN_ROWS = 128


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., N, K] -> (e4m3 [..., N, K], block scales [..., ceil(N/128), ceil(K/128)] fp32) on w's device: the
    reference quantizer (bit-equal to the Triton one, `ringlinear.ops.fp8.kernels.quantize_blocks`), used at load."""
    return quantize_blockwise(w)


@functools.cache
def _blockwise_scaled_mm_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def w8a8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype: y = q(x) W^T + b, W = w8 [N, K] e4m3 with block scales
    `scale` [ceil(N/128), ceil(K/128)]; q = quantization per 1x128 group of each row."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    N = w8.shape[0]
    if not use_triton(x2):
        y = naive_w8a8_linear(x2, w8, scale, bias)
    elif (x2.shape[0] >= SCALED_MM_MIN_ROWS and K % BLOCK == 0 and N % BLOCK == 0
          and _blockwise_scaled_mm_ok(x2.device)):
        from ringlinear.ops.fp8.gemm import fp8_gemm_blockwise
        from ringlinear.ops.fp8.w8a8 import quantize_groups

        M = x2.shape[0]
        pad = -M % BLOCK  # cuBLAS's blockwise recipe wants whole 128-row tiles
        xp = torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2
        x8, sx = quantize_groups(xp)
        y = fp8_gemm_blockwise(x8, sx, w8, scale, out_dtype=x.dtype)[:M]
        if bias is not None:
            y = y + bias
    else:
        from ringlinear.ops.fp8.w8a8 import quantize_groups, w8a8_gemm

        y = w8a8_gemm(*quantize_groups(x2), w8, scale, bias, out_dtype=x.dtype)
    return y.view(*lead, N)


def w8a16_grouped(a: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Expert GEMMs a [T, K] (rows sorted by expert) x e4m3 b8 [E, N, K] (block scales sb) -> [T, N] in a's dtype;
    rows past offs[-1] are unspecified (the Triton kernel leaves them unwritten)."""
    if not use_triton(a):
        return naive_w8a16_grouped_gemm(a, b8, sb, offs)
    from ringlinear.ops.fp8.w8a16 import w8a16_grouped_gemm

    return w8a16_grouped_gemm(a, b8, sb, offs)


__all__ = ["FP8", "SCALED_MM_MIN_ROWS", "quantize_weight", "w8a8_linear", "w8a16_grouped"]
