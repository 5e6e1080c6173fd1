"""The FP8 training recipe: every dense projection whose sizes are multiples of 128 (attention qkv / gate /
output, dense and shared-expert SwiGLU) runs through `Fp8LinearFn`, and the routed expert GEMMs through
the grouped FP8 GEMM; the router, norms, embeddings and lm_head stay BF16/FP32 (DeepSeek-V3 §3.3.1).
Swapped from outside the model: modules keep their parameter names, so checkpoints are unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ringlinear.layers.moe import MoE
from ringlinear.ops.fp8.gemm import require_fp8
from ringlinear.ops.fp8.linear import Fp8GroupedLinearFn, fp8_linear


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward GEMM (and input-gradient GEMM) is FP8; same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


def _fp8_moe_forward(self: MoE, x: torch.Tensor) -> torch.Tensor:
    # Same routing and combine as ringlinear.ops.moe.routed_experts; the three expert GEMMs in FP8.
    idx, w = self.gate(x)
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k].to(torch.bfloat16)
    offs = torch.bincount(flat, minlength=self.gate_proj.shape[0]).cumsum(0).to(torch.int32)
    h = F.silu(Fp8GroupedLinearFn.apply(xs, self.gate_proj, offs)) * Fp8GroupedLinearFn.apply(xs, self.up_proj, offs)
    ys = Fp8GroupedLinearFn.apply(h, self.down_proj, offs)
    out = torch.empty_like(ys)
    out[order] = ys
    out = (out.view(T, k, -1).float() * w.float()[..., None]).sum(1).to(x.dtype)
    if self.shared_experts is not None:
        out = out + self.shared_experts(x)
    return out


def apply_fp8_recipe(model: nn.Module, experts: bool = True) -> dict[str, int]:
    """Swap eligible projections (in place) to FP8. Raises `Fp8Unavailable` off CUDA/FP8 GPUs: a BF16 run
    must be asked for, never fallen into. Returns counts of swapped / kept modules."""
    require_fp8(next(model.parameters()).device)
    swapped = kept = moe = 0
    for name, mod in list(model.named_modules()):
        if name.endswith("mlp.gate") or "lm_head" in name:
            continue
        if type(mod) is nn.Linear:
            if mod.in_features % 128 == 0 and mod.out_features % 128 == 0:
                mod.__class__ = Fp8Linear
                swapped += 1
            else:
                kept += 1
        elif isinstance(mod, MoE) and experts:
            inter, hid = mod.gate_proj.shape[1:]
            if inter % 16 == 0 and hid % 16 == 0:
                mod.forward = types.MethodType(_fp8_moe_forward, mod)
                moe += 1
    return {"fp8_linears": swapped, "bf16_linears": kept, "fp8_moe_layers": moe}
