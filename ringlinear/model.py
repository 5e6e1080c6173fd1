"""The Ring-linear hybrid decoder (docs/architecture.md, "The model"): layer groups of M-1 Lightning
linear-attention layers + 1 GQA softmax layer, dense SwiGLU in the first `first_k_dense_replace` layers and MoE
after, optional MTP modules (DeepSeek-V3 style) predicting token t+1+k, fp32 logits; and how a model is built
(`build_model` on any device without initialising, `init_model` with the initial weights).

Each layer: x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x)). Tokens are packed: [T, hidden] for the
sequences an `AttentionContext` describes.
"""

from __future__ import annotations

import torch
from torch import nn

from ringlinear.config import RingLinearConfig
from ringlinear.device import dtype_name, parse_dtype
from ringlinear.layers.attention_context import AttentionContext, PackedContext
from ringlinear.layers.linear_attention import LightningAttention
from ringlinear.layers.moe import MoE, Router, SwiGLU
from ringlinear.layers.norms import RMSNorm
from ringlinear.layers.softmax_attention import SoftmaxAttention
from ringlinear.ops.batch_invariant import bi_linear, current_alignment
from ringlinear.ops.cross_entropy import linear_cross_entropy
from ringlinear.ops.fused_norms import add_rmsnorm
from ringlinear.ops.matmul import mm_fp32_out

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    def __init__(self, config: RingLinearConfig, layer_idx: int, softmax: bool, moe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = softmax
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = SoftmaxAttention(config, layer_idx) if softmax else LightningAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = moe
        self.mlp = MoE(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, decode=ctx.is_decode or ctx.small_batch) if self.is_moe else self.mlp(h))

    def inference_forward(self, delta: torch.Tensor | None, residual: torch.Tensor, ctx: AttentionContext
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for engine forwards with each residual add fused into the norm after it (`add_rmsnorm`):
        takes the previous layer's MLP output `delta` (None for the first layer) and the residual stream before it;
        returns this layer's MLP output and the residual stream before that (their sum is `forward`'s output)."""
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if delta is None:
            h = n1(residual)
        else:
            h, residual = add_rmsnorm(delta, residual, n1.weight, n1.eps)
        h, residual = add_rmsnorm(self.attention(h, ctx), residual, n2.weight, n2.eps)
        return (self.mlp(h, decode=ctx.is_decode or ctx.small_batch, inference=True) if self.is_moe
                else self.mlp(h)), residual


class MTPModule(nn.Module):
    """h'_t = block(eh_proj([hnorm(h_t); enorm(emb(x_{t+k}))])); logits from final_layernorm(h'_t) and the
    shared lm_head predict x_{t+k+1}. Its block is a softmax-attention layer (index L + k - 1)."""

    def __init__(self, config: RingLinearConfig, depth: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layer = DecoderLayer(config, config.num_hidden_layers + depth - 1, softmax=True,
                                  moe=config.num_experts > 0)
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))
        return self.layer(x, ctx)


class RingLinearModel(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, config.is_softmax_layer(i), config.is_moe_layer(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPModule(config, k + 1) for k in range(config.num_nextn_predict_layers))

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids: [T] packed -> last hidden state before the final norm, [T, hidden]."""
        x = self.word_embeddings(input_ids)
        if ctx.inference and not current_alignment().unfused:
            delta = None
            for layer in self.layers:
                delta, x = layer.inference_forward(delta, x, ctx)
            return x if delta is None else x + delta
        for layer in self.layers:
            x = layer(x, ctx)
        return x


class RingLinearForCausalLM(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        self.model = RingLinearModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ---- weights --------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.word_embeddings.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, embedding_std: float | None = None) -> None:
        """Normal(0, initializer_range) for projections, embeddings and experts; ones for norms; zero biases.
        `embedding_std` overrides the std of the input embeddings (small models: see `ringlinear.study`). The numbers
        come from a generator on the model's device: on the CPU the same everywhere; on a GPU far faster (the CPU
        draws them on one thread), the same on every GPU of one kind."""
        gen = torch.Generator(device=next(self.parameters()).device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range

        def normal_(p: torch.Tensor) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=p.device).mul_(std).to(p.dtype))

        for mod in self.modules():
            if isinstance(mod, nn.Embedding) and embedding_std is not None:
                w = mod.weight
                w.copy_(torch.randn(w.shape, generator=gen, device=w.device).mul_(embedding_std).to(w.dtype))
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                normal_(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()
            elif isinstance(mod, MoE):
                for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
                    normal_(p)
            elif isinstance(mod, Router):
                normal_(mod.weight)
                if mod.expert_bias is not None:
                    mod.expert_bias.zero_()
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute derived buffers (decay, RoPE frequencies): needed after building on `meta` + `to_empty`."""
        for mod in self.modules():
            if mod is not self and hasattr(mod, "reset_buffers"):
                mod.reset_buffers()
            if isinstance(mod, Router):
                mod.tokens_per_expert = torch.zeros_like(mod.tokens_per_expert)

    # ---- forward --------------------------------------------------------------------------------
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits from final-normed hidden states: the lm_head's bf16 weights with fp32 accumulation and output
        (the report's fp32 lm_head: an fp32 GEMM of the same values up to summation order, no fp32 weight copy)."""
        w = self.lm_head_weight
        if current_alignment().gemm:  # batch-invariant tiles, the same fp32 accumulation
            return bi_linear(hidden.to(w.dtype), w, out_dtype=torch.float32)
        return mm_fp32_out(hidden.to(w.dtype), w.t())

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: AttentionContext | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [T] packed (with `ctx`) or [B, T] (equal-length sequences, no past) -> fp32 logits
        [T, V] (or [B, T, V]); `logits_indices` picks the rows to project (e.g. each sequence's last token)."""
        batched = input_ids.dim() == 2
        if batched:
            if ctx is not None:
                raise ValueError("forward: pass packed [T] input_ids together with a context")
            B, T = input_ids.shape
            ctx = PackedContext.from_lens([T] * B, input_ids.device)
            input_ids = input_ids.reshape(-1)
        elif ctx is None:
            ctx = PackedContext.from_lens([input_ids.shape[0]], input_ids.device)
        h = self.model.norm(self.model(input_ids, ctx))
        if logits_indices is not None:
            h = h[logits_indices]
        logits = self.compute_logits(h)
        return logits.view(B, T, -1) if batched and logits_indices is None else logits

    def loss(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor | None = None,
             ctx: AttentionContext | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross entropy (+ MTP losses weighted by `mtp_loss_scaling_factor`) over packed
        sequences; `labels` default to the next token within each sequence (IGNORE_INDEX at the ends). MTP depth
        k is trained on `labels` shifted by k, so a loss mask (IGNORE_INDEX labels) holds for the MTP heads too."""
        if ctx is None:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            ctx = PackedContext.from_lens(lens, input_ids.device)
        if labels is None:
            labels = shifted_within(input_ids, cu_seqlens, 1)
        hidden = self.model(input_ids, ctx)
        # lm_head + cross entropy fused and chunked: no [T, V] logits kept (values as `compute_logits` + CE)
        lm_loss = linear_cross_entropy(self.model.norm(hidden), self.lm_head_weight, labels, IGNORE_INDEX)
        out = {"lm_loss": lm_loss, "loss": lm_loss}
        if len(self.model.mtp):
            mtp_losses, h = [], hidden
            for k, mtp in enumerate(self.model.mtp, start=1):
                nxt = shifted_within(input_ids, cu_seqlens, k)
                emb = self.model.word_embeddings(nxt.clamp(min=0))
                h = mtp(h, emb, ctx)
                # depth k predicts the token after t + k: the label at t + k, so masked targets stay masked
                tgt = shifted_within(labels, cu_seqlens, k)
                mtp_losses.append(linear_cross_entropy(mtp.final_layernorm(h), self.lm_head_weight, tgt, IGNORE_INDEX))
            mtp_loss = torch.stack(mtp_losses).mean()
            out["mtp_loss"] = mtp_loss
            out["loss"] = lm_loss + self.config.mtp_loss_scaling_factor * mtp_loss
        return out


def shifted_within(ids: torch.Tensor, cu_seqlens: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = ids[t + k] when t + k lies in t's sequence, else IGNORE_INDEX. ids: [T]; cu_seqlens: [N+1]."""
    T = ids.shape[0]
    out = torch.full_like(ids, IGNORE_INDEX)
    if k < T:
        out[: T - k] = ids[k:]
    seq_end = torch.repeat_interleave(cu_seqlens[1:].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    pos = torch.arange(T, device=ids.device)
    return torch.where(pos + k < seq_end, out, torch.full_like(out, IGNORE_INDEX))


def build_model(config: RingLinearConfig, device: str | torch.device = "meta", dtype=None) -> RingLinearForCausalLM:
    """The model with uninitialised storage on `device` (no allocation when `meta`), in `dtype` (default:
    config.torch_dtype), routers kept fp32 (`router_dtype`). The returned model's config records the dtype."""
    dtype = parse_dtype(dtype or config.torch_dtype)
    config = config.replace(torch_dtype=dtype_name(dtype))
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    model.to(dtype)
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            mod.float()
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.reset_buffers()
    return model


def init_model(config: RingLinearConfig, seed: int = 0, device="cpu", dtype=None,
               embedding_std: float | None = None) -> RingLinearForCausalLM:
    """`build_model` with the initial weights of `RingLinearForCausalLM.init_weights(seed)`."""
    model = build_model(config, device, dtype)
    model.init_weights(seed, embedding_std=embedding_std)
    return model
