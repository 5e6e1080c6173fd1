"""References for the fused inference norms: the PyTorch compositions the layers compute today
(`layers/linear_attention.py`, `softmax_attention.py`, `rotary.py`, `norms.py`, the decoder's residual adds).

    qk_norm_rope:        qkv -> fp32 -> [SiLU] -> RMSNorm over head_dim of q, k -> NeoX RoPE on q, k -> out dtype
    group_rmsnorm_gate:  group_rmsnorm(o) (rounded to o's dtype) * sigmoid(gate) (rounded to gate's dtype)
    add_rmsnorm:         h = residual + x (x's dtype); rmsnorm(h) in fp32, rounded once
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringlinear.ops.rmsnorm.naive import naive_rmsnorm


def naive_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
               attention_scaling: float = 1.0) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first `rotary_dim` dims, as `RotaryEmbedding.forward` (cos and sin times
    `attention_scaling`, YaRN's factor). x: [T, H, D] any float dtype, positions: [T] int, inv_freq: [rotary_dim/2]
    -> fp32 [T, H, D]."""
    x = x.float()
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, r/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def naive_qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                       attention_scaling: float = 1.0, silu: bool = False,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [T, (H + 2 Hkv) D] (q heads, then k, then v) -> q [T, H, D], k [T, Hkv, D], v [T, Hkv, D] in
    `out_dtype` (default qkv's). The linear layer's steps (fp32 from the projection on, SiLU if `linear_silu`,
    QK-norm, RoPE, one cast); the softmax layer's are the same with silu=False (its v is qkv's, unchanged)."""
    T = qkv.shape[0]
    dtype = out_dtype or qkv.dtype
    x = qkv.float().view(T, num_heads + 2 * num_kv_heads, head_dim)
    if silu:
        x = F.silu(x)
    q, k, v = x.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_weight is not None:
        q = naive_rmsnorm(q, q_weight, eps)
    if k_weight is not None:
        k = naive_rmsnorm(k, k_weight, eps)
    q = naive_rope(q, positions, inv_freq, rotary_dim, attention_scaling)
    k = naive_rope(k, positions, inv_freq, rotary_dim, attention_scaling)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def naive_group_rmsnorm_gate(o: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                             gate: torch.Tensor) -> torch.Tensor:
    """o, gate: [T, H*D] of one dtype, weight [H*D] -> [T, H*D]: `g_norm(o) * sigmoid(g_proj(x))` of the linear
    layer, each factor rounded to the dtype before the product (as the layer computes it)."""
    return naive_rmsnorm(o, weight, eps, groups) * torch.sigmoid(gate)


def naive_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(residual + x), residual + x): the decoder's `x = x + attn(...)` followed by the next norm."""
    h = residual + x
    return naive_rmsnorm(h, weight, eps), h
