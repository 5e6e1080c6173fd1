"""The hybrid cache: a paged KV cache for the softmax layers only (fixed-size blocks, a block table per
sequence, blocks returned when it ends) and a state pool with one fixed-size fp32 slot per running sequence
for the linear layers. `PagedContext` is the cache's view of one batch: what the attention layers read and
write during a forward pass (see `ringlinear.layers.attention_context`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ringlinear.accounting import cache_bytes
from ringlinear.layers.attention_context import AttentionContext
from ringlinear.ops.attention import causal_attention, cu_seqlens_from_lens, prefix_chunk_attention
from ringlinear.ops.lightning import lightning_attn, lightning_decode
from ringlinear.ops.paged_attention import paged_decode_attention


class CacheFull(RuntimeError):
    """No free KV block or state slot (the scheduler preempts or waits)."""


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of the hybrid cache, decided once at engine start."""

    num_blocks: int
    block_size: int
    num_slots: int
    kv_bytes_per_token: int  # all softmax layers together
    state_bytes_per_slot: int  # all linear layers together

    @property
    def max_cached_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token + self.num_slots * self.state_bytes_per_slot


def plan_layout(config, budget_bytes: int, block_size: int, max_num_seqs: int, kv_dtype: torch.dtype) -> CacheLayout:
    """Split `budget_bytes` into `max_num_seqs` state slots and as many KV blocks as the rest holds."""
    kv, state = cache_bytes(config, kv_dtype)
    rest = budget_bytes - max_num_seqs * state
    if rest <= 0:
        raise ValueError(f"cache budget {budget_bytes / 2**20:.0f} MiB cannot hold the recurrent states of "
                         f"max_num_seqs={max_num_seqs} sequences ({state / 2**20:.1f} MiB each): lower max_num_seqs "
                         "or raise the memory budget")
    num_blocks = rest // (block_size * kv) if kv else 1  # an all-linear model needs no KV
    if num_blocks < 1:
        raise ValueError(f"cache budget {budget_bytes / 2**20:.0f} MiB leaves no room for one KV block")
    return CacheLayout(int(num_blocks), block_size, max_num_seqs, kv, state)


class HybridCache:
    """KV pages `[num_blocks, block_size, Hkv, D]` (k and v) per softmax layer + fp32 states
    `[num_slots, H, D, Dv]` per linear layer, with their free lists."""

    def __init__(self, config, layout: CacheLayout, device, kv_dtype: torch.dtype):
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.device = torch.device(device)
        soft = [i for i in range(config.num_hidden_layers) if config.is_softmax_layer(i)]
        lin = [i for i in range(config.num_hidden_layers) if not config.is_softmax_layer(i)]
        Hkv, D, H = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        self.kv = {i: torch.zeros(2, layout.num_blocks, layout.block_size, Hkv, D, dtype=kv_dtype, device=self.device)
                   for i in soft}
        self.states = {i: torch.zeros(layout.num_slots, H, D, D, dtype=torch.float32, device=self.device) for i in lin}
        self.free_blocks: deque[int] = deque(range(layout.num_blocks))
        self.free_slots: deque[int] = deque(range(layout.num_slots))

    # ---- allocation -----------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def can_grow(self, seq, num_new: int) -> bool:
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table) if self.kv else 0
        return need <= len(self.free_blocks) and (seq.slot >= 0 or bool(self.free_slots))

    def grow(self, seq, num_new: int) -> None:
        """Give `seq` a state slot (zeroed) and enough blocks for `num_new` more tokens."""
        if not self.can_grow(seq, num_new):
            raise CacheFull(f"sequence {seq.request_id}: no room for {num_new} more tokens")
        if seq.slot < 0:
            seq.slot = self.free_slots.popleft()
            for s in self.states.values():
                s[seq.slot].zero_()
        if self.kv:
            need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
            seq.block_table.extend(self.free_blocks.popleft() for _ in range(need))

    def reserve_block(self) -> int:
        """Take one block out of circulation for good (CUDA-graph padding rows write their K/V there)."""
        if not self.free_blocks:
            raise CacheFull("no KV block left to reserve")
        return self.free_blocks.pop()

    def release(self, seq) -> None:
        """Return the sequence's blocks and slot (sequence finished, aborted or preempted)."""
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    # ---- one batch ------------------------------------------------------------------------------
    def context(self, batch: list[tuple[object, int]]) -> PagedContext:
        """The attention context of a forward over `batch`: (sequence, number of new tokens) pairs whose new
        tokens follow their `num_computed` cached ones (blocks already grown)."""
        return PagedContext(self, batch)


class PagedContext(AttentionContext):
    """Softmax layers write new K/V into their pages and attend over the sequence's pages; linear layers
    continue from the sequence's state slot and write the new state back. All-decode batches (one token
    per sequence) take the single-step paths; others the varlen chunked paths."""

    def __init__(self, cache: HybridCache, batch: list[tuple[object, int]]):
        dev = cache.device
        lens = [n for _, n in batch]
        starts = [s.num_computed for s, _ in batch]
        cu = cu_seqlens_from_lens(lens)
        pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lens)])
        super().__init__(cu, pos)  # host tensors: the bounds are read without a device sync
        self.cu_seqlens, self.positions = cu.to(dev), pos.to(dev)
        self.cache = cache
        self.lens, self.starts = lens, starts
        self.is_decode = all(n == 1 for n in lens)
        self.slots = torch.tensor([s.slot for s, _ in batch], dtype=torch.int64, device=dev)
        bs = cache.block_size
        if cache.kv:
            tables = [s.block_table for s, _ in batch]
            width = max(len(t) for t in tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            seq_of = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lens))
            self.slot_mapping = (bt[seq_of, pos // bs].long() * bs + pos % bs).to(dev)
            self.block_tables = bt.to(dev)
            self.seq_lens = torch.tensor([a + n for a, n in zip(starts, lens)], dtype=torch.int32, device=dev)

    def softmax_attention(self, layer_idx, q, k, v, scale):
        kv = self.cache.kv[layer_idx]
        nb, bs, Hkv, D = kv.shape[1:]
        flat = kv.view(2, nb * bs, Hkv, D)
        flat[0].index_copy_(0, self.slot_mapping, k.to(kv.dtype))
        flat[1].index_copy_(0, self.slot_mapping, v.to(kv.dtype))
        if self.is_decode:
            return self._decode_attention(kv, q, scale)
        b, outs = self._bounds, []
        for n, start in enumerate(self.starts):
            qn = q[b[n] : b[n + 1]]
            if start == 0:  # nothing cached before: attend over this chunk's own keys (causal, flash path)
                outs.append(causal_attention(qn, k[b[n] : b[n + 1]], v[b[n] : b[n + 1]], scale))
                continue
            nblk = -(-start // bs)
            prefix = kv[:, self.block_tables[n, :nblk].long()].reshape(2, nblk * bs, Hkv, D)[:, :start].to(q.dtype)
            outs.append(prefix_chunk_attention(qn, k[b[n] : b[n + 1]], v[b[n] : b[n + 1]], prefix[0], prefix[1], scale))
        return torch.cat(outs, 0)

    def _decode_attention(self, kv, q, scale):
        """One query token per sequence over its own pages (Triton flash-decoding on CUDA)."""
        return paged_decode_attention(q, kv[0], kv[1], self.block_tables, self.seq_lens, scale)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        pool = self.cache.states[layer_idx]
        if self.is_decode:
            return lightning_decode(q, k, v, g, pool, self.slots, scale=scale)
        o, final = lightning_attn(q[None], k[None], v[None], g, scale=scale, initial_state=pool[self.slots],
                                  output_final_state=True, cu_seqlens=self.cu_seqlens)
        pool[self.slots] = final
        return o[0]
