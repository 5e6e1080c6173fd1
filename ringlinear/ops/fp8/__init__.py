"""FP8 (e4m3) training ops: quantization references, scaled GEMMs, fused Triton quantize kernels,
FP8 linear autograd functions (DeepSeek-V3 §3.3 fine-grained scaling)."""

from ringlinear.ops.fp8.gemm import Fp8Unavailable, fp8_gemm_blockwise, fp8_gemm_rowwise, require_fp8
from ringlinear.ops.fp8.naive import (
    dequantize_1x128,
    dequantize_128x128,
    naive_quantize_transpose,
    naive_rmsnorm_quantize,
    naive_swiglu_quantize,
    quantize_1x128,
    quantize_128x128,
    quantize_rowwise,
)

__all__ = [
    "Fp8Unavailable", "require_fp8", "fp8_gemm_blockwise", "fp8_gemm_rowwise", "quantize_1x128",
    "quantize_128x128", "quantize_rowwise", "dequantize_1x128", "dequantize_128x128", "naive_quantize_transpose",
    "naive_swiglu_quantize", "naive_rmsnorm_quantize",
]
