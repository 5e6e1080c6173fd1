"""Parameter, memory and FLOP accounting of a Ring-linear config (computed on the `meta` device, no allocation):
total / activated parameters, KV-cache bytes per token (softmax layers only), linear-state bytes per sequence
(fp32 [H, D, D] per linear layer, independent of length), and training FLOPs per token (for MFU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ringlinear.config import RingLinearConfig
from ringlinear.device import parse_dtype
from ringlinear.layers.moe import MoE
from ringlinear.model import build_model


@dataclass
class ModelStats:
    total_params: int
    embedding_params: int
    mtp_params: int
    active_params: int  # non-embedding parameters used per token (routed experts counted top-k / E), MTP excluded
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    layer_types: list[str]
    mlp_types: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def model_stats(config: RingLinearConfig, kv_dtype: str = "bfloat16") -> ModelStats:
    model = build_model(config, "meta")
    total = sum(p.numel() for p in model.parameters())
    emb = model.model.word_embeddings.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    routed_total = routed_active = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            n = sum(p.numel() for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
            routed_total += n
            routed_active += n * config.num_experts_per_tok // config.num_experts
    active = total - emb - mtp - routed_total + routed_active
    kv_bytes, state_bytes = cache_bytes(config, kv_dtype)
    mlp_types = ["moe" if config.is_moe_layer(i) else "dense" for i in range(config.num_hidden_layers)]
    return ModelStats(total, emb, mtp, active, kv_bytes, state_bytes, config.layer_types, mlp_types)


def cache_bytes(config: RingLinearConfig, kv_dtype: str | torch.dtype = "bfloat16") -> tuple[int, int]:
    """(KV bytes per token over the softmax layers, fp32 state bytes per sequence over the linear layers)."""
    n_soft = config.layer_types.count("softmax")
    n_lin = config.num_hidden_layers - n_soft
    kv = n_soft * 2 * config.num_key_value_heads * config.head_dim * parse_dtype(kv_dtype).itemsize
    state = n_lin * config.num_attention_heads * config.head_dim * config.head_dim * 4
    return kv, state


def train_flops_per_token(config: RingLinearConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (activated non-embedding params + lm_head) + attention: causal softmax
    6*2*H*D*T/2 per softmax layer (QK^T and PV, average context T/2), linear 6*2*H*D*D per linear layer
    (state update k^T v and readout q S)."""
    s = model_stats(config)
    dense = 6 * (s.active_params + config.hidden_size * config.vocab_size)
    H, D = config.num_attention_heads, config.head_dim
    n_soft = config.layer_types.count("softmax")
    n_lin = config.layer_types.count("linear")
    return dense + n_soft * 6 * 2 * H * D * seq_len / 2 + n_lin * 6 * 2 * H * D * D


def human(n: float, unit: str = "") -> str:
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int) -> str:
    for suffix, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n} B"


@dataclass
class RankMemory:
    """What one GPU holds when the engine serves a config over `tensor_parallel_size` ranks: its parameters as
    loaded (FP8 projections and experts with their block scales under `quantization="fp8"`; no MTP modules, which
    the engine does not run), and its part of the cache per token (KV) and per sequence (linear state)."""

    tensor_parallel_size: int
    quantization: str | None
    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int

    def as_dict(self) -> dict:
        return asdict(self)


def rank_memory(config: RingLinearConfig, tensor_parallel_size: int = 1, quantization: str | None = None,
                dtype: str = "bfloat16", kv_dtype: str = "bfloat16") -> RankMemory:
    """Sizes one rank's slice on `meta` through the same transforms the engine applies (no allocation)."""
    from torch import nn

    from ringlinear.distributed.tensor_parallel import ShardGroup, local_config, shard_model
    from ringlinear.loading.fp8 import QUANTIZATIONS, quantize_fp8

    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization={quantization!r}: one of {QUANTIZATIONS} or None")
    model = build_model(config, "meta", dtype)
    model.model.mtp = nn.ModuleList()
    if tensor_parallel_size > 1:
        shard_model(model, ShardGroup(0, tensor_parallel_size))
    if quantization == "fp8":
        quantize_fp8(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv, state = cache_bytes(local_config(config, tensor_parallel_size), kv_dtype)
    return RankMemory(tensor_parallel_size, quantization, weights, kv, state)
