"""Lightning (linear) attention layer of Ring-linear: MHA, fp32 recurrent state, per-head decay.

qkv -> [SiLU] -> QK-norm -> partial RoPE -> lightning_attn (decay g_h = -slope_h * depth factor)
-> group RMSNorm over H*D -> * sigmoid(g_proj(x)) -> dense.   (docs/architecture.md, "Linear attention layer")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ringlinear.layers.norms import GroupRMSNorm, RMSNorm
from ringlinear.layers.rotary import RotaryEmbedding
from ringlinear.ops.batch_invariant import current_alignment, project
from ringlinear.ops.fused_norms import group_rmsnorm_gate, qk_norm_rope
from ringlinear.ops.lightning import decay_slopes


class LightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.head_dim = D = config.head_dim
        self.num_layers = config.num_hidden_layers
        self.layerwise_decay = config.lightning_layerwise_decay
        self.linear_silu = config.linear_silu
        self.use_qk_norm = config.use_qk_norm
        self.scale = D**-0.5
        self.query_key_value = nn.Linear(config.hidden_size, 3 * H * D, bias=config.use_qkv_bias)
        self.g_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.dense = nn.Linear(H * D, config.hidden_size, bias=config.use_bias)
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.g_norm = GroupRMSNorm(H * D, config.group_norm_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self.register_buffer("decay", self._decay(), persistent=False)

    def _decay(self) -> torch.Tensor:
        return decay_slopes(self.num_heads, self.layer_idx, self.num_layers, self.layerwise_decay)

    def reset_buffers(self) -> None:
        self.decay = self._decay().to(self.decay.device)
        self.rotary.reset_buffers()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x: [T, hidden] packed tokens of ctx's sequences -> [T, hidden]. Engine forwards (`ctx.inference`) run the
        fused kernels of `ringlinear.ops.fused_norms` (the same composition in one kernel each)."""
        if ctx.inference and not current_alignment().unfused:
            return self._inference_forward(x, ctx)
        T = x.shape[0]
        qkv = project(x, self.query_key_value).float().view(T, 3 * self.num_heads, self.head_dim)
        if self.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.split(self.num_heads, dim=1)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = self.rotary(q, ctx.positions), self.rotary(k, ctx.positions)
        dt = x.dtype
        o = ctx.linear_attention(self.layer_idx, q.to(dt), k.to(dt), v.to(dt), self.decay, self.scale)
        o = self.g_norm(o.reshape(T, -1)) * torch.sigmoid(project(x, self.g_proj))
        return project(o, self.dense)

    def _inference_forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        H, D = self.num_heads, self.head_dim
        q, k, v = qk_norm_rope(
            project(x, self.query_key_value), H, H, D, self.query_layernorm.weight if self.use_qk_norm else None,
            self.key_layernorm.weight if self.use_qk_norm else None, self.query_layernorm.eps if self.use_qk_norm
            else 0.0, ctx.positions, self.rotary.inv_freq, self.rotary.rotary_dim, self.rotary.attention_factor,
            silu=self.linear_silu, out_dtype=x.dtype)
        o = ctx.linear_attention(self.layer_idx, q, k, v, self.decay, self.scale)
        o = group_rmsnorm_gate(o.reshape(x.shape[0], -1), self.g_norm.weight, self.g_norm.groups, self.g_norm.eps,
                               project(x, self.g_proj))
        return project(o, self.dense)
