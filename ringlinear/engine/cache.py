"""The hybrid cache (docs/architecture.md, "The cache"): a paged KV cache for the softmax layers only
(fixed-size blocks, a block table per sequence kept on the device, blocks returned when it ends) and a state pool
with one fixed-size fp32 slot per running sequence for the linear layers. `PagedContext` is the cache's view of
one batch: what the attention layers read and write during a forward pass (`ringlinear.layers.attention_context`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ringlinear.accounting import cache_bytes
from ringlinear.layers.attention_context import AttentionContext
from ringlinear.ops.attention import cu_seqlens_from_lens, positions_from_lens
from ringlinear.ops.lightning import lightning_attn, lightning_decode
from ringlinear.ops.paged_attention import paged_decode_attention, paged_prefill_attention


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
    """KV pages `[num_blocks, block_size, Hkv, D]` (k and v) per softmax layer, fp32 states `[num_slots, H, D, Dv]`
    per linear layer, their free lists, and the block tables on the device: row `slot` of `tables`
    (`[num_slots + 1, max_blocks]` int32) holds the KV blocks of the sequence that holds state slot `slot`; the last
    row (`pad_row`) points every entry at `pad_block`, a block no sequence owns (padding rows of a CUDA-graph batch
    read and write it). A sequence's host list `seq.block_table` is the truth; new entries reach the device table
    in one copy per step (`flush`), so host work per step does not grow with context length."""

    def __init__(self, config, layout: CacheLayout, device, kv_dtype: torch.dtype):
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.device = torch.device(device)
        soft = [i for i in range(config.num_hidden_layers) if config.is_softmax_layer(i)]
        lin = [i for i in range(config.num_hidden_layers) if not config.is_softmax_layer(i)]
        Hkv, D, H = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        # one block past the layout's: the pad block
        self.kv = {i: torch.zeros(2, layout.num_blocks + 1, layout.block_size, Hkv, D, dtype=kv_dtype,
                                  device=self.device) for i in soft}
        # one tensor for every linear layer: a new sequence's slot is zeroed in one kernel
        self.state_pool = torch.zeros(len(lin), layout.num_slots, H, D, D, dtype=torch.float32, device=self.device)
        self.states = {layer: self.state_pool[j] for j, layer in enumerate(lin)}
        self.free_blocks: deque[int] = deque(range(layout.num_blocks))
        self.pad_block = layout.num_blocks
        self.free_slots: deque[int] = deque(range(layout.num_slots))
        self.pad_row = layout.num_slots
        self.tables = torch.full((layout.num_slots + 1, 1), self.pad_block, dtype=torch.int32, device=self.device)
        self._pending: list[tuple[int, int, int]] = []  # (slot, column, block) not yet in `tables`

    # ---- allocation -----------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def set_max_model_len(self, max_model_len: int) -> None:
        """Size the device block tables for sequences of up to `max_model_len` tokens."""
        width = max(1, self.blocks_for(max_model_len + 1))
        if self.kv and width != self.tables.shape[1]:
            self.tables = torch.full((self.layout.num_slots + 1, width), self.pad_block, dtype=torch.int32,
                                     device=self.device)

    def can_grow(self, seq, num_new: int) -> bool:
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table) if self.kv else 0
        return need <= len(self.free_blocks) and (seq.slot >= 0 or bool(self.free_slots))

    def grow(self, seq, num_new: int) -> None:
        """Give `seq` a state slot (zeroed) and enough blocks for `num_new` more tokens."""
        if not self.can_grow(seq, num_new):
            raise CacheFull(f"sequence {seq.request_id}: no room for {num_new} more tokens")
        if seq.slot < 0:
            seq.slot = self.free_slots.popleft()
            self.state_pool[:, seq.slot].zero_()
        if self.kv:
            need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
            if need > 0 and len(seq.block_table) + need > self.tables.shape[1]:
                raise CacheFull(f"sequence {seq.request_id}: {seq.num_computed + num_new} tokens exceed the block "
                                f"table ({self.tables.shape[1]} blocks of {self.block_size})")
            for _ in range(need):
                block = self.free_blocks.popleft()
                self._pending.append((seq.slot, len(seq.block_table), block))
                seq.block_table.append(block)

    def release(self, seq) -> None:
        """Return the sequence's blocks and slot (sequence finished, aborted or preempted)."""
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        if seq.slot >= 0:
            self._pending = [u for u in self._pending if u[0] != seq.slot]
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def flush(self) -> None:
        """Write the block-table entries added since the last flush to the device (one copy, one scatter)."""
        if not self._pending:
            return
        upd = torch.tensor(self._pending, dtype=torch.int32).to(self.device, non_blocking=True)
        self._pending = []
        self.tables[upd[:, 0].long(), upd[:, 1].long()] = upd[:, 2]

    # ---- one batch ------------------------------------------------------------------------------
    def context(self, batch: list[tuple[object, int]]) -> PagedContext:
        """The attention context of a forward over `batch`: (sequence, number of new tokens) pairs whose new
        tokens follow their `num_computed` cached ones (blocks already grown)."""
        self.flush()
        return PagedContext.of_batch(self, batch)


class PagedContext(AttentionContext):
    """Softmax layers write new K/V into their pages and attend over the sequence's pages; linear layers continue
    from the sequence's state slot and write the new state back. All-decode batches (one token per sequence) take
    the single-step kernels; other batches the varlen chunked ones (one call each for the whole batch).

    Everything a layer reads is a device tensor derived from `ids`-sized inputs: `positions [T]`, `cu_seqlens
    [N+1]`, `slots [N]` (state slots, -1 = padding) and `rows [N]` (block-table rows, `pad_row` for padding);
    `block_tables`, `seq_lens` and `slot_mapping` (the flat KV position of each new token) are computed from them
    on the device, so the same construction runs inside a CUDA graph."""

    def __init__(self, cache: HybridCache, cu_seqlens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 rows: torch.Tensor, bounds: list[int] | None, is_decode: bool, max_len: int | None = None):
        AttentionContext.__init__(self, cu_seqlens, positions, bounds)
        self.cache = cache
        self.slots = slots
        self.is_decode = is_decode
        self.inference = True
        self._max_q = max_len
        if cache.kv:
            bs = cache.block_size
            self.block_tables = cache.tables.index_select(0, rows)
            n = rows.shape[0]
            if is_decode:
                seq_of = torch.arange(n, device=rows.device)
                self.seq_lens = (positions + 1).to(torch.int32)
            else:
                seq_of = torch.repeat_interleave(torch.arange(n, device=rows.device), cu_seqlens.diff().long(),
                                                 output_size=positions.shape[0])
                ends = cu_seqlens[1:].long() - 1
                self.seq_lens = (positions.index_select(0, ends) + 1).to(torch.int32) if n else ends.to(torch.int32)
            blk = self.block_tables[seq_of, positions // bs].long()
            self.slot_mapping = blk * bs + positions % bs

    @classmethod
    def of_batch(cls, cache: HybridCache, batch: list[tuple[object, int]]) -> PagedContext:
        """The context of (sequence, new tokens) pairs: O(batch) host work plus the tokens' positions."""
        dev = cache.device
        lens = [n for _, n in batch]
        starts = [s.num_computed for s, _ in batch]
        is_decode = all(n == 1 for n in lens)
        cu = cu_seqlens_from_lens(lens)
        pos = torch.tensor(starts, dtype=torch.long) if is_decode else positions_from_lens(lens, starts)
        meta = torch.tensor([[s.slot for s, _ in batch], [s.slot for s, _ in batch]], dtype=torch.long)
        bounds = cu.tolist()
        cu, pos, meta = cu.to(dev, non_blocking=True), pos.to(dev, non_blocking=True), meta.to(dev, non_blocking=True)
        return cls(cache, cu, pos, meta[0], meta[1], bounds, is_decode, max(lens))

    def softmax_attention(self, layer_idx, q, k, v, scale):
        kv = self.cache.kv[layer_idx]
        nb, bs, Hkv, D = kv.shape[1:]
        flat = kv.view(2, nb * bs, Hkv, D)
        flat[0].index_copy_(0, self.slot_mapping, k.to(kv.dtype))
        flat[1].index_copy_(0, self.slot_mapping, v.to(kv.dtype))
        if self.is_decode:
            return paged_decode_attention(q, kv[0], kv[1], self.block_tables, self.seq_lens, scale)
        return paged_prefill_attention(q, kv[0], kv[1], self.block_tables, self.cu_seqlens, self.seq_lens, scale,
                                       max_seqlen_q=self._max_q)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        pool = self.cache.states[layer_idx]
        if self.is_decode:
            return lightning_decode(q, k, v, g, pool, self.slots, scale=scale)
        o, final = lightning_attn(q[None], k[None], v[None], g, scale=scale, initial_state=pool[self.slots],
                                  output_final_state=True, cu_seqlens=self.cu_seqlens, cu_seqlens_host=self._bounds)
        pool[self.slots] = final
        return o[0]
