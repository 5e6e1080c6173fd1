"""Device, dtype and peak-FLOPs decisions, made once and here: which device a run uses by default, which dtype it
computes in there, how dtype names parse, which parameters stay fp32 when a model is cast (the routers), and the
dense bf16 peak of the GPUs people train on (for MFU)."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
          "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# Dense bf16 tensor-core peak, FLOP/s, from the vendors' datasheets (no sparsity), matched against
# `torch.cuda.get_device_name` in order (the first key that occurs in the name wins).
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 ... -> torch.dtype; a ValueError lists the accepted names."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of config.json's `torch_dtype`)."""
    return str(dtype).removeprefix("torch.")


def default_device(name: str | torch.device | None = None) -> torch.device:
    """`name` when given, else the current CUDA device when there is one, else the CPU."""
    if name is not None:
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device, name: str | torch.dtype | None = "auto") -> torch.dtype:
    """The dtype weights and activations compute in: `name` when given ('bf16', 'fp32', ...), else ('auto' or
    None) bf16 on CUDA and fp32 elsewhere."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)


def fp32_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that stay fp32 whatever the compute dtype: the MoE routers (config `router_dtype`
    fp32: expert choice must not depend on bf16 rounding)."""
    return {id(p) for name, mod in model.named_modules() if name.endswith("mlp.gate") for p in mod.parameters()}


def cast_for_compute(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every parameter to `dtype` in place, except those of `fp32_parameter_ids`; returns the model."""
    keep = fp32_parameter_ids(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.data = p.data.to(dtype)
    return model


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device` from `PEAK_BF16_FLOPS`, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)
