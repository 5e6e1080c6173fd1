"""RingLinearConfig: the Ring-linear hyper-parameters under the official `config.json` field names
(`BailingMoeLinearV2ForCausalLM`, `model_type: bailing_moe_linear`), checked on construction, plus
named presets (the two released models and small ones for tests and demos)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ringlinear.config_base import ConfigBase, ConfigError

ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
MODEL_TYPE = "bailing_moe_linear"


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "ConfigError", "PRESETS", "RingLinearConfig", "preset"]


@dataclass
class RingLinearConfig(ConfigBase):
    """The model's hyper-parameters, named as in the official config.json (docs/architecture.md lists what each
    means for the layers)."""

    _where: ClassVar[str] = "config"
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None  # None: moe_intermediate_size (per shared expert)
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False
    lightning_layerwise_decay: bool = True
    first_k_dense_replace: int = 1
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_bias_update_rate: float = 1e-3
    router_dtype: str = "fp32"
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_rmsnorm: bool = True
    rms_norm_eps: float = 1e-6
    partial_rotary_factor: float = 0.5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] = 156892
    pad_token_id: int = 156892
    torch_dtype: str = "bfloat16"
    # Fields of config.json this class does not model (auto_map, dropout rates, ...): kept verbatim
    # so that load -> save returns the file the user gave.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- derived layout -------------------------------------------------------------------------
    def is_softmax_layer(self, i: int) -> bool:
        """Layer i is softmax when (i+1) % G == 0, or past the last whole group (docs/architecture.md, "Layer layout").
        `layer_group_size = 0` (a ringlinear extension, for studies) means no softmax layer at all."""
        G, L = self.layer_group_size, self.num_hidden_layers
        if G == 0:
            return False
        return (i + 1) % G == 0 or i >= (L // G) * G

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_k_dense_replace

    @property
    def layer_types(self) -> list[str]:
        return ["softmax" if self.is_softmax_layer(i) else "linear" for i in range(self.num_hidden_layers)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_expert_intermediate_size(self) -> int:
        per = self.moe_shared_expert_intermediate_size or self.moe_intermediate_size
        return per * self.num_shared_experts

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        need = self.require
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "group_norm_size",
                     "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(isinstance(self.layer_group_size, int) and self.layer_group_size >= 0, "layer_group_size",
             "must be an integer >= 1 (0: every layer linear, a ringlinear extension)")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(self.num_attention_heads % self.group_norm_size == 0, "group_norm_size",
             f"must divide num_attention_heads={self.num_attention_heads} (groups of whole heads)")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (rotary pairs)")
        need(0.0 < self.partial_rotary_factor <= 1.0 and self.rotary_dim % 2 == 0 and self.rotary_dim >= 2,
             "partial_rotary_factor", f"must be in (0, 1] and give an even rotary dim (head_dim={self.head_dim})")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        self._check_rope_scaling()
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.use_rmsnorm, "use_rmsnorm", "only true is supported (Ring-linear uses RMSNorm)")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.router_dtype in ("fp32", "float32", "bf16", "bfloat16"), "router_dtype",
             "must be one of fp32, bf16")
        need(self.torch_dtype in ("bfloat16", "float32", "float16"), "torch_dtype",
             "must be one of bfloat16, float32, float16")
        if self.num_experts > 0:
            need(self.score_function == "sigmoid", "score_function", "only 'sigmoid' is supported")
            need(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, num_experts={self.num_experts}]")
            need(self.n_group >= 1 and self.num_experts % self.n_group == 0, "n_group",
                 f"must be >= 1 and divide num_experts={self.num_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.num_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2, "n_group",
                 "groups are scored by their top-2 experts: each group needs >= 2 experts")
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"topk_group * experts-per-group must be >= num_experts_per_tok={self.num_experts_per_tok}")
            need(self.moe_intermediate_size >= 1, "moe_intermediate_size", "must be >= 1")
            need(self.moe_shared_expert_intermediate_size is None
                 or (isinstance(self.moe_shared_expert_intermediate_size, int)
                     and self.moe_shared_expert_intermediate_size >= 1),
                 "moe_shared_expert_intermediate_size", "must be null (= moe_intermediate_size) or an integer >= 1")
            need(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        need(self.num_experts >= 0, "num_experts", "must be >= 0 (0 = dense model)")
        self._check_unimplemented_fields()

    def _check_rope_scaling(self) -> None:
        """`rope_scaling` as transformers reads it: null, or an object with `rope_type` (or the older `type`) and
        the fields of that type (`ROPE_SCALING_KEYS`); `ringlinear.layers.rotary.rope_frequencies` computes it."""
        rs = self.rope_scaling
        if rs is None:
            return

        def bad(key: str, allowed: str) -> None:
            raise ConfigError(f"config field rope_scaling.{key}={rs.get(key)!r}: {allowed}")

        types = ", ".join(repr(t) for t in ROPE_SCALING_KEYS)
        if not isinstance(rs, dict) or not ({"type", "rope_type"} & set(rs)):
            raise ConfigError(f"config field rope_scaling={rs!r}: must be null or an object with rope_type one of {types}")
        if "type" in rs and "rope_type" in rs and rs["type"] != rs["rope_type"]:
            bad("type", f"differs from rope_scaling.rope_type={rs['rope_type']!r}; give one of them")
        key = "rope_type" if "rope_type" in rs else "type"
        kind = rs[key]
        if kind not in ROPE_SCALING_KEYS:
            bad(key, f"allowed types: {types}")
        allowed = {"type", "rope_type", "rope_theta", "partial_rotary_factor", *ROPE_SCALING_KEYS[kind]}
        for k in rs:
            if k not in allowed:
                bad(k, f"not a field of rope_type {kind!r}; allowed: {', '.join(sorted(allowed))}")
        for k in ("rope_theta", "partial_rotary_factor"):  # transformers v5 repeats them inside; must agree
            if k in rs and rs[k] != getattr(self, k):
                bad(k, f"must equal the top-level {k}={getattr(self, k)!r}")

        def number(k: str, ok, allowed: str) -> None:
            v = rs.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not ok(v)):
                bad(k, allowed)

        if kind == "default":
            return
        derived = kind == "yarn" and bool(rs.get("original_max_position_embeddings"))
        if "factor" not in rs or (rs["factor"] is None and not derived):
            bad("factor", "required: a number >= 1 (yarn: null means max_position_embeddings / "
                "original_max_position_embeddings)")
        number("factor", lambda v: v >= 1, "must be a number >= 1")
        if kind == "dynamic" and self.rotary_dim <= 2:
            bad("rope_type", f"dynamic NTK needs a rotary dim > 2, got {self.rotary_dim}")
        if kind != "yarn":
            return
        omp = rs.get("original_max_position_embeddings")
        if omp is not None and (isinstance(omp, bool) or not isinstance(omp, int) or omp < 1):
            bad("original_max_position_embeddings", "must be an integer >= 1 (the pre-training context length)")
        number("attention_factor", lambda v: v > 0, "must be a number > 0")
        number("beta_fast", lambda v: v > 0, "must be a number > 0")
        number("beta_slow", lambda v: v > 0, "must be a number > 0")
        number("mscale", lambda v: v >= 0, "must be a number >= 0")
        number("mscale_all_dim", lambda v: v >= 0, "must be a number >= 0")
        if (rs.get("beta_fast") or 32) < (rs.get("beta_slow") or 1):
            bad("beta_fast", f"must be >= beta_slow={rs.get('beta_slow') or 1} (defaults 32 and 1)")
        if "truncate" in rs and not isinstance(rs["truncate"], bool):
            bad("truncate", "must be true or false")

    def _check_unimplemented_fields(self) -> None:
        """Fields other implementations read (`UNIMPLEMENTED_FIELDS`) that this model has no switch for: refused
        unless they hold the value that means what ringlinear computes (then kept verbatim in `extra`)."""
        for name, (ok, allowed) in UNIMPLEMENTED_FIELDS.items():
            if name in self.extra and not ok(self, self.extra[name]):
                raise ConfigError(f"config field {name}={self.extra[name]!r}: only {allowed} is supported")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["architectures"] = [ARCHITECTURE]
        d["model_type"] = MODEL_TYPE
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RingLinearConfig:
        d = dict(d)
        mt = d.get("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ConfigError(f"config field model_type={mt!r}: expected {MODEL_TYPE!r} (a Ring-linear checkpoint)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "head_dim" not in d and "hidden_size" in d and "num_attention_heads" in d:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("architectures", "model_type")}
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> RingLinearConfig:
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.exists(p):
            raise FileNotFoundError(f"no config.json at {p}")
        with open(p) as f:
            return cls.from_dict(json.load(f))



# rope_scaling types and the fields each takes, as transformers' `_validate_<type>_rope_parameters` lists them
# (transformers 5.24, modeling_rope_utils.py); `type` is the older spelling of `rope_type`.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
}


def _layer_list_matches(cfg: RingLinearConfig, value: Any) -> bool:
    names = {"softmax": ("attention", "full_attention"), "linear": ("linear_attention",)}
    return (isinstance(value, list) and len(value) == cfg.num_hidden_layers
            and all(v in names[t] for v, t in zip(value, cfg.layer_types)))


def _rope_signature(cfg: RingLinearConfig, d: dict | None) -> tuple:
    """(type, scaling fields) of a rope_scaling / rope_parameters object, transformers' defaults filled in."""
    d = dict(d or {})
    kind = d.pop("rope_type", d.pop("type", "default"))
    for k in ("rope_theta", "partial_rotary_factor"):
        d.pop(k, None)
    if kind == "yarn":
        d.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    return kind, sorted((k, v) for k, v in d.items() if v is not None)


def _rope_parameters_agree(cfg: RingLinearConfig, v: Any) -> bool:
    return (isinstance(v, dict) and v.get("rope_theta", cfg.rope_theta) == cfg.rope_theta
            and v.get("partial_rotary_factor", cfg.partial_rotary_factor) == cfg.partial_rotary_factor
            and _rope_signature(cfg, v) == _rope_signature(cfg, cfg.rope_scaling))


def _original_max_agrees(cfg: RingLinearConfig, v: Any) -> bool:
    # transformers lets a top-level original_max_position_embeddings override the one inside a yarn rope_scaling
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type")) != "yarn" or v == rs.get("original_max_position_embeddings")


# Fields of config.json that other implementations read and ringlinear has no switch for: name ->
# (holds the value that means what ringlinear computes, what is allowed). Sources: SGLang
# python/sglang/srt/models/bailing_moe_linear.py and configs/bailing_moe_linear.py, vLLM
# model_executor/layers/mamba/linear/bailing_linear_attn.py and models/bailing_moe_linear.py, the MLX port
# mlx_lm/models/bailing_moe_linear.py, sgl-jax's Bailing hybrid config, transformers' RoPE standardisation.
UNIMPLEMENTED_FIELDS: dict[str, tuple[Callable[[RingLinearConfig, Any], bool], str]] = {
    "linear_rope": (lambda c, v: v is True, "true (RoPE in the linear layers too)"),
    "rotary_dim": (lambda c, v: v == c.rotary_dim, "head_dim * partial_rotary_factor (set partial_rotary_factor)"),
    "use_linear_silu": (lambda c, v: v is c.linear_silu, "the value of linear_silu (set linear_silu)"),
    "num_linear_key_value_heads": (lambda c, v: v == c.num_attention_heads,
                                   "num_attention_heads (the linear layers are multi-head, one KV head per head)"),
    "layers_block_type": (_layer_list_matches, "the layout layer_group_size gives ('linear_attention' / 'attention')"),
    "layer_types": (_layer_list_matches, "the layout layer_group_size gives ('linear_attention' / 'full_attention')"),
    "full_attention_type": (lambda c, v: v is None, "null (the softmax layers are GQA; MLA is not implemented)"),
    "using_split_qkv_in_self_attention": (lambda c, v: v is False, "false (one fused query_key_value)"),
    "rope_traditional": (lambda c, v: v is False, "false (NeoX rotate-half RoPE)"),
    "norm_head": (lambda c, v: v is False, "false (plain lm_head)"),
    "norm_softmax": (lambda c, v: v is False, "false"),
    "moe_router_enable_routed_scaling": (lambda c, v: v is True, "true (routed_scaling_factor always applies)"),
    "moe_router_enable_shared_expert": (lambda c, v: v is True, "true (set num_shared_experts=0 for none)"),
    "scoring_func": (lambda c, v: v == c.score_function, "the value of score_function"),
    "topk_method": (lambda c, v: v == "noaux_tc", "'noaux_tc' (group-limited top-k with a selection-only bias)"),
    "embedding_dropout": (lambda c, v: v is None or v == 0, "0.0 (ringlinear trains without dropout)"),
    "attention_dropout": (lambda c, v: v is None or v == 0, "0.0 (ringlinear trains without dropout)"),
    "output_dropout": (lambda c, v: v is None or v == 0, "0.0 (ringlinear trains without dropout)"),
    "original_max_position_embeddings": (_original_max_agrees, "with a yarn rope_scaling, the value of "
                                         "rope_scaling.original_max_position_embeddings (set it there)"),
    "rope_parameters": (_rope_parameters_agree, "an object agreeing with rope_theta, partial_rotary_factor and "
                        "rope_scaling (transformers v5 writes both; set rope_scaling)"),
}


def _ring_mini() -> RingLinearConfig:
    # Published config.json of inclusionAI/Ring-mini-linear-2.0.
    return RingLinearConfig(moe_shared_expert_intermediate_size=512)


def _ring_flash() -> RingLinearConfig:
    # Published config.json of inclusionAI/Ring-flash-linear-2.0 (Ling-flash-2.0 base: 32 layers, 7 linear + 1
    # softmax per group, hidden 4096, 32 heads / 4 KV heads, moe_intermediate_size 1024, intermediate 9216).
    return RingLinearConfig(
        hidden_size=4096, intermediate_size=9216, moe_intermediate_size=1024,
        moe_shared_expert_intermediate_size=1024, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, layer_group_size=8, group_norm_size=8,
    )


def _tiny() -> RingLinearConfig:
    # A few million parameters exercising every path: 2 layer groups (2 linear + 1 softmax), dense first
    # layer, grouped MoE with a shared expert, one MTP module, byte-level vocabulary.
    return RingLinearConfig(
        vocab_size=320, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, layer_group_size=3, group_norm_size=2, first_k_dense_replace=1,
        num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3, max_position_embeddings=4096,
        rope_theta=10000.0, eos_token_id=257, pad_token_id=256, bos_token_id=None, torch_dtype="float32",
        initializer_range=0.02,
    )


def _small() -> RingLinearConfig:
    # The demo model (~20M parameters): 3 groups of 3 linear + 1 softmax.
    return RingLinearConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, layer_group_size=4, group_norm_size=2, first_k_dense_replace=1,
        num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3, max_position_embeddings=8192,
        rope_theta=10000.0, eos_token_id=1, pad_token_id=0, torch_dtype="float32", initializer_range=0.02,
    )


PRESETS = {
    "ring-mini-linear-2.0": _ring_mini,
    "ring-flash-linear-2.0": _ring_flash,
    "tiny": _tiny,
    "small": _small,
}


def preset(name: str, **overrides: Any) -> RingLinearConfig:
    """A named preset, optionally with fields overridden (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
