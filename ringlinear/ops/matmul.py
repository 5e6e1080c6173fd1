"""Matrix products with fp32 accumulation and fp32 output from bf16/fp16 operands, on tensor cores: the same values
as an fp32 GEMM of the upcast operands up to summation order (bf16 and fp16 values are exact in fp32 and their
products exact in fp32 accumulation), without an fp32 copy of either operand. Used for fp32 logits from a bf16
lm_head (`RingLinearForCausalLM.compute_logits`) and by the fused cross entropy."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _mm_out_fp32_supported(device: torch.device) -> bool:
    """Whether this build has the bf16 x bf16 -> fp32 GEMM (`torch.mm(..., out_dtype=)`) on `device`."""
    try:
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def _addmm_out_fp32_supported(device: torch.device) -> bool:
    """Whether this build accumulates a bf16 x bf16 product into an fp32 tensor in place (`addmm(out_dtype=)`)."""
    try:
        c = torch.zeros(16, 16, device=device)
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0] == 16)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def addmm_fp32_out(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (acc None: a @ b). On CUDA the sum is the GEMM's epilogue (beta = 1, in place): no
    separate read-add-write of `acc`, which for the lm_head's [157K, 2048] fp32 gradient is 3.9 GB a chunk."""
    if acc is None:
        return mm_fp32_out(a, b)
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and _addmm_out_fp32_supported(a.device):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(mm_fp32_out(a, b))


class _MmFp32Out(torch.autograd.Function):
    """`a @ b` with fp32 output from bf16/fp16 operands; the backward's products in fp32, rounded to each
    operand's dtype (as autograd through the upcast fp32 GEMM gives them)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.mm(a, b, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = (g @ b.float().t()).to(a.dtype) if ctx.needs_input_grad[0] else None
        gb = (a.float().t() @ g).to(b.dtype) if ctx.needs_input_grad[1] else None
        return ga, gb


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and fp32 output, on tensor cores for bf16/fp16 CUDA inputs."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        if _mm_out_fp32_supported(a.device):
            if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
                return _MmFp32Out.apply(a, b)
            return torch.mm(a, b, out_dtype=torch.float32)
        # bf16/fp16 values are exact in TF32, so a TF32 GEMM of the upcast inputs keeps every product exact
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return a.float() @ b.float()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return a.float() @ b.float()
