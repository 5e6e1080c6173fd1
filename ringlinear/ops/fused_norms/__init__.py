"""Fused inference norms (docs/architecture.md, "Linear attention layer", "Softmax attention layer", "Numerics"):
QK-norm + RoPE of a fused qkv projection, the linear layers' group norm times their sigmoid gate, and a residual
add with the next RMSNorm, each one Triton kernel (`fused.py`) on the Triton backend and the PyTorch composition
(`naive.py`) otherwise (`ringlinear.ops.backend`).

Forward only: when autograd records (grad mode on and an input requiring grad) the reference runs, so training
keeps the differentiable PyTorch path. The kernels never read back to the host (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.fused_norms.naive import (
    naive_add_rmsnorm,
    naive_group_rmsnorm_gate,
    naive_qk_norm_rope,
    naive_rope,
)

MAX_HEAD_DIM = 512  # a program holds HEADS_PER_PROGRAM whole heads in registers; larger heads run the reference
MAX_DIM = 16384  # add_rmsnorm rows and group_rmsnorm_gate groups are held whole in registers, as in ops.rmsnorm
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["add_rmsnorm", "group_rmsnorm_gate", "naive_add_rmsnorm", "naive_group_rmsnorm_gate",
           "naive_qk_norm_rope", "naive_rope", "qk_norm_rope"]


def _records_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_qk_norm_rope_inputs(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight, positions, inv_freq,
                              rotary_dim, out_dtype) -> None:
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"qk_norm_rope: num_heads={num_heads} and num_kv_heads={num_kv_heads} must be >= 1")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"qk_norm_rope: head_dim={head_dim} must be even and >= 2")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"qk_norm_rope: rotary_dim={rotary_dim} must be even, >= 2 and <= head_dim={head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qk_norm_rope: qkv must be [T, (num_heads + 2 num_kv_heads) head_dim] = [T, {width}], "
                         f"got {tuple(qkv.shape)}")
    _check_float("qk_norm_rope: qkv", qkv)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"qk_norm_rope: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and w.shape != (head_dim,):
            raise ValueError(f"qk_norm_rope: {name} must be [{head_dim}] (head_dim), got {tuple(w.shape)}")
    if positions.shape != (qkv.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"qk_norm_rope: positions must be [{qkv.shape[0]}] int32/int64 (one per token), got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if inv_freq.shape != (rotary_dim // 2,):
        raise ValueError(f"qk_norm_rope: inv_freq must be [{rotary_dim // 2}] (rotary_dim / 2), got "
                         f"{tuple(inv_freq.shape)}")


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                 attention_scaling: float = 1.0, silu: bool = False,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [T, (H + 2 Hkv) D] (heads q, k, v in order) -> q [T, H, D], k [T, Hkv, D], v [T, Hkv, D] in
    `out_dtype` (default qkv's), contiguous. In fp32: SiLU on q, k, v if `silu`; RMSNorm over D of each q head
    with `q_weight` [D] and each k head with `k_weight` [D] (None: no norm); NeoX RoPE on the first `rotary_dim`
    dims with angles `positions[t] * inv_freq[i]` (cos, sin times `attention_scaling`); one rounding."""
    check_qk_norm_rope_inputs(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight, positions, inv_freq,
                              rotary_dim, out_dtype)
    if not use_triton(qkv) or head_dim > MAX_HEAD_DIM or _records_grad(qkv, q_weight, k_weight):
        return naive_qk_norm_rope(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight, eps, positions,
                                  inv_freq, rotary_dim, attention_scaling, silu, out_dtype)
    from ringlinear.ops.fused_norms.fused import fused_qk_norm_rope

    return fused_qk_norm_rope(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight, eps, positions, inv_freq,
                              rotary_dim, attention_scaling, silu, out_dtype)


def check_group_rmsnorm_gate_inputs(o, weight, groups, gate) -> None:
    if o.dim() != 2:
        raise ValueError(f"group_rmsnorm_gate: o must be [T, H*D], got {tuple(o.shape)}")
    _check_float("group_rmsnorm_gate: o", o)
    if gate.shape != o.shape or gate.dtype != o.dtype:
        raise ValueError(f"group_rmsnorm_gate: gate must match o ({tuple(o.shape)} {o.dtype}), got "
                         f"{tuple(gate.shape)} {gate.dtype}")
    if weight.shape != (o.shape[1],):
        raise ValueError(f"group_rmsnorm_gate: weight must be [{o.shape[1]}] (o's last dim), got {tuple(weight.shape)}")
    if groups < 1 or o.shape[1] % groups:
        raise ValueError(f"group_rmsnorm_gate: groups={groups} must be >= 1 and divide the last dim {o.shape[1]}")


def group_rmsnorm_gate(o: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                       gate: torch.Tensor) -> torch.Tensor:
    """o, gate: [T, H*D] of one dtype, weight [H*D] -> [T, H*D] in o's dtype: group RMSNorm of o over `groups`
    equal slices (fp32, rounded to o's dtype, as `GroupRMSNorm`), times sigmoid(gate) (fp32, rounded to the
    dtype, as `torch.sigmoid`), the product rounded: the linear layer's roundings, in one kernel."""
    check_group_rmsnorm_gate_inputs(o, weight, groups, gate)
    if not use_triton(o) or o.shape[1] // groups > MAX_DIM or _records_grad(o, weight, gate):
        return naive_group_rmsnorm_gate(o, weight, groups, eps, gate)
    from ringlinear.ops.fused_norms.fused import fused_group_rmsnorm_gate

    return fused_group_rmsnorm_gate(o, weight, groups, eps, gate)


def check_add_rmsnorm_inputs(x, residual, weight) -> None:
    _check_float("add_rmsnorm: x", x)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rmsnorm: residual must match x ({tuple(x.shape)} {x.dtype}), got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"add_rmsnorm: weight must be [{x.shape[-1] if x.dim() else '?'}] (x's last dim), got "
                         f"{tuple(weight.shape)}")


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D] of one dtype, weight [D] -> (normed, new_residual), both [..., D] in x's dtype:
    `new_residual = residual + x` (rounded to the dtype, as the decoder's `x = x + attn(...)`), `normed =
    rmsnorm(new_residual)` in fp32, rounded once (vLLM's fused_add_rms_norm, out of place)."""
    check_add_rmsnorm_inputs(x, residual, weight)
    if not use_triton(x) or x.shape[-1] > MAX_DIM or _records_grad(x, residual, weight):
        return naive_add_rmsnorm(x, residual, weight, eps)
    from ringlinear.ops.fused_norms.fused import fused_add_rmsnorm

    return fused_add_rmsnorm(x, residual, weight, eps)
