"""Where attention layers find the batch's layout and each sequence's past.

A forward pass sees packed tokens of N sequences (`cu_seqlens: [N+1]`, `positions: [T]`). The context
decides how softmax layers attend (over which keys) and which recurrent state linear layers start from
and keep. `PackedContext` has no past (training, scoring); `DenseCache` keeps contiguous per-sequence KV
and fp32 states (reference generation; the engine has its paged twin in `ringlinear/engine/`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ringlinear.ops.lightning import lightning_attn, lightning_decode


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA attention of the last `Tq` positions over `Tk >= Tq` keys. q: [Tq, H, D]; k, v: [Tk, Hkv, D].
    Inputs go to SDPA as 4-D [1, H, T, D]: its flash and memory-efficient kernels take nothing else."""
    Tq, Tk = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if kh.shape[1] != qh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:  # queries are the last Tq positions: causal mask aligned to the lower right
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    return o[0].transpose(0, 1)


def _one_call_per_batch(q: torch.Tensor) -> bool:
    """Whether a packed CUDA batch's softmax attention is one call (varlen flash for bf16/fp16, the padded SDPA
    of `padded_causal_attention` otherwise) rather than one SDPA call per sequence; `RINGLINEAR_VARLEN_ATTN=0`
    turns both off."""
    return q.is_cuda and os.environ.get("RINGLINEAR_VARLEN_ATTN", "1") != "0"


def _use_varlen(q: torch.Tensor) -> bool:
    """Packed batches of many sequences go through one varlen flash-attention call (CUDA, bf16/fp16, torch's
    `torch.nn.attention.varlen`) instead of one SDPA call per sequence."""
    return _one_call_per_batch(q) and q.dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen module
        return None
    return varlen_attn


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                            scale: float) -> torch.Tensor:
    """Causal GQA attention of each packed sequence over itself in one flash-attention call. q: [T, H, D];
    k, v: [T, Hkv, D]; cu_seqlens: [N+1] int32 -> [T, H, D]. Same result as `causal_attention` per sequence."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    cu = cu_seqlens.to(torch.int32)
    return _varlen_attn()(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scale,
                          window_size=(-1, 0))


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], max_len: int,
                            scale: float) -> torch.Tensor:
    """Causal GQA attention of each packed sequence over itself in one SDPA call, the sequences padded to
    `max_len` as a batch [N, H, max_len, D] under a plain causal mask (a real query never reaches a padded key:
    the padding comes after each sequence; padded queries are dropped, so they get no gradient). For dtypes the
    varlen flash kernel does not take (fp32): one call instead of one per sequence, which on the GPU is
    launch-bound for batches of many short sequences. q: [T, H, D]; k, v: [T, Hkv, D]; bounds: the host list
    `cu_seqlens` -> [T, H, D]."""
    starts, lens = bounds[:-1], [y - x for x, y in zip(bounds, bounds[1:])]
    keep = [n for n, ln in enumerate(lens) if ln > 0]
    j = torch.arange(max_len)
    lens_t = torch.tensor([lens[n] for n in keep])
    valid = j[None, :] < lens_t[:, None]  # [N, L]
    idx = torch.tensor([starts[n] for n in keep])[:, None] + torch.minimum(j[None, :], lens_t[:, None] - 1)
    idx, valid = idx.to(q.device, non_blocking=True), valid.to(q.device, non_blocking=True)
    qh, kh, vh = (t[idx].transpose(1, 2) for t in (q, k, v))  # [N, H, L, D]
    if kh.shape[1] != qh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return o.transpose(1, 2)[valid]  # sequences are contiguous and in order: the packed layout again


# Padding allowed (padded batch tokens / real tokens) before one SDPA call per sequence is the cheaper way.
_PADDED_MAX_WASTE = 8


def positions_from_lens(lens: list[int], starts: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lens)]) if lens else \
        torch.zeros(0, dtype=torch.long, device=device)


class AttentionContext:
    """Base: packed layout. Subclasses implement the two attention calls."""

    def __init__(self, cu_seqlens: torch.Tensor, positions: torch.Tensor):
        self.cu_seqlens = cu_seqlens
        self.positions = positions
        self._bounds = cu_seqlens.tolist()

    @property
    def num_seqs(self) -> int:
        return len(self._bounds) - 1

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
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return cls(cu, positions_from_lens(lens, [0] * len(lens), device))

    def softmax_attention(self, layer_idx, q, k, v, scale):
        b = self._bounds
        if self.num_seqs > 1 and _use_varlen(q):
            return varlen_causal_attention(q, k, v, self.cu_seqlens, self.max_len, scale)
        if self.num_seqs > 1 and _one_call_per_batch(q) and self.num_seqs * self.max_len <= _PADDED_MAX_WASTE * b[-1]:
            return padded_causal_attention(q, k, v, b, self.max_len, scale)
        outs = [causal_attention(q[b[n] : b[n + 1]], k[b[n] : b[n + 1]], v[b[n] : b[n + 1]], scale)
                for n in range(self.num_seqs)]
        return torch.cat(outs, 0)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
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
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
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
