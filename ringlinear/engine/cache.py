"""The hybrid cache (docs/architecture.md, "The cache"): a paged KV cache for the softmax layers only
(fixed-size blocks, a block table per sequence kept on the device, blocks returned when it ends) and a state pool
with one fixed-size fp32 slot per running sequence for the linear layers. `PagedContext` is the cache's view of
one batch: what the attention layers read and write during a forward pass (`ringlinear.layers.attention_context`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from ringlinear.accounting import cache_bytes
from ringlinear.layers.attention_context import AttentionContext
from ringlinear.ops.attention import cu_seqlens_from_lens, positions_from_lens
from ringlinear.ops.batch_invariant import bi_attention, current_alignment, recurrent_lightning, seq_of_tokens
from ringlinear.ops.lightning import lightning_attn, lightning_commit, lightning_decode, lightning_verify
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
    num_snapshots: int = 0  # prefix-cache snapshots: a state slot + one KV block (its partial last block) each

    @property
    def max_cached_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def snapshot_bytes(self) -> int:
        return self.state_bytes_per_slot + self.block_size * self.kv_bytes_per_token

    @property
    def total_bytes(self) -> int:
        return (self.num_blocks * self.block_size * self.kv_bytes_per_token + self.num_slots * self.state_bytes_per_slot
                + self.num_snapshots * self.snapshot_bytes)


def plan_layout(config, budget_bytes: int, block_size: int, max_num_seqs: int, kv_dtype: torch.dtype,
                prefix_state_interval: int | None = None, mtp_kv_layers: int = 0) -> CacheLayout:
    """Split `budget_bytes` into `max_num_seqs` state slots and as many KV blocks as the rest holds. With
    `prefix_state_interval` (prefix caching on), the rest holds one prefix-cache snapshot per
    `prefix_state_interval` tokens of KV: snapshots and cached blocks share the budget in that ratio.
    `mtp_kv_layers`: MTP softmax layers that keep KV in the same blocks (speculative decoding)."""
    kv, state = cache_bytes(config, kv_dtype)
    kv += mtp_kv_layers * 2 * config.num_key_value_heads * config.head_dim * kv_dtype.itemsize
    rest = budget_bytes - max_num_seqs * state
    if rest <= 0:
        raise ValueError(f"cache budget {budget_bytes / 2**20:.0f} MiB cannot hold the recurrent states of "
                         f"max_num_seqs={max_num_seqs} sequences ({state / 2**20:.1f} MiB each): lower max_num_seqs "
                         "or raise the memory budget")
    num_snapshots = 0
    if prefix_state_interval and kv:  # an all-linear model has no blocks to key a prefix by
        snapshot = state + block_size * kv
        num_snapshots = rest // (prefix_state_interval * kv + snapshot)
        rest -= num_snapshots * snapshot
    num_blocks = rest // (block_size * kv) if kv else 1  # an all-linear model needs no KV
    if num_blocks < 1:
        raise ValueError(f"cache budget {budget_bytes / 2**20:.0f} MiB leaves no room for one KV block")
    return CacheLayout(int(num_blocks), block_size, max_num_seqs, kv, state, int(num_snapshots))


class HybridCache:
    """KV pages `[num_blocks, block_size, Hkv, D]` (k and v) per softmax layer, fp32 states `[num_slots, H, D, Dv]`
    per linear layer, their free lists, and the block tables on the device: row `slot` of `tables`
    (`[num_slots + 1, max_blocks]` int32) holds the KV blocks of the sequence that holds state slot `slot`; the last
    row (`pad_row`) points every entry at `pad_block`, a block no sequence owns (padding rows of a CUDA-graph batch
    read and write it). A sequence's host list `seq.block_table` is the truth; new entries reach the device table
    in one copy per step (`flush`), so host work per step does not grow with context length.

    Blocks are reference-counted: a forked sequence (n > 1) and a prefix-cache hit share full blocks, and a
    sequence about to write into a block it shares gets its own copy first (copy-on-write of the last partial
    block). Free blocks wait in least-recently-freed order; a free block the prefix cache still indexes keeps its
    contents until it is taken again (`prefix.on_reuse` forgets it then). Past the running slots and blocks lie the
    prefix cache's snapshots: state slots `[num_slots, num_slots + num_snapshots)` and as many KV blocks after
    `num_blocks` (each snapshot's partial last block); the pad block comes after those. With speculative decoding
    the MTP module's softmax layer (index num_hidden_layers) has KV pages of its own in the same blocks: position t
    holds the MTP layer's K/V for (h_t, x_{t+1}), so sharing, copy-on-write and snapshots carry it unchanged."""

    def __init__(self, config, layout: CacheLayout, device, kv_dtype: torch.dtype, mtp_kv_layers: int = 0):
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.device = torch.device(device)
        soft = [i for i in range(config.num_hidden_layers) if config.is_softmax_layer(i)]
        soft += [config.num_hidden_layers + j for j in range(mtp_kv_layers)]
        lin = [i for i in range(config.num_hidden_layers) if not config.is_softmax_layer(i)]
        Hkv, D, H = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        S = layout.num_snapshots
        self.kv = {i: torch.zeros(2, layout.num_blocks + S + 1, layout.block_size, Hkv, D, dtype=kv_dtype,
                                  device=self.device) for i in soft}
        # one tensor for every linear layer: a new sequence's slot is zeroed in one kernel
        self.state_pool = torch.zeros(len(lin), layout.num_slots + S, H, D, D, dtype=torch.float32,
                                      device=self.device)
        self.states = {layer: self.state_pool[j] for j, layer in enumerate(lin)}
        self.ref = [0] * layout.num_blocks  # sequences holding each block
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(layout.num_blocks))
        self.snapshot_block0 = layout.num_blocks  # snapshot i: state slot num_slots + i, KV block num_blocks + i
        self.pad_block = layout.num_blocks + S
        self.free_slots: deque[int] = deque(range(layout.num_slots))
        self.pad_row = layout.num_slots
        self.tables = torch.full((layout.num_slots + 1, 1), self.pad_block, dtype=torch.int32, device=self.device)
        self._pending: list[tuple[int, int, int]] = []  # (slot, column, block) not yet in `tables`
        self.prefix = None  # the PrefixCache over these blocks, when prefix caching is on
        # device copies and zeroings made outside a forward, in order, when another rank must replay them on its own
        # heads (tensor parallel: `workers.TensorParallelRunner` ships them with the next step); None: not recorded
        self.recorded: list[tuple[str, list[int], list[int]]] | None = None

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

    def _blocks_needed(self, seq, num_new: int) -> int:
        """New blocks `seq` takes to compute `num_new` more tokens: the blocks past its table, and one for a copy of
        its last block when it would write into a block it shares."""
        if not self.kv or num_new <= 0:
            return 0
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
        return need + int(self._shared_tail(seq))

    def _shared_tail(self, seq) -> bool:
        return bool(seq.num_computed % self.block_size and seq.block_table and self.ref[seq.block_table[-1]] > 1)

    def can_grow(self, seq, num_new: int, match=None) -> bool:
        """Whether `seq` can compute `num_new` more tokens (a waiting sequence: from the prefix `match`, if any)."""
        if seq.slot < 0 and not self.free_slots:
            return False
        if match is None:
            return self._blocks_needed(seq, num_new) <= len(self.free_blocks)
        # blocks of the match that are free now stop being free when the sequence takes them
        taken = sum(1 for b in match.blocks if self.ref[b] == 0)
        need = self.blocks_for(match.length + num_new) - len(match.blocks)
        return need <= len(self.free_blocks) - taken

    def grow(self, seq, num_new: int, match=None) -> None:
        """Give `seq` a state slot and enough blocks for `num_new` more tokens. A sequence without a slot starts
        from the prefix `match` (shared blocks, its snapshot's state and partial block copied) or from a zero state."""
        if not self.can_grow(seq, num_new, match):
            raise CacheFull(f"sequence {seq.request_id}: no room for {num_new} more tokens")
        if seq.slot < 0:
            seq.slot = self.free_slots.popleft()
            if match is None:
                self.zero_states([seq.slot])
            else:
                self.prefix.restore(seq, match)
        if not self.kv:
            return
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
        if need > 0 and len(seq.block_table) + need > self.tables.shape[1]:
            raise CacheFull(f"sequence {seq.request_id}: {seq.num_computed + num_new} tokens exceed the block "
                            f"table ({self.tables.shape[1]} blocks of {self.block_size})")
        if num_new > 0 and self._shared_tail(seq):  # copy-on-write: it is about to write into a shared block
            old = seq.block_table[-1]
            new = self._take_block()
            self.copy_blocks([old], [new])
            self._decref(old)
            seq.block_table[-1] = new
            self._pending.append((seq.slot, len(seq.block_table) - 1, new))
        for _ in range(need):
            self.append_block(seq, self._take_block())

    def append_block(self, seq, block: int) -> None:
        """Add `block` (already counted for `seq`) at the end of its table."""
        self._pending.append((seq.slot, len(seq.block_table), block))
        seq.block_table.append(block)

    def _take_block(self) -> int:
        """The least recently freed block, now held once; the prefix cache forgets what it held."""
        block, _ = self.free_blocks.popitem(last=False)
        if self.prefix is not None:
            self.prefix.on_reuse(block)
        self.ref[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of `block` (a free block stops being free)."""
        if self.ref[block] == 0:
            del self.free_blocks[block]
        self.ref[block] += 1

    def _decref(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free_blocks[block] = None  # most recently freed: taken last

    def fork(self, parent, children: list) -> None:
        """Each child continues from everything `parent` has computed: its own slot (a copy of the parent's state,
        one copy for all) and the parent's blocks, shared (the last one is copied when either writes into it)."""
        for child in children:
            child.slot = self.free_slots.popleft()
            child.num_computed = parent.num_computed
            for block in parent.block_table:
                self.share(block)
                self.append_block(child, block)
        self.copy_states([parent.slot] * len(children), [c.slot for c in children])

    def truncate(self, seq) -> None:
        """Return the blocks of `seq` past those holding its `num_computed` tokens (KV of rejected speculative
        tokens; the next step grows again)."""
        keep = self.blocks_for(seq.num_computed)
        while len(seq.block_table) > keep:
            self._decref(seq.block_table.pop())

    def release(self, seq) -> None:
        """Drop the sequence's blocks (last first: they are taken again first) and return its slot (sequence
        finished, aborted or preempted)."""
        for block in reversed(seq.block_table):
            self._decref(block)
        seq.block_table = []
        if seq.slot >= 0:
            self._pending = [u for u in self._pending if u[0] != seq.slot]
            self.free_slots.append(seq.slot)
            seq.slot = -1

    # ---- device copies --------------------------------------------------------------------------
    def _record(self, kind: str, src: list[int], dst: list[int]) -> None:
        if self.recorded is None:
            return
        if kind == "zero" and self.recorded and self.recorded[-1][0] == "zero":  # zeroings commute: one replay
            self.recorded[-1][1].extend(src)
        else:
            self.recorded.append((kind, list(src), list(dst)))

    def zero_states(self, slots: list[int]) -> None:
        """Zero state slots (sequences starting from nothing), every linear layer."""
        self._record("zero", slots, [])
        if len(slots) == 1:
            self.state_pool[:, slots[0]].zero_()
        elif slots:
            self.state_pool.index_fill_(1, torch.tensor(slots, dtype=torch.long).to(self.device), 0.0)

    def copy_states(self, src: list[int], dst: list[int]) -> None:
        """State slots src[i] -> dst[i], every linear layer, one gather and one scatter."""
        if src:
            self._record("states", src, dst)
            s, d = (torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True) for x in (src, dst))
            self.state_pool.index_copy_(1, d, self.state_pool.index_select(1, s))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """KV blocks src[i] -> dst[i] in every softmax layer."""
        if src and self.kv:
            self._record("blocks", src, dst)
            s, d = (torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True) for x in (src, dst))
            for kv in self.kv.values():
                kv.index_copy_(1, d, kv.index_select(1, s))

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


# MTP forwards of at most this many positions per sequence take MoE's small-batch kernels (`ctx.small_batch`)
MTP_SMALL_BATCH_LEN = 16


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
        self.num_verify = 0
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
        return cls.of_rows(cache, [n for _, n in batch], [s.num_computed for s, _ in batch],
                           [s.slot for s, _ in batch])

    @classmethod
    def of_rows(cls, cache: HybridCache, lens: list[int], starts: list[int], slots: list[int]) -> PagedContext:
        """The context of `lens[i]` tokens from position `starts[i]` of the sequence holding state slot `slots[i]`."""
        dev = cache.device
        is_decode = all(n == 1 for n in lens)
        cu = cu_seqlens_from_lens(lens)
        pos = torch.tensor(starts, dtype=torch.long) if is_decode else positions_from_lens(lens, starts)
        meta = torch.tensor([slots, slots], dtype=torch.long)
        bounds = cu.tolist()
        cu, pos, meta = cu.to(dev, non_blocking=True), pos.to(dev, non_blocking=True), meta.to(dev, non_blocking=True)
        return cls(cache, cu, pos, meta[0], meta[1], bounds, is_decode, max(lens))

    def set_verify(self, num_verify: int, length: int) -> None:
        """The first `num_verify` sequences verify `length` tokens each (speculative decoding): linear layers run
        `lightning_verify` for them (outputs after each token, the pool not written) and keep their k, v for
        `commit`; the other sequences go through the usual chunked path."""
        self.num_verify, self.verify_len = num_verify, length
        self.small_batch = num_verify == self.num_seqs  # verify rows only: MoE's small-batch kernels
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        tv, b = num_verify * length, self._bounds
        self._rest_bounds = [x - tv for x in b[num_verify:]]
        self._rest_cu = (self.cu_seqlens[num_verify:] - tv).contiguous()

    def commit(self, accepted: torch.Tensor) -> None:
        """Advance the verifying sequences' states by their first `accepted[i]` tokens (`[n <= num_verify]` int; rows
        past n, a CUDA graph's padding, keep theirs)."""
        slots = self.slots[: self.num_verify]
        if accepted.shape[0] < self.num_verify:
            accepted = torch.cat([accepted, accepted.new_zeros(self.num_verify - accepted.shape[0])])
        for layer_idx, (k, v, g) in self.pending.items():
            lightning_commit(k, v, g, self.cache.states[layer_idx], slots, accepted)

    def softmax_attention(self, layer_idx, q, k, v, scale):
        kv = self.cache.kv[layer_idx]
        nb, bs, Hkv, D = kv.shape[1:]
        flat = kv.view(2, nb * bs, Hkv, D)
        flat[0].index_copy_(0, self.slot_mapping, k.to(kv.dtype))
        flat[1].index_copy_(0, self.slot_mapping, v.to(kv.dtype))
        if current_alignment().softmax_attn:  # one query at a time over its keys, as the trainer under the switch
            seq = (torch.arange(q.shape[0], device=q.device) if self.is_decode
                   else seq_of_tokens(self.cu_seqlens, q.shape[0]))
            return bi_attention(q, kv[0], kv[1], self.block_tables, bs, seq, self.positions + 1, scale)
        if self.is_decode:
            return paged_decode_attention(q, kv[0], kv[1], self.block_tables, self.seq_lens, scale)
        return paged_prefill_attention(q, kv[0], kv[1], self.block_tables, self.cu_seqlens, self.seq_lens, scale,
                                       max_seqlen_q=self._max_q)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        pool = self.cache.states[layer_idx]
        if self.num_verify:
            return self._verify_linear(layer_idx, q, k, v, g, scale, pool)
        if current_alignment().linear_attn:  # prefill in the decode step's order (chunk boundaries then vanish)
            # host bounds only when known: the Triton path needs none (no sync, e.g. inside a CUDA graph capture)
            return recurrent_lightning(q, k, v, g, scale, pool, self.slots, self.cu_seqlens, self._host_bounds)
        if self.is_decode:
            return lightning_decode(q, k, v, g, pool, self.slots, scale=scale)
        o, final = lightning_attn(q[None], k[None], v[None], g, scale=scale, initial_state=pool[self.slots],
                                  output_final_state=True, cu_seqlens=self.cu_seqlens, cu_seqlens_host=self._bounds)
        pool[self.slots] = final
        return o[0]

    def _verify_linear(self, layer_idx, q, k, v, g, scale, pool):
        nv, L = self.num_verify, self.verify_len
        tv, H = nv * L, q.shape[1]
        kv = k[:tv].reshape(nv, L, H, -1), v[:tv].reshape(nv, L, H, -1)
        o = lightning_verify(q[:tv].reshape(nv, L, H, -1), *kv, g, pool, self.slots[:nv], scale=scale)
        self.pending[layer_idx] = (*kv, g)
        o = o.reshape(tv, H, -1)
        if tv == q.shape[0]:
            return o
        rest = self.slots[nv:]
        o2, final = lightning_attn(q[None, tv:], k[None, tv:], v[None, tv:], g, scale=scale, initial_state=pool[rest],
                                   output_final_state=True, cu_seqlens=self._rest_cu,
                                   cu_seqlens_host=self._rest_bounds)
        pool[rest] = final
        return torch.cat([o, o2[0]])
