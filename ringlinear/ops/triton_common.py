"""Triton helpers shared by the kernels: a dot that is exact under the CPU interpreter, and fp32 -> bf16/fp16
rounding to nearest even under the interpreter (as the GPU's cvt.rn), so CPU tests see the device's arithmetic."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def exact_dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (interpreter only): its bf16/fp16 dot is wrong, so multiply the exactly upcast operands instead,
    # which is the arithmetic the tensor cores do (bf16 products are exact in fp32).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PREC)


@triton.jit
def round_cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    # x: fp32. The interpreter truncates fp32 -> bf16 (a biased error); round to nearest even first, as the
    # GPU's cvt.rn does, so CPU tests see the device's rounding.
    if UPCAST and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)
