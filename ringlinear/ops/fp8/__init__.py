"""FP8 (e4m3) training ops: quantization references, scaled GEMMs, fused Triton quantize kernels,
FP8 linear autograd functions (DeepSeek-V3 §3.3 fine-grained scaling)."""

from ringlinear.ops.fp8.gemm import Fp8Unavailable, fp8_gemm_blockwise, fp8_gemm_rowwise, require_fp8
from ringlinear.ops.fp8.quant import (
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
    quantize_rowwise,
    quantize_transpose_ref,
    rmsnorm_quantize_ref,
    swiglu_quantize_ref,
)

__all__ = [
    "Fp8Unavailable", "require_fp8", "fp8_gemm_blockwise", "fp8_gemm_rowwise", "quantize_1x128",
    "quantize_128x128", "quantize_rowwise", "dequantize_1x128", "dequantize_128x128", "quantize_transpose_ref",
    "swiglu_quantize_ref", "rmsnorm_quantize_ref",
]
