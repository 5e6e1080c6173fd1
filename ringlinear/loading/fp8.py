"""FP8 weights for inference (the engine's `quantization="fp8"`): the projections of the decoder layers (attention
qkv, g_proj, dense; dense MLPs; shared experts) and the routed experts in e4m3 with one fp32 scale per 128x128 block
(DeepSeek-V3 §3.3); embeddings, lm_head, routers and norms stay in their dtype. `quantize_fp8(model)` is applied to
a model from outside it (a built model: quantized in place; a `meta` model: FP8 slots a loader fills). HF
checkpoints that ship FP8 weights (`quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`,
`weight` in float8_e4m3fn beside `weight_scale_inv`, the layout vLLM and SGLang load) load as they are
(`ringlinear.loading.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ringlinear.config import ConfigError, RingLinearConfig
from ringlinear.distributed.tensor_parallel import ParallelMoE, swap_class
from ringlinear.layers.linear import Linear, block_scale_shape
from ringlinear.layers.moe import MoE
from ringlinear.ops.fp8.inference import quantize_weight
from ringlinear.ops.fp8.naive import FP8

QUANTIZATIONS = ("fp8",)


def fp8_checkpoint(config: RingLinearConfig) -> bool:
    """Whether config.json says the checkpoint holds FP8 weights; its `quantization_config` is checked against what
    we run (e4m3, 128x128 blocks, activations quantized at run time), an error naming the field otherwise."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return False

    def bad(field: str, allowed: str):
        raise ConfigError(f"config field quantization_config.{field}={qc.get(field)!r}: {allowed}")

    if not isinstance(qc, dict):
        raise ConfigError(f"config field quantization_config={qc!r}: must be an object")
    if qc.get("quant_method") != "fp8":
        bad("quant_method", "only 'fp8' checkpoints load (e4m3 weights with weight_scale_inv block scales)")
    if qc.get("weight_block_size") != [128, 128]:
        bad("weight_block_size", "must be [128, 128] (the blocks our FP8 kernels scale by; per-tensor FP8 is not "
                                 "supported)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        bad("activation_scheme", "must be 'dynamic' (activations are quantized per 1x128 group at run time)")
    if qc.get("fmt", "e4m3") != "e4m3":
        bad("fmt", "must be 'e4m3'")
    return True


def require_fp8_device(device: torch.device) -> None:
    """FP8 weights run on the CPU (the references) and on CUDA GPUs with FP8 tensor cores (sm_89+)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = torch.cuda.get_device_capability(device)
        raise ConfigError(f"engine config field quantization='fp8': FP8 GEMMs need compute capability >= 8.9, "
                          f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


def fp8_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the weights `quantize_fp8` converts: every linear inside the decoder layers and the
    stacked routed experts (the router is no linear: it stays fp32)."""
    names = []
    for name, mod in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(mod, (nn.Linear, Linear)):
            names.append(f"{name}.weight")
        elif isinstance(mod, MoE):
            names += [f"{name}.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
    return names


@torch.no_grad()
def quantize_fp8(model: nn.Module, select: Callable[[str], bool] | None = None) -> nn.Module:
    """Convert the weights of `fp8_weight_names(model)` (those `select(name)` accepts; default all) to e4m3 with
    128x128 block scales, in place: linears become `Linear` with `weight_scale_inv`, MoE blocks `ParallelMoE` with
    `{gate,up,down}_proj_scale_inv`. On `meta`, only the FP8 slots are made. Returns the model."""
    select = select or (lambda name: True)
    for prefix, mod in list(model.model.layers.named_modules(prefix="model.layers")):
        for child_name, child in list(mod.named_children()):
            name = f"{prefix}.{child_name}.weight"
            if isinstance(child, Linear):
                if select(name):
                    child.to_fp8()
            elif isinstance(child, nn.Linear) and select(name):
                setattr(mod, child_name, Linear.like(child, fp8=True))
        if isinstance(mod, MoE):
            chosen = [w for w in ("gate_proj", "up_proj", "down_proj") if select(f"{prefix}.{w}")]
            if chosen and len(chosen) < 3:
                raise ValueError(f"quantize_fp8: {prefix} would hold experts {chosen} in FP8 and the others not; the "
                                 "expert kernels take all three in one format")
            if chosen:
                swap_class(mod, ParallelMoE)
                for w in chosen:
                    p = getattr(mod, w)
                    if p.device.type == "meta":
                        w8 = torch.empty(p.shape, dtype=FP8, device="meta")
                        scale = torch.empty(p.shape[0], *block_scale_shape(*p.shape[1:]), device="meta")
                    else:
                        w8, scale = quantize_weight(p)
                    setattr(mod, w, nn.Parameter(w8, requires_grad=False))
                    setattr(mod, f"{w}_scale_inv", nn.Parameter(scale, requires_grad=False))
    return model
