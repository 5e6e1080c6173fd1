"""GQA softmax attention layer of Ring-linear: fused qkv, QK-norm, partial NeoX RoPE, causal attention
with scale 1/sqrt(D), dense output projection; no output gate.   (docs/architecture.md, "Softmax attention layer")
"""

from __future__ import annotations

import torch
from torch import nn

from ringlinear.layers.norms import RMSNorm
from ringlinear.layers.rotary import RotaryEmbedding
from ringlinear.ops.batch_invariant import current_alignment, project
from ringlinear.ops.fused_norms import qk_norm_rope


class SoftmaxAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        self.use_qk_norm = config.use_qk_norm
        self.scale = D**-0.5
        width = (self.num_heads + 2 * self.num_kv_heads) * D
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * D, config.hidden_size, bias=config.use_bias)
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)

    def reset_buffers(self) -> None:
        self.rotary.reset_buffers()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; engine forwards (`ctx.inference`) run QK-norm + RoPE as one fused kernel
        (`ringlinear.ops.fused_norms.qk_norm_rope`, the same composition)."""
        T = x.shape[0]
        if ctx.inference and not current_alignment().unfused:
            n = self.query_layernorm if self.use_qk_norm else None
            q, k, v = qk_norm_rope(project(x, self.query_key_value), self.num_heads, self.num_kv_heads, self.head_dim,
                                   n.weight if n else None, self.key_layernorm.weight if n else None,
                                   n.eps if n else 0.0, ctx.positions, self.rotary.inv_freq, self.rotary.rotary_dim,
                                   self.rotary.attention_factor, out_dtype=x.dtype)
            return project(ctx.softmax_attention(self.layer_idx, q, k, v, self.scale).reshape(T, -1), self.dense)
        qkv = project(x, self.query_key_value).view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q.float()), self.key_layernorm(k.float())
        dt = x.dtype
        q, k = self.rotary(q, ctx.positions).to(dt), self.rotary(k, ctx.positions).to(dt)
        o = ctx.softmax_attention(self.layer_idx, q, k, v.contiguous(), self.scale)
        return project(o.reshape(T, -1), self.dense)
