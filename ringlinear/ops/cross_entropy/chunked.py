"""Fused lm_head + cross entropy, chunked over tokens (the trick of Liger's fused linear cross entropy).

The [T, V] fp32 logits of a 157K vocabulary are the largest tensors of a training step (5 GB at 8K tokens,
twice over with their gradient) and, computed as an fp32 GEMM, its slowest GEMMs. Here each chunk of tokens
gets its logits from a bf16 tensor-core GEMM with fp32 accumulation and fp32 output (bf16 inputs are exact in
fp32, so the logits equal the fp32 reference's up to summation order), its loss, and at once its gradients
dL/dlogits = (softmax - onehot) / n, which feed dL/dhidden and dL/dweight (bf16 GEMMs, fp32 accumulation of
dW over chunks inside the GEMM). Backward only scales the stored gradients by the incoming scalar. Peak extra memory: one
chunk of fp32 logits (`chunk_rows x V`) plus dW in fp32.
"""

from __future__ import annotations

import torch

from ringlinear.ops.backend import fused_cross_entropy_enabled
from ringlinear.ops.cross_entropy.naive import naive_softmax_ce_grad
from ringlinear.ops.matmul import addmm_fp32_out, mm_fp32_out


def default_chunk_rows(vocab: int, budget_elems: int = 1 << 28) -> int:
    """Rows per chunk so one chunk of fp32 logits holds about `budget_elems` (1 GiB) values, a multiple of 256."""
    return max(256, budget_elems // max(1, vocab) // 256 * 256)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_rows: int, fused: bool, want_grad: bool):
        T = hidden.shape[0]
        n = (labels != ignore_index).sum()
        inv_n = 1.0 / n.clamp(min=1).float()
        # ctx.needs_input_grad ignores grad mode: under torch.no_grad (evaluation) skip the gradient GEMMs
        need_grad = want_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_grad else None
        dw = None  # fp32 sum over chunks, started by the first chunk's GEMM
        wt = weight.t()
        for s in range(0, T, chunk_rows):
            e = min(T, s + chunk_rows)
            h = hidden[s:e]
            logits = mm_fp32_out(h, wt)  # [c, V] fp32
            # per-row loss and (softmax - onehot) / n in the input dtype: one Triton kernel, or its reference
            ce = naive_softmax_ce_grad
            if fused:
                from ringlinear.ops.cross_entropy.kernel import fused_softmax_ce_grad as ce
            rl, g = ce(logits, labels[s:e], inv_n, ignore_index, hidden.dtype if need_grad else None)
            loss += rl.sum()
            if need_grad:
                dh[s:e] = mm_fp32_out(g, weight).to(hidden.dtype)
                dw = addmm_fp32_out(dw, g.t(), h)
        if need_grad:
            if dw is None:  # no tokens
                dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        # mean over labelled tokens; NaN when there are none, as F.cross_entropy
        return torch.where(n > 0, loss * inv_n, torch.full_like(loss, float("nan")))

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        return dh * grad_out.to(dh.dtype), (dw * grad_out).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None, fused: bool | None = None) -> torch.Tensor:
    """Mean cross entropy of `hidden @ weight^T` (fp32 logits) over tokens with labels != ignore_index, without
    materialising all logits. hidden: [T, H]; weight: [V, H] (same dtype); labels: [T] int. Same value and
    gradients as `naive_linear_cross_entropy` (to fp32 summation order; gradients rounded to the input dtype).
    `fused`: loss and logit gradients from the Triton kernel (default: on CUDA unless RINGLINEAR_FUSED_CE=0)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [T, H] and weight [V, H] needed, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must be [T={hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    if rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {rows}")
    if fused is None:
        fused = hidden.is_cuda and fused_cross_entropy_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, rows, fused, torch.is_grad_enabled())
