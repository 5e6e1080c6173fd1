"""Triton: per-row cross entropy of fp32 logits and its gradient in two passes over each row (online
max / sum-exp, then (softmax - onehot) * scale written in the gradient dtype), replacing PyTorch's
logsumexp + gather + sub + exp + index + mul + cast (about ten passes over a [rows, V] fp32 tensor).
Reference: `naive_softmax_ce_grad`. Fixed block config (interpreter-safe)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(_NEG - _NEG) stays defined


@triton.jit
def _ce_grad_kernel(x_ptr, lab_ptr, g_ptr, loss_ptr, scale_ptr, V: tl.constexpr, ignore_index,
                    BV: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * V
    m = tl.full([BV], _NEG, tl.float32)
    s = tl.zeros([BV], tl.float32)
    for off in range(0, V, BV):
        cols = off + tl.arange(0, BV)
        inb = cols < V
        x = tl.load(base + cols, mask=inb, other=_NEG)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.where(inb, tl.exp(x - m_new), 0.0)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    label = tl.load(lab_ptr + row)
    valid = label != ignore_index
    safe = tl.where(valid, label, 0)
    tgt = tl.load(base + safe)
    tl.store(loss_ptr + row, tl.where(valid, lse - tgt, 0.0))
    if GRAD:
        scale = tl.load(scale_ptr) * valid.to(tl.float32)
        gbase = g_ptr + row * V
        for off in range(0, V, BV):
            cols = off + tl.arange(0, BV)
            inb = cols < V
            x = tl.load(base + cols, mask=inb, other=_NEG)
            g = (tl.exp(x - lse) - (cols == safe).to(tl.float32)) * scale
            tl.store(gbase + cols, g.to(g_ptr.dtype.element_ty), mask=inb)


def fused_softmax_ce_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int = -100,
                    grad_dtype: torch.dtype | None = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [R, V] fp32; labels: [R]; scale: 1-element fp32 tensor -> (loss [R] fp32: lse - logit[label],
    0 where ignored; grad [R, V] = (softmax - onehot(label)) * scale, 0 on ignored rows, or None)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or labels.shape != logits.shape[:1]:
        raise ValueError(f"softmax_ce_grad: need fp32 logits [R, V] and labels [R], got {tuple(logits.shape)} "
                         f"{logits.dtype}, {tuple(labels.shape)}")
    logits = logits.contiguous()
    R, V = logits.shape
    loss = torch.empty(R, device=logits.device, dtype=torch.float32)
    grad = torch.empty(R, V, device=logits.device, dtype=grad_dtype) if grad_dtype is not None else None
    if R:
        BV = min(2048, triton.next_power_of_2(V))
        _ce_grad_kernel[(R,)](logits, labels.contiguous(), grad if grad is not None else loss, loss,
                              scale.float().reshape(1).contiguous(), V, ignore_index, BV=BV, GRAD=grad is not None,
                              num_warps=8)
    return loss, grad
