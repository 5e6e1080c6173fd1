"""Where attention layers find the batch's layout and each sequence's past.

A forward pass sees packed tokens of N sequences (`cu_seqlens: [N+1]`, `positions: [T]`). The context
decides how softmax layers attend (over which keys) and which recurrent state linear layers start from
and keep. `PackedContext` has no past (training, scoring); `DenseCache` keeps contiguous per-sequence KV
and fp32 states (reference generation; the engine has its paged twin in `ringlinear/engine/`).
"""

from __future__ import annotations

import functools

import torch

from ringlinear.ops.attention import (
    causal_attention,
    cu_seqlens_from_lens,
    packed_causal_attention,
    positions_from_lens,
)
from ringlinear.ops.batch_invariant import (
    aligned_value,
    bi_attention,
    current_alignment,
    packed_key_table,
    packed_recurrent_lightning,
    seq_of_tokens,
)
from ringlinear.ops.lightning import lightning_attn, lightning_decode


class AttentionContext:
    """Base: packed layout. Subclasses implement the two attention calls. `inference`: the engine's forward (no
    autograd; layers take their fused forward-only kernels); `is_decode`: besides, every sequence adds one token
    (layers may take their small-batch kernels); `small_batch`: few tokens per sequence (MoE's small-batch kernels)."""

    inference = False
    is_decode = False
    # few tokens per sequence (a decode step, or a speculative verify of k + 1): MoE layers may take their
    # small-batch kernels even where attention takes the multi-token path
    small_batch = False

    def __init__(self, cu_seqlens: torch.Tensor, positions: torch.Tensor, bounds: list[int] | None = None):
        """cu_seqlens: [N+1] int32; positions: [T]; bounds: cu_seqlens as a host list, when the caller has it
        (otherwise read back from cu_seqlens on first use)."""
        self.cu_seqlens = cu_seqlens
        self.positions = positions
        self._host_bounds = bounds

    @property
    def _bounds(self) -> list[int]:
        if self._host_bounds is None:
            self._host_bounds = self.cu_seqlens.tolist()
        return self._host_bounds

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @functools.cached_property
    def max_len(self) -> int:
        """Longest sequence of the batch (in this forward's tokens)."""
        b = self._bounds
        return max((y - x for x, y in zip(b, b[1:])), default=0)

    def softmax_attention(self, layer_idx, q, k, v, scale):  # pragma: no cover - interface
        raise NotImplementedError

    def linear_attention(self, layer_idx, q, k, v, g, scale):  # pragma: no cover - interface
        raise NotImplementedError


class PackedContext(AttentionContext):
    """No past: each packed sequence attends causally within itself (training and scoring)."""

    @classmethod
    def from_lens(cls, lens: list[int], device) -> PackedContext:
        cu = cu_seqlens_from_lens(lens, device)
        return cls(cu, positions_from_lens(lens, [0] * len(lens), device))

    def softmax_attention(self, layer_idx, q, k, v, scale):
        if current_alignment().softmax_attn:  # one query at a time, as the engine's paged kernels under the switch
            T = q.shape[0]
            table = packed_key_table(self._bounds, q.device)
            seq = seq_of_tokens(self.cu_seqlens, T)
            return aligned_value(
                lambda q, k, v: bi_attention(q, k, v, table, 1, seq, self.positions + 1, scale),
                lambda q, k, v: packed_causal_attention(q, k, v, self.cu_seqlens, self._bounds, self.max_len, scale),
                q, k, v)
        return packed_causal_attention(q, k, v, self.cu_seqlens, self._bounds, self.max_len, scale)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        if current_alignment().linear_attn:  # the decode step's order, token by token
            return packed_recurrent_lightning(q, k, v, g, scale, self.cu_seqlens, self._bounds)
        o, _ = lightning_attn(q[None], k[None], v[None], g, scale=scale, cu_seqlens=self.cu_seqlens,
                              cu_seqlens_host=self._bounds)
        return o[0]


class DenseCache:
    """Contiguous per-sequence cache for `num_seqs` sequences: KV per softmax layer, fp32 state per linear layer.

    `ctx = cache.extend(seq_ids, lens)` appends `lens[i]` new tokens to sequence `seq_ids[i]`; the model's
    forward with that context reads and updates the cache. Steps where every sequence adds one token use the
    single-step decode op, others the chunked prefill op with the carried state.
    """

    def __init__(self, config, num_seqs: int, device, dtype=torch.float32):
        self.config = config
        self.num_seqs = num_seqs
        self.device = torch.device(device)
        self.dtype = dtype
        self.lengths = [0] * num_seqs
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.states: dict[int, torch.Tensor] = {}

    def state(self, layer_idx: int, H: int, D: int, Dv: int) -> torch.Tensor:
        if layer_idx not in self.states:
            self.states[layer_idx] = torch.zeros(self.num_seqs, H, D, Dv, device=self.device, dtype=torch.float32)
        return self.states[layer_idx]

    def extend(self, seq_ids: list[int], lens: list[int]) -> _DenseCacheContext:
        if len(seq_ids) != len(lens) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("extend: seq_ids must be unique and match lens")
        for s, n in zip(seq_ids, lens):
            if not 0 <= s < self.num_seqs:
                raise ValueError(f"extend: seq id {s} out of range [0, {self.num_seqs})")
            if n < 1:
                raise ValueError(f"extend: sequence {s} must add >= 1 token, got {n}")
        starts = [self.lengths[s] for s in seq_ids]
        cu = cu_seqlens_from_lens(lens, self.device)
        ctx = _DenseCacheContext(cu, positions_from_lens(lens, starts, self.device), self, seq_ids)
        for s, n in zip(seq_ids, lens):
            self.lengths[s] += n
        return ctx


class _DenseCacheContext(AttentionContext):
    def __init__(self, cu, positions, cache: DenseCache, seq_ids: list[int]):
        super().__init__(cu, positions)
        self.cache = cache
        self.seq_ids = seq_ids

    def softmax_attention(self, layer_idx, q, k, v, scale):
        store = self.cache.kv.setdefault(layer_idx, [None] * self.cache.num_seqs)
        b, outs = self._bounds, []
        for n, s in enumerate(self.seq_ids):
            kn, vn = k[b[n] : b[n + 1]], v[b[n] : b[n + 1]]
            if store[s] is not None:
                kn, vn = torch.cat([store[s][0], kn]), torch.cat([store[s][1], vn])
            store[s] = (kn, vn)
            outs.append(causal_attention(q[b[n] : b[n + 1]], kn, vn, scale))
        return torch.cat(outs, 0)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        H, D, Dv = q.shape[1], q.shape[2], v.shape[2]
        pool = self.cache.state(layer_idx, H, D, Dv)
        slots = torch.tensor(self.seq_ids, dtype=torch.int64, device=q.device)
        if q.shape[0] == len(self.seq_ids):  # one token each: the decode op
            return lightning_decode(q, k, v, g, pool, slots, scale=scale)
        o, final = lightning_attn(q[None], k[None], v[None], g, scale=scale, initial_state=pool[slots],
                                  output_final_state=True, cu_seqlens=self.cu_seqlens)
        pool[slots] = final
        return o[0]
