"""Ring-linear (`BailingMoeLinearV2ForCausalLM`) for transformers' remote code, written by ringlinear beside the
checkpoints it saves: the forward of `ringlinear.model`, in plain PyTorch (needs only torch and transformers).

Each layer: x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x)). Linear (Lightning) layers, in fp32:
S_t = exp(g_h) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(D), then group RMSNorm and a sigmoid gate; softmax layers:
causal GQA. Both apply QK-norm and NeoX RoPE to the first `head_dim * partial_rotary_factor` dims. MoE layers route
with sigmoid scores, group-limited top-k chosen with a selection-only expert bias. `generate` carries a
`BailingMoeLinearCache`: keys/values of the softmax layers and fp32 states of the linear layers. MTP tensors in the
checkpoint are not used.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_bailing_moe_linear import BailingMoeLinearV2Config


# ---- position and decay constants (python floats: modules may be built on the `meta` device) -----------------
def rope_frequencies(rotary_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int | None):
    """(inv_freq list [rotary_dim/2], attention factor) for `rope_scaling` (None, default, linear, dynamic, yarn)
    as transformers defines them, in fp64; dynamic NTK is the static form vLLM/SGLang serve (the frequencies
    transformers reaches at `factor * max_position_embeddings`)."""
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    dim = rotary_dim

    def inv_freq(base: float) -> torch.Tensor:
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)

    if kind == "default":
        return inv_freq(theta).tolist(), 1.0
    if kind == "linear":
        return (inv_freq(theta) / scaling["factor"]).tolist(), 1.0
    if kind == "dynamic":
        factor = scaling["factor"]
        return inv_freq(theta * (factor * factor - (factor - 1)) ** (dim / (dim - 2))).tolist(), 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not one of default, linear, dynamic, yarn")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    base_freq = inv_freq(theta)
    return (base_freq / factor * (1 - extrapolation) + base_freq * extrapolation).tolist(), float(attention_factor)


def alibi_slopes(num_heads: int) -> list[float]:
    """`r^(h+1)`, `r = 2^(-2^-(log2(H) - 3))` for H a power of two; else the nearest lower power's slopes followed by
    every other slope of twice that count."""
    def power_of_two(n: int) -> list[float]:
        r = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [r ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def linear_layer_decay(num_heads: int, layer_idx: int, num_layers: int, layerwise: bool) -> list[float]:
    """Log decay g_h = -slope_h * (1 - (i - 1) / (L - 1) + 1e-5), the official remote code's depth factor."""
    factor = 1.0 - (layer_idx - 1) / (num_layers - 1) + 1e-5 if layerwise and num_layers > 1 else 1.0 + 1e-5
    return [-(s * factor) for s in alibi_slopes(num_heads)]


def is_softmax_layer(config, i: int) -> bool:
    G, L = config.layer_group_size, config.num_hidden_layers
    return G != 0 and ((i + 1) % G == 0 or i >= (L // G) * G)


# ---- modules -----------------------------------------------------------------------------------------------------
class BailingMoeLinearRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w over each of `groups` slices of the last dim, fp32, rounded to x's dtype."""

    def __init__(self, dim: int, eps: float, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.groups = eps, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.groups > 1:
            h = h.unflatten(-1, (self.groups, -1))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.groups > 1:
            h = h.flatten(-2)
        return (h * self.weight.float()).to(x.dtype)


class BailingMoeLinearRotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        self.inv_freq, self.attention_factor = rope_frequencies(self.rotary_dim, config.rope_theta, scaling,
                                                                config.max_position_embeddings)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D], positions: [B, T] -> fp32 x with the first rotary_dim dims rotated (rotate-half)."""
        x = x.float()
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=x.device)
        angles = positions.float()[..., None] * inv_freq
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        half = self.rotary_dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def lightning_attention(q, k, v, g, valid, state, scale, chunk_size=64):
    """Chunked form of S_t = exp(a_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t, with a_t = g_h on real tokens and
    a_t = 0, k_t = v_t = 0 on padding (the state passes padding unchanged). q, k, v: [B, H, T, D] fp32; g: [H];
    valid: [B, T] bool or None; state: [B, H, D, D] fp32. Returns (o [B, H, T, D], final state)."""
    B, H, T, D = q.shape
    a = g[None, :, None].expand(B, H, T)
    if valid is not None:
        keep = valid[:, None, :, None]
        a = torch.where(valid[:, None, :], a, torch.zeros_like(a))
        k, v = torch.where(keep, k, torch.zeros_like(k)), torch.where(keep, v, torch.zeros_like(v))
    outs = []
    for s in range(0, T, chunk_size):
        qc, kc, vc = q[:, :, s : s + chunk_size], k[:, :, s : s + chunk_size], v[:, :, s : s + chunk_size]
        c = qc.shape[2]
        G = a[:, :, s : s + c].cumsum(-1)  # [B, H, c]: log decay from the chunk start through token i
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        # exp of non-positive exponents only: the masked upper triangle is exp(-inf) = 0
        intra_decay = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))
        intra = ((qc @ kc.transpose(-1, -2)) * intra_decay) @ vc
        inter = (qc * torch.exp(G)[..., None]) @ state
        outs.append((intra + inter) * scale)
        last = G[..., -1:]
        state = torch.exp(last)[..., None] * state + (kc * torch.exp(last - G)[..., None]).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, D)
    return o, state


class BailingMoeLinearLightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.head_dim = D = config.head_dim
        self.linear_silu = config.linear_silu
        self.use_qk_norm = config.use_qk_norm
        self.scale = D**-0.5
        self.query_key_value = nn.Linear(config.hidden_size, 3 * H * D, bias=config.use_qkv_bias)
        self.g_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.dense = nn.Linear(H * D, config.hidden_size, bias=config.use_bias)
        if self.use_qk_norm:
            self.query_layernorm = BailingMoeLinearRMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = BailingMoeLinearRMSNorm(D, config.rms_norm_eps)
        self.g_norm = BailingMoeLinearRMSNorm(H * D, config.rms_norm_eps, config.group_norm_size)
        self.rotary = BailingMoeLinearRotary(config)
        self.decay = linear_layer_decay(H, layer_idx, config.num_hidden_layers,
                                        getattr(config, "lightning_layerwise_decay", True))

    def forward(self, x, positions, valid, state):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).float().view(B, T, 3 * self.num_heads, self.head_dim)
        if self.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.split(self.num_heads, dim=2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        dt = x.dtype
        # rounded to the activation dtype as ringlinear's kernels read them, then the recurrence in fp32
        q, k, v = (t.to(dt).float().transpose(1, 2) for t in (q, k, v))
        g = torch.tensor(self.decay, dtype=torch.float32, device=x.device)
        if state is None:
            state = q.new_zeros(B, self.num_heads, self.head_dim, self.head_dim)
        o, state = lightning_attention(q, k, v, g, valid, state, self.scale)
        o = o.transpose(1, 2).to(dt).reshape(B, T, -1)
        o = self.g_norm(o) * torch.sigmoid(self.g_proj(x))
        return self.dense(o), state


class BailingMoeLinearSoftmaxAttention(nn.Module):
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
            self.query_layernorm = BailingMoeLinearRMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = BailingMoeLinearRMSNorm(D, config.rms_norm_eps)
        self.rotary = BailingMoeLinearRotary(config)

    def forward(self, x, positions, key_valid, past):
        """key_valid: [B, S] bool over past + new keys, or None (no padding); past: (k, v) [B, Hkv, S', D] or None."""
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q.float()), self.key_layernorm(k.float())
        dt = x.dtype
        q, k = self.rotary(q, positions).to(dt), self.rotary(k, positions).to(dt)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.shape[2]
        kh, vh = k, v
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        if key_valid is None and S == T:
            o = F.scaled_dot_product_attention(q, kh, vh, is_causal=True, scale=self.scale)
        else:
            qpos = torch.arange(S - T, S, device=x.device)
            mask = qpos[:, None] >= torch.arange(S, device=x.device)[None, :]  # causal, aligned to the last keys
            if key_valid is not None:
                # padding keys are never seen; a padding query sees itself (its row stays finite, and is unused)
                mask = (mask & key_valid[:, None, None, :]) | (qpos[:, None] == torch.arange(S, device=x.device))
            o = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask, scale=self.scale)
        return self.dense(o.transpose(1, 2).reshape(B, T, -1)), (k, v)


class BailingMoeLinearMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_topk(logits, expert_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """Choose with sigmoid(logits) + bias inside the `topk_group` groups whose top-2 biased scores sum highest;
    weight with the unbiased scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`."""
    T, E = logits.shape
    scores = torch.sigmoid(logits.float())
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1:
        group_score = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1).indices.sort(dim=-1).values
    weight = scores.gather(1, topk_idx)
    if norm_topk_prob:
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, weight * routed_scaling_factor


class BailingMoeLinearRouter(nn.Module):
    """`weight` [E, hidden] and `expert_bias` [E] in fp32; the bias only chooses experts."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None


class BailingMoeLinearMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.gate = BailingMoeLinearRouter(config)
        self.experts = nn.ModuleList(
            BailingMoeLinearMLP(config.hidden_size, config.moe_intermediate_size, bias=False)
            for _ in range(config.num_experts))
        shared = (config.moe_shared_expert_intermediate_size or config.moe_intermediate_size) * config.num_shared_experts
        self.shared_experts = (BailingMoeLinearMLP(config.hidden_size, shared, config.use_bias)
                               if config.num_shared_experts > 0 else None)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x.float(), self.gate.weight.float())
        idx, w = grouped_topk(logits, self.gate.expert_bias, self.top_k, self.n_group, self.topk_group,
                              self.norm_topk_prob, self.routed_scaling_factor)
        flat = idx.reshape(-1)
        ys = x.new_empty(flat.shape[0], x.shape[-1])
        for e in flat.unique().tolist():
            rows = (flat == e).nonzero().squeeze(1)  # choices t*k + j, in token order
            ys[rows] = self.experts[e](x[rows // self.top_k])
        out = (ys.view(x.shape[0], self.top_k, -1).float() * w[..., None]).sum(1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class BailingMoeLinearV2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = is_softmax_layer(config, layer_idx)
        self.input_layernorm = BailingMoeLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = (BailingMoeLinearSoftmaxAttention(config, layer_idx) if self.is_softmax
                          else BailingMoeLinearLightningAttention(config, layer_idx))
        self.post_attention_layernorm = BailingMoeLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.num_experts > 0 and layer_idx >= config.first_k_dense_replace
        self.mlp = (BailingMoeLinearMoE(config) if moe
                    else BailingMoeLinearMLP(config.hidden_size, config.intermediate_size, config.use_bias))

    def forward(self, x, positions, valid, key_valid, past):
        if self.is_softmax:
            h, present = self.attention(self.input_layernorm(x), positions, key_valid, past)
        else:
            h, present = self.attention(self.input_layernorm(x), positions, valid, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


# transformers >= 5 names the cache `cache` in model outputs and inputs, older versions `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Router tensors stay fp32 in a bf16/fp16 load (router_dtype). transformers 4.x matches these entries as whole module
# names, 5.x (transformers.core_model_loading) as patterns searched in parameter names.
ROUTER_FP32 = ([r"mlp\.gate\.weight", r"mlp\.gate\.expert_bias"]
               if importlib.util.find_spec("transformers.core_model_loading") else ["gate"])


# ---- cache ---------------------------------------------------------------------------------------------
class BailingMoeLinearCache:
    """What generation carries between forwards: keys/values [B, Hkv, S, D] of each softmax layer, the fp32 state
    [B, H, D, D] of each linear layer, which of the S positions seen are real tokens, and each sequence's next
    position. The linear states cannot be rolled back (no assisted decoding)."""

    is_compileable = False

    def __init__(self):
        self.layers: dict[int, object] = {}
        self.valid: torch.Tensor | None = None  # [B, S] bool
        self.next_position: torch.Tensor | None = None  # [B] int64

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        def pick(t):
            return t.index_select(0, beam_idx.to(t.device))

        self.layers = {i: tuple(pick(t) for t in p) if isinstance(p, tuple) else pick(p) for i, p in self.layers.items()}
        self.valid, self.next_position = pick(self.valid), pick(self.next_position)


# ---- models --------------------------------------------------------------------------------------------------------
class BailingMoeLinearV2PreTrainedModel(PreTrainedModel):
    config_class = BailingMoeLinearV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BailingMoeLinearV2DecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"^model\.mtp\."]  # MTP modules: training and drafting only
    _keep_in_fp32_modules_strict = ROUTER_FP32
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        # only tensors the checkpoint did not provide (transformers flags loaded ones `_is_hf_initialized`)
        def fresh(t):
            return t is not None and not getattr(t, "_is_hf_initialized", False)

        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if fresh(module.weight):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and fresh(module.bias):
                module.bias.zero_()
        elif isinstance(module, BailingMoeLinearRMSNorm) and fresh(module.weight):
            module.weight.fill_(1.0)
        elif isinstance(module, BailingMoeLinearRouter):
            if fresh(module.weight):
                module.weight.normal_(0.0, std)
            if fresh(module.expert_bias):
                module.expert_bias.zero_()


class BailingMoeLinearV2Model(BailingMoeLinearV2PreTrainedModel):
    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BailingMoeLinearV2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BailingMoeLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        """input_ids: [B, T]; attention_mask: [B, past + T] or [B, T] (0 = padding) -> final-normed hidden states
        [B, T, hidden] and the cache (when use_cache)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, BailingMoeLinearCache):
            if cache.get_seq_length() > 0:
                raise ValueError("BailingMoeLinear keeps its own BailingMoeLinearCache; got a filled "
                                 f"{type(cache).__name__}")
            cache = None  # an empty cache object transformers built for us
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0

        # which new positions are real tokens (the mask may cover the past too: its last T columns are the new ones)
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            if attention_mask.shape[1] not in (T, past + T):
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions: need {T} or "
                                 f"past + new = {past + T}")
            valid = attention_mask[:, -T:].bool()
        all_valid = valid if past == 0 else torch.cat([cache.valid, valid], 1)
        if position_ids is None:  # each sequence counts its real tokens
            base = cache.next_position if past else torch.zeros(B, dtype=torch.long, device=x.device)
            position_ids = (base[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
            next_position = base + valid.long().sum(1)
        else:
            position_ids = position_ids[:, -T:].to(x.device).expand(B, T)
            next_position = position_ids[:, -1] + 1
        padded = not bool(all_valid.all())  # no padding anywhere: the plain causal paths
        lin_valid, key_valid = (valid, all_valid) if padded else (None, None)

        presents = {}
        for layer in self.layers:
            prev = cache.layers.get(layer.layer_idx) if cache is not None else None
            x, presents[layer.layer_idx] = layer(x, position_ids, lin_valid, key_valid, prev)
        x = self.norm(x)
        if use_cache:
            cache = cache if cache is not None else BailingMoeLinearCache()
            cache.layers, cache.valid, cache.next_position = presents, all_valid, next_position
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache if use_cache else None})


class BailingMoeLinearV2ForCausalLM(BailingMoeLinearV2PreTrainedModel, GenerationMixin):
    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__(config)
        self.model = BailingMoeLinearV2Model(config)
        # tied: logits from the embedding matrix itself, no second module
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own BailingMoeLinearCache

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        """fp32 logits [B, T, V] (the last `logits_to_keep` positions when > 0); `labels` [B, T] give the
        next-token cross entropy (-100 ignored)."""
        out = self.model(input_ids, attention_mask, position_ids, cache, past_key_values, inputs_embeds, use_cache)
        hidden, cache = out.last_hidden_state, getattr(out, CACHE_FIELD)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.model.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden.float(), weight.float())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, BailingMoeLinearCache):
            cache = None
        inputs = {"cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and cache.get_seq_length() > 0:
            inputs["input_ids"] = input_ids[:, cache.get_seq_length():]
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


__all__ = ["BailingMoeLinearCache", "BailingMoeLinearV2ForCausalLM", "BailingMoeLinearV2Model",
           "BailingMoeLinearV2PreTrainedModel"]
