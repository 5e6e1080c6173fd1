"""Tensor and expert parallel inference, applied to a model from outside it (Megatron-LM's split, vLLM's parallel
linears): `parallelize_for_inference(model, mesh_or_group)` turns a `RingLinearForCausalLM` built on `meta` into
this rank's slice of it, and records where each of its tensors lies in the HF checkpoint (`checkpoint_sources`,
read by `ringlinear.loading.sharded`). Over N ranks (docs/architecture.md, "Tensor parallel inference"):

- softmax attention by heads: H/N query heads per rank and Hkv/N KV heads, or, when N > Hkv, the one KV head its
  query heads read (replicated N/Hkv times); linear attention by heads, its decay, group RMSNorm (whole groups per
  rank: `group_norm_size` divisible by N) and state pool with them (`local_config` sizes the cache);
- qkv, g_proj and the MLPs' gate/up are column parallel, dense and down row parallel: one all-reduce closes each
  attention block and each MLP block;
- MoE: the router replicated, each rank holds E/N experts (choices of other ranks' experts add nothing), the shared
  expert split by columns; routed and shared partial sums joined in the block's one all-reduce;
- embedding by vocabulary rows (one all-reduce), lm_head by vocabulary rows: each rank's fp32 logits, gathered once.

Every rank computes the replicated parts (norms, router, residual stream) on identical inputs, so they stay
bit-identical; only the collectives exchange data. N = 1 leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringlinear.config import ConfigError, RingLinearConfig
from ringlinear.layers.linear import Linear
from ringlinear.layers.linear_attention import LightningAttention
from ringlinear.layers.moe import MoE, SwiGLU
from ringlinear.layers.norms import GroupRMSNorm
from ringlinear.layers.softmax_attention import SoftmaxAttention
from ringlinear.ops.lightning import decay_slopes
from ringlinear.ops.matmul import mm_fp32_out


# ---- the group ----------------------------------------------------------------------------------------------------
class ShardGroup:
    """The ranks a model is split over: this rank's index, their count, and the process group of the collectives
    (None: sizes only, no collectives: `ringlinear.accounting` sizes a rank's slice that way)."""

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None):
        if not 0 <= rank < size:
            raise ValueError(f"ShardGroup: rank {rank} outside [0, {size})")
        self.rank, self.size, self.group = rank, size, group

    @classmethod
    def of(cls, mesh_or_group) -> ShardGroup:
        """From a 1-D DeviceMesh, a ProcessGroup, or None (the default group)."""
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(mesh_or_group, ShardGroup):
            return mesh_or_group
        if isinstance(mesh_or_group, DeviceMesh):
            if mesh_or_group.ndim != 1:
                raise ValueError(f"parallelize_for_inference: a 1-D mesh (the tensor-parallel ranks), got "
                                 f"{mesh_or_group.ndim} dims")
            mesh_or_group = mesh_or_group.get_group()
        return cls(dist.get_rank(mesh_or_group), dist.get_world_size(mesh_or_group), mesh_or_group)

    def _need(self) -> None:
        if self.group is None and not dist.is_initialized():
            raise RuntimeError("this ShardGroup has no process group (a sizes-only slice): it cannot run a forward")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (every rank gets the same bits)."""
        if self.size > 1:
            self._need()
            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[T, n] on each rank -> [T, N * n], rank r's columns at [r n, (r + 1) n)."""
        if self.size == 1 or x.shape[0] == 0:
            return x if self.size == 1 else x.new_empty(0, x.shape[1] * self.size)
        self._need()
        out = x.new_empty(self.size * x.shape[0], x.shape[1])
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape).permute(1, 0, 2).reshape(x.shape[0], -1)


# ---- where a rank's tensors lie in the checkpoint ------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Indices [start, stop) along `dim` of checkpoint tensor `name` (canonical HF name; stop None: to the end)."""

    name: str
    dim: int = 0
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Source:
    """A rank-local tensor as read from the checkpoint: its pieces concatenated along their dim, or, with `stack`,
    stacked (one whole tensor per local expert); `rows`: zero-padded to that many rows (the last vocabulary shard)."""

    pieces: tuple[Piece, ...]
    stack: bool = False
    rows: int | None = None


def _rows(name: str, *ranges: tuple[int, int]) -> Source:
    return Source(tuple(Piece(name, 0, a, b) for a, b in ranges))


# ---- what N allows ------------------------------------------------------------------------------------------------
def check_tensor_parallel(config: RingLinearConfig, n: int) -> None:
    """Raise a ConfigError naming `tensor_parallel_size` and the model field that does not split over n ranks."""

    def bad(field: str, why: str):
        raise ConfigError(f"engine config field tensor_parallel_size={n}: {field}={getattr(config, field)} {why}")

    if n < 1:
        raise ConfigError(f"engine config field tensor_parallel_size={n}: must be >= 1")
    H, Hkv, G = config.num_attention_heads, config.num_key_value_heads, config.group_norm_size
    if H % n:
        bad("num_attention_heads", "is not divisible by it (each rank holds whole heads)")
    if n <= Hkv and Hkv % n or n > Hkv and n % Hkv:
        bad("num_key_value_heads", "must be divisible by it, or divide it (then each KV head is replicated on "
                                   "tensor_parallel_size / num_key_value_heads ranks)")
    if "linear" in config.layer_types and G % n:
        bad("group_norm_size", f"is not divisible by it: the linear layers' output RMSNorm normalises groups of "
                               f"{H // G} heads, and with {H // n} heads per rank a group would span ranks; its mean "
                               "square would then need a sum across ranks (one more all-reduce per linear layer, "
                               "which is not implemented). Use a tensor_parallel_size that divides group_norm_size")
    if config.num_experts and config.num_experts % n:
        bad("num_experts", "is not divisible by it (each rank holds num_experts / tensor_parallel_size experts)")
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)) and config.intermediate_size % n:
        bad("intermediate_size", "is not divisible by it (the dense MLPs split by columns)")
    if config.num_experts and config.num_shared_experts and config.shared_expert_intermediate_size % n:
        bad("moe_shared_expert_intermediate_size", f"x num_shared_experts = {config.shared_expert_intermediate_size} "
                                                   "is not divisible by it (the shared expert splits by columns)")


def kv_heads_of_rank(config: RingLinearConfig, n: int, rank: int) -> tuple[int, int]:
    """(first KV head, KV heads) rank `rank` holds of a softmax layer: Hkv/N of them, or the one its query heads
    read when N > Hkv."""
    Hkv = config.num_key_value_heads
    if n <= Hkv:
        return rank * (Hkv // n), Hkv // n
    return rank // (n // Hkv), 1


def local_config(config: RingLinearConfig, n: int) -> RingLinearConfig:
    """The config of one rank's slice of attention (heads, KV heads, norm groups per rank): what its cache holds."""
    check_tensor_parallel(config, n)
    if n == 1:
        return config
    G = config.group_norm_size // n if "linear" in config.layer_types else 1
    return config.replace(num_attention_heads=config.num_attention_heads // n,
                          num_key_value_heads=kv_heads_of_rank(config, n, 0)[1], group_norm_size=G)


def vocab_rows(vocab_size: int, n: int, rank: int) -> tuple[int, int, int]:
    """(first row, rows read, rows held) of a vocabulary shard: ceil(V / N) rows each, the last zero-padded."""
    per = -(-vocab_size // n)
    start = min(rank * per, vocab_size)
    return start, min(vocab_size, start + per) - start, per


# ---- the parallel layers ------------------------------------------------------------------------------------------
class ColumnParallelLinear(Linear):
    """This rank's rows of W (output features): y_local = x W_local^T + b_local; no communication."""

    def __init__(self, in_features, out_features, group: ShardGroup, bias=False, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.shard_group = group


class RowParallelLinear(Linear):
    """This rank's columns of W (input features): y = sum over ranks of x_local W_local^T, then b. `reduce`: the
    sum is this layer's all-reduce; without it the caller joins the partial sum into its own (the MoE block), and
    the bias is added on rank 0 only so that the sum holds it once."""

    def __init__(self, in_features, out_features, group: ShardGroup, bias=False, dtype=None, device=None,
                 reduce: bool = True):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.shard_group, self.reduce = group, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x, None)
        if self.reduce:
            self.shard_group.all_reduce(y)
        if self.bias is not None and (self.reduce or self.shard_group.rank == 0):
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table (zero-padded to `weight`'s rows); each rank looks up the
    ids it holds, zeros the others, and one all-reduce assembles the embeddings."""

    def __init__(self, num_embeddings: int, dim: int, group: ShardGroup, dtype=None, device=None):
        super().__init__()
        self.num_embeddings, self.shard_group = num_embeddings, group
        self.start, _, per = vocab_rows(num_embeddings, group.size, group.rank)
        self.weight = nn.Parameter(torch.empty(per, dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard_group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.masked_fill(~inside, 0), self.weight).masked_fill(~inside[..., None], 0)
        return self.shard_group.all_reduce(out)


class ParallelMoE(MoE):
    """The MoE block with its routed experts a shard [expert_offset, expert_offset + E_local) of the model's
    (`expert_offset` None: all of them), optionally in e4m3 (`*_scale_inv`: [E_local, out/128, in/128] block
    scales), its output (routed + shared partial sums) all-reduced over `shard_group` when there is one. The
    router, its choice and the path choice are MoE's own."""

    expert_offset: int | None = None
    shard_group: ShardGroup | None = None

    def expert_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(gate, up, down) block scales of e4m3 experts (parameters `*_proj_scale_inv`), or None."""
        scales = tuple(self._parameters.get(f"{w}_scale_inv") for w in ("gate_proj", "up_proj", "down_proj"))
        return None if scales[0] is None else scales

    def routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fused: bool) -> torch.Tensor:
        from ringlinear.ops.moe import routed_experts

        scales = self.expert_scales()
        if fused:
            from ringlinear.ops.moe.fused_moe import fused_moe

            return fused_moe(x, idx, w, self.gate_proj, self.up_proj, self.down_proj, w_scales=scales,
                             expert_offset=self.expert_offset or 0)
        return routed_experts(x, idx, w, self.gate_proj, self.up_proj, self.down_proj, w_scales=scales,
                              expert_offset=self.expert_offset)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        return out if self.shard_group is None else self.shard_group.all_reduce(out)


class TensorParallelLightningAttention(LightningAttention):
    """LightningAttention over heads [head_offset, head_offset + num_heads) of `total_heads`: their decay rates."""

    head_offset: int = 0
    total_heads: int = 0

    def _decay(self) -> torch.Tensor:
        full = decay_slopes(self.total_heads, self.layer_idx, self.num_layers, self.layerwise_decay)
        return full[self.head_offset : self.head_offset + self.num_heads]


class TensorParallelCausalLM:
    """Mixin of the parallel causal LM: each rank's fp32 logits of its vocabulary rows, gathered once."""

    shard_group: ShardGroup

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.lm_head_weight
        local = mm_fp32_out(hidden.to(w.dtype), w.t())
        return self.shard_group.gather_columns(local)[:, : self.config.vocab_size]


_CLASSES: dict[tuple[type, type], type] = {}


def swap_class(obj: nn.Module, extra: type) -> None:
    """Give `obj` the class `extra` (when it derives from obj's class) or a subclass of both (FSDP2's way of adding
    behaviour to a built module)."""
    cls = type(obj)
    if isinstance(obj, extra):
        return
    if issubclass(extra, cls):
        obj.__class__ = extra
        return
    key = (extra, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{extra.__name__}{cls.__name__}", (extra, cls), {})
    obj.__class__ = _CLASSES[key]


# ---- the transform ------------------------------------------------------------------------------------------------
def parallelize_for_inference(model: nn.Module, mesh_or_group=None) -> nn.Module:
    """Turn `model` (a RingLinearForCausalLM on `meta`) into this rank's tensor + expert parallel slice over the
    ranks of `mesh_or_group` (a 1-D DeviceMesh, a ProcessGroup, a ShardGroup, or None: the default group). Its
    weights stay uninitialised; `model.checkpoint_sources` says where each lies in the HF checkpoint
    (`ringlinear.loading.sharded.load_shards` reads them). The MTP modules are dropped (the engine does not
    run them). Returns the model (changed in place)."""
    return shard_model(model, ShardGroup.of(mesh_or_group))


def shard_model(model: nn.Module, group: ShardGroup) -> nn.Module:
    config: RingLinearConfig = model.config
    n = group.size
    check_tensor_parallel(config, n)
    real = [name for name, p in model.named_parameters() if p.device.type != "meta"]
    if real:
        raise ValueError(f"parallelize_for_inference: build the model on meta (build_model(config, 'meta')) and load "
                         f"each rank's shards after; {real[0]} holds data")
    sources: dict[str, Source] = {}
    model.model.mtp = nn.ModuleList()
    dtype = model.model.word_embeddings.weight.dtype
    V, hidden = config.vocab_size, config.hidden_size
    start, rows, per = vocab_rows(V, n, group.rank)
    model.model.word_embeddings = VocabParallelEmbedding(V, hidden, group, dtype, "meta")
    vocab = Source((Piece("model.word_embeddings.weight", 0, start, start + rows),), rows=per)
    sources["model.word_embeddings.weight"] = vocab
    if model.lm_head is not None:
        model.lm_head = Linear(hidden, per, dtype=dtype, device="meta")
        sources["lm_head.weight"] = Source((Piece("lm_head.weight", 0, start, start + rows),), rows=per)
    for i, layer in enumerate(model.model.layers):
        _shard_attention(layer.attention, f"model.layers.{i}.attention.", config, group, sources)
        if isinstance(layer.mlp, MoE):
            _shard_moe(layer.mlp, f"model.layers.{i}.mlp.", config, group, sources)
        else:
            _shard_swiglu(layer.mlp, f"model.layers.{i}.mlp.", group, sources, reduce=True)
    swap_class(model, TensorParallelCausalLM)
    model.shard_group = group
    model.local_config = local_config(config, n)
    model.checkpoint_sources = sources
    return model


def _column(lin: nn.Linear, out_features: int, group: ShardGroup) -> ColumnParallelLinear:
    return ColumnParallelLinear(lin.in_features, out_features, group, lin.bias is not None, lin.weight.dtype, "meta")


def _row(lin: nn.Linear, in_features: int, group: ShardGroup, reduce: bool = True) -> RowParallelLinear:
    return RowParallelLinear(in_features, lin.out_features, group, lin.bias is not None, lin.weight.dtype, "meta",
                             reduce)


def _add_column(sources: dict[str, Source], prefix: str, lin: nn.Module, *ranges: tuple[int, int]) -> None:
    """A column-parallel linear's weight rows (and bias entries) `ranges` of the checkpoint's `prefix` tensors."""
    sources[prefix + "weight"] = _rows(prefix + "weight", *ranges)
    if lin.bias is not None:
        sources[prefix + "bias"] = _rows(prefix + "bias", *ranges)


def _shard_attention(attn: nn.Module, prefix: str, config: RingLinearConfig, group: ShardGroup,
                     sources: dict[str, Source]) -> None:
    n, r = group.size, group.rank
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    h = H // n
    q = (r * h * D, (r + 1) * h * D)
    if isinstance(attn, SoftmaxAttention):
        j0, hk = kv_heads_of_rank(config, n, r)
        k = ((H + j0) * D, (H + j0 + hk) * D)
        v = ((H + Hkv + j0) * D, (H + Hkv + j0 + hk) * D)
        attn.num_heads, attn.num_kv_heads = h, hk
        width = (h + 2 * hk) * D
    elif isinstance(attn, LightningAttention):
        k = (H * D + q[0], H * D + q[1])
        v = (2 * H * D + q[0], 2 * H * D + q[1])
        attn.num_heads = h
        width = 3 * h * D
        attn.g_proj = _column(attn.g_proj, h * D, group)
        _add_column(sources, prefix + "g_proj.", attn.g_proj, q)
        dtype = attn.g_norm.weight.dtype
        with torch.device("meta"):
            attn.g_norm = GroupRMSNorm(h * D, config.group_norm_size // n, attn.g_norm.eps).to(dtype)
        sources[prefix + "g_norm.weight"] = _rows(prefix + "g_norm.weight", q)
        swap_class(attn, TensorParallelLightningAttention)
        attn.head_offset, attn.total_heads = r * h, H
        attn.decay = torch.empty(h, dtype=attn.decay.dtype, device="meta")  # its heads' rates: `reset_buffers`
    else:
        raise TypeError(f"parallelize_for_inference: no split for attention module {type(attn).__name__}")
    attn.query_key_value = _column(attn.query_key_value, width, group)
    _add_column(sources, prefix + "query_key_value.", attn.query_key_value, q, k, v)
    attn.dense = _row(attn.dense, h * D, group)
    sources[prefix + "dense.weight"] = Source((Piece(prefix + "dense.weight", 1, q[0], q[1]),))


def _shard_swiglu(mlp: SwiGLU, prefix: str, group: ShardGroup, sources: dict[str, Source], reduce: bool) -> None:
    n, r = group.size, group.rank
    per = mlp.gate_proj.out_features // n
    cols = (r * per, (r + 1) * per)
    mlp.gate_proj = _column(mlp.gate_proj, per, group)
    mlp.up_proj = _column(mlp.up_proj, per, group)
    mlp.down_proj = _row(mlp.down_proj, per, group, reduce)
    _add_column(sources, prefix + "gate_proj.", mlp.gate_proj, cols)
    _add_column(sources, prefix + "up_proj.", mlp.up_proj, cols)
    sources[prefix + "down_proj.weight"] = Source((Piece(prefix + "down_proj.weight", 1, *cols),))


def expert_sources(prefix: str, first: int, count: int) -> dict[str, Source]:
    """Sources of a MoE block's stacked experts [first, first + count): one whole HF tensor per local expert."""
    return {f"{prefix}{w}": Source(tuple(Piece(f"{prefix}experts.{first + j}.{w}.weight") for j in range(count)),
                                   stack=True)
            for w in ("gate_proj", "up_proj", "down_proj")}


def _shard_moe(mlp: MoE, prefix: str, config: RingLinearConfig, group: ShardGroup,
               sources: dict[str, Source]) -> None:
    n, r = group.size, group.rank
    E = config.num_experts // n
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(mlp, name)
        setattr(mlp, name, nn.Parameter(torch.empty(E, *p.shape[1:], dtype=p.dtype, device="meta"),
                                        requires_grad=p.requires_grad))
    sources.update(expert_sources(prefix, r * E, E))
    if mlp.shared_experts is not None:
        _shard_swiglu(mlp.shared_experts, prefix + "shared_experts.", group, sources, reduce=False)
    swap_class(mlp, ParallelMoE)
    mlp.expert_offset = r * E if n > 1 else None
    mlp.shard_group = group if n > 1 else None
