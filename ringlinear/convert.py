"""Softmax-to-hybrid conversion: a softmax-only checkpoint of the same family (every layer GQA, e.g.
Ling-mini-2.0 `bailing_moe_v2`, or a Ring-linear config with layer_group_size 1) becomes a Ring-linear
checkpoint with `layer_group_size = M`: softmax layers are copied; the others become Lightning layers whose
q/k/v/dense come from the softmax layer (KV heads repeated to MHA), with new gate and group-norm
parameters that start the output path at unit scale: g_proj = 0 (gate = 0.5) and g_norm weight = 2.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from ringlinear.config import MODEL_TYPE, RingLinearConfig
from ringlinear.hf import canonical_name, hf_tensors, read_weight_map, save_model
from ringlinear.model import build_model

SOURCE_TYPES = ("bailing_moe_v2", MODEL_TYPE)


def source_config(path: str) -> RingLinearConfig:
    """The source checkpoint's config as a Ring-linear config with every layer softmax."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    mt = d.get("model_type")
    if mt not in SOURCE_TYPES:
        raise ValueError(f"config field model_type={mt!r}: the source must be one of {SOURCE_TYPES}")
    d.pop("architectures", None)
    d["model_type"] = MODEL_TYPE
    if mt == MODEL_TYPE:
        cfg = RingLinearConfig.from_dict(d)
        if "linear" in cfg.layer_types:
            raise ValueError(f"{path} already has linear layers (layer_group_size={cfg.layer_group_size}); "
                             "the source must be softmax-only")
        return cfg
    d["layer_group_size"] = 1
    d.setdefault("group_norm_size", 1)
    return RingLinearConfig.from_dict(d)


def target_config(src: RingLinearConfig, layer_group_size: int, group_norm_size: int | None = None) -> RingLinearConfig:
    if layer_group_size < 2:
        raise ValueError(f"--layer-group-size={layer_group_size}: must be >= 2 (M linear layers per softmax layer + 1)")
    gns = group_norm_size or max(g for g in range(1, min(src.num_attention_heads, 4) + 1)
                                 if src.num_attention_heads % g == 0)
    extra = {k: v for k, v in src.extra.items() if k != "auto_map"}
    return src.replace(layer_group_size=layer_group_size, group_norm_size=gns, linear_silu=False, extra=extra)


def expand_qkv_heads(w: torch.Tensor, H: int, Hkv: int, D: int) -> torch.Tensor:
    """GQA qkv weight [(H + 2 Hkv) D, hidden] -> MHA [3 H D, hidden], each KV head repeated H/Hkv times
    (the order of heads that share it)."""
    q, k, v = w.split([H * D, Hkv * D, Hkv * D], dim=0)
    rep = H // Hkv

    def expand(x):
        return x.view(Hkv, D, -1).repeat_interleave(rep, dim=0).reshape(H * D, -1)

    return torch.cat([q, expand(k), expand(v)], dim=0)


@torch.no_grad()
def convert_softmax_to_hybrid(src_path: str, out_path: str, layer_group_size: int,
                              group_norm_size: int | None = None, dtype: str | None = None) -> RingLinearConfig:
    """Write the hybrid checkpoint at `out_path` (atomically); tokenizer files are copied along."""
    src_cfg = source_config(src_path)
    cfg = target_config(src_cfg, layer_group_size, group_norm_size)
    model = build_model(cfg, "cpu", dtype or cfg.torch_dtype)
    on_disk = {canonical_name(k): (k, f) for k, f in read_weight_map(src_path).items()}
    handles: dict[str, object] = {}

    def read(name: str) -> torch.Tensor:
        if name not in on_disk:
            raise KeyError(f"{src_path}: tensor {name} is missing from the source checkpoint")
        disk_name, fname = on_disk[name]
        if fname not in handles:
            handles[fname] = safe_open(os.path.join(src_path, fname), "pt")
        return handles[fname].get_tensor(disk_name)

    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    used = set()
    for name, param in model.state_dict(keep_vars=True).items():
        for hf_name, piece in hf_tensors(name, param):
            layer_linear = ".attention." in hf_name and hf_name.startswith("model.layers.") and \
                not cfg.is_softmax_layer(int(hf_name.split(".")[2]))
            if layer_linear and hf_name.endswith("attention.g_proj.weight"):
                piece.zero_()
            elif layer_linear and hf_name.endswith("attention.g_norm.weight"):
                piece.fill_(2.0)
            elif layer_linear and hf_name.endswith("attention.query_key_value.weight"):
                piece.copy_(expand_qkv_heads(read(hf_name), H, Hkv, D))
                used.add(hf_name)
            else:
                piece.copy_(read(hf_name))
                used.add(hf_name)
    unused = sorted(set(on_disk) - used)
    if unused:
        raise ValueError(f"{src_path}: {len(unused)} source tensors have no place in the hybrid model: {unused[:5]}")
    extra = {}
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        p = os.path.join(src_path, fname)
        if os.path.exists(p):
            with open(p, "rb") as f:
                extra[fname] = f.read()
    save_model(model, out_path, extra_files=extra)
    return cfg
