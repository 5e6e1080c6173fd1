"""Feed-forward blocks: dense SwiGLU MLP, and the MoE block (sigmoid group-limited router with a
selection-only expert bias, routed SwiGLU experts, shared expert).   (docs/architecture.md, "MoE")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ringlinear.ops.backend import use_triton
from ringlinear.ops.batch_invariant import aligned_value, bi_linear, bi_routed_experts, current_alignment, project
from ringlinear.ops.moe import DECODE_MAX_PAIRS, expert_counts, grouped_topk, routed_experts
from ringlinear.ops.swiglu import swiglu


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused on CUDA (ringlinear.ops.swiglu)
        return project(swiglu(project(x, self.gate_proj), project(x, self.up_proj)), self.down_proj)


class Router(nn.Module):
    """`weight: [E, hidden]` kept in fp32 (router_dtype); `expert_bias: [E]` fp32, moved by the balancer,
    never by gradient. `tokens_per_expert` counts routed tokens while training (read and reset by the trainer)."""

    def __init__(self, config):
        super().__init__()
        E = config.num_experts
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        bias = torch.zeros(E, dtype=torch.float32)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", bias)
        else:
            self.expert_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if current_alignment().moe:  # batch-invariant fp32 logits
            logits = bi_linear(x.float(), self.weight.float(), out_dtype=torch.float32)
        else:
            logits = F.linear(x.float(), self.weight.float())
        idx, w = grouped_topk(logits, self.expert_bias, self.top_k, self.n_group, self.topk_group,
                              self.norm_topk_prob, self.routed_scaling_factor, batch_invariant=current_alignment().moe)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(idx.reshape(-1), self.weight.shape[0]).float()
        return idx, w


class MoE(nn.Module):
    """Experts are stored stacked (`gate_proj`, `up_proj`: [E, I, hidden]; `down_proj`: [E, hidden, I]);
    `ringlinear.hf` maps them to the per-expert tensors of the HF layout."""

    def __init__(self, config):
        super().__init__()
        E, Im, Hd = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate = Router(config)
        self.gate_proj = nn.Parameter(torch.empty(E, Im, Hd))
        self.up_proj = nn.Parameter(torch.empty(E, Im, Hd))
        self.down_proj = nn.Parameter(torch.empty(E, Hd, Im))
        self.shared_experts = (
            SwiGLU(Hd, config.shared_expert_intermediate_size, config.use_bias) if config.num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, decode: bool = False, inference: bool = False) -> torch.Tensor:
        """x: [T, hidden]. `inference` (the engine's forwards, no autograd) on the Triton backend: the router's choice
        in one kernel after one fp32 logits GEMM; with `decode` too (a decode step's few tokens) the experts run the
        fused small-batch kernels, reading each touched expert's weights once."""
        if current_alignment().moe:
            return self._aligned_forward(x)
        fast = (inference or decode) and not torch.is_grad_enabled() and use_triton(x)
        if fast:
            from ringlinear.ops.moe.fused_routing import RouterConfig, fused_router_topk

            g = self.gate
            # logits from one cuBLAS fp32 GEMM, then the one-token-per-program choice kernel (the fastest on the
            # H200: benchmarks/NOTES_kernels.md)
            idx, w = fused_router_topk(x, g.weight, g.expert_bias, g.top_k, g.n_group, g.topk_group,
                                       g.norm_topk_prob, g.routed_scaling_factor, config=RouterConfig(logits="gemm"))
        else:
            idx, w = self.gate(x)
        out = self.routed(x, idx, w, fused=fast and decode and x.shape[0] * self.gate.top_k <= DECODE_MAX_PAIRS)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _aligned_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The `moe` alignment switch: router logits by the batch-invariant GEMM, each (token, expert) pair computed
        on its own (values); gradients from the grouped form."""
        idx, w = self.gate(x)
        out = aligned_value(
            lambda x, w, a, b, c: bi_routed_experts(x, idx, w, a, b, c),
            lambda x, w, a, b, c: routed_experts(x, idx, w, a, b, c),
            x, w, self.gate_proj, self.up_proj, self.down_proj)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fused: bool) -> torch.Tensor:
        """The routed experts' weighted sum for the choices (idx, w): the fused decode kernels when `fused`, the
        grouped GEMMs otherwise (the expert-parallel / FP8 form overrides this: distributed/tensor_parallel.py)."""
        if fused:
            from ringlinear.ops.moe.fused_moe import fused_moe

            return fused_moe(x, idx, w, self.gate_proj, self.up_proj, self.down_proj)
        return routed_experts(x, idx, w, self.gate_proj, self.up_proj, self.down_proj)
