"""Prefix caching for the hybrid cache (docs/architecture.md, "Prefix caching"): a trie over full KV blocks keyed
by (parent node, the block's tokens), whose nodes are blocks other sequences may share, and snapshots of the
linear layers' states at chosen token positions (each with a copy of its partial last block), since a linear
layer can only resume where a state was kept. A request starts from the longest cached prefix with a snapshot."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    """A full block of a cached prefix: tokens [end - block_size, end) under its parent's prefix."""

    id: int
    block: int
    end: int
    parent: _Node | None = None
    key: tuple | None = None  # its key in PrefixCache._nodes
    children: list[_Node] = field(default_factory=list)
    snapshots: dict[tuple[int, ...], _Snapshot] = field(default_factory=dict)  # tail tokens after `end` -> snapshot
    alive: bool = True


@dataclass(eq=False)
class _Snapshot:
    """The states after `node.end + len(tail)` tokens: state slot and partial block number `index` of the snapshot
    region."""

    index: int
    node: _Node
    tail: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.node.end + len(self.tail)


@dataclass
class PrefixMatch:
    """The longest usable cached prefix of a sequence: its `length` in tokens, the shared full blocks below it,
    and the snapshot it resumes from."""

    length: int
    blocks: list[int]
    snapshot: _Snapshot


class PrefixCache:
    """Over a `HybridCache`: full blocks enter the trie when a snapshot is taken past them (they stay where they
    are; the trie only names them, and a free block keeps its contents until `HybridCache` takes it again, least
    recently freed first); snapshots are taken by the engine every `interval` tokens, at the end of each prompt
    (minus its last token, whose logits a request needs) and at the end of each finished or preempted sequence,
    and evicted least recently used first when a new one needs room. The end-of-prompt snapshot is skipped when it
    would save a resend fewer than interval / 8 tokens (`chunk_end`).

    Why a trie keyed by tokens rather than vLLM's hash chain: a key holds the block's tokens and its parent's
    unique node id, so two prefixes can never collide (a hash chain needs a cryptographic hash for that), and a
    node knows its children, so evicting a block drops the snapshots beyond it at once (SGLang's radix trees do
    the same; ours has one node per full block, as vLLM's blocks)."""

    def __init__(self, cache, interval: int):
        self.cache = cache
        self.bs = cache.block_size
        self.interval = interval
        self.min_prompt_tail = max(1, interval // 8)
        self.root = _Node(0, -1, 0)
        self._ids = itertools.count(1)
        self._nodes: dict[tuple[int, tuple[int, ...]], _Node] = {}
        self._node_of_block: dict[int, _Node] = {}
        self.num_snapshots = cache.layout.num_snapshots
        self._free: list[int] = list(range(self.num_snapshots - 1, -1, -1))
        self._lru: OrderedDict[int, _Snapshot] = OrderedDict()  # index -> snapshot, least recently used first
        self.queries = 0  # prompt tokens looked up at first admissions
        self.hits = 0  # of which served from the cache

    # ---- lookup ---------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> PrefixMatch | None:
        """The longest cached prefix of `tokens` of at most `limit` tokens that has a snapshot. O(limit /
        block_size) dictionary lookups."""
        node, path, best = self.root, [], None
        while True:
            for tail, snap in node.snapshots.items():
                n = node.end + len(tail)
                if n <= limit and (best is None or n > best.length) and tuple(tokens[node.end : n]) == tail:
                    best = PrefixMatch(n, [p.block for p in path], snap)
            end = node.end + self.bs
            if end > limit:
                break
            child = self._nodes.get((node.id, tuple(tokens[node.end : end])))
            if child is None:
                break
            path.append(child)
            node = child
        return best

    def restore(self, seq, match: PrefixMatch) -> None:
        """Start `seq` (which holds a fresh state slot and no blocks) from `match`: the full blocks shared, the
        snapshot's state copied into its slot and its partial block into a new block of its own."""
        cache, snap = self.cache, match.snapshot
        self._lru.move_to_end(snap.index)
        for block in match.blocks:
            cache.share(block)
            cache.append_block(seq, block)
        cache.copy_states([cache.layout.num_slots + snap.index], [seq.slot])
        if snap.tail:
            block = cache._take_block()
            cache.copy_blocks([cache.snapshot_block0 + snap.index], [block])
            cache.append_block(seq, block)
        seq.num_computed = match.length
        seq.prefix_node = snap.node

    def count(self, seq, match: PrefixMatch | None) -> None:
        """Count a first admission in the hit statistics."""
        self.queries += seq.num_tokens
        self.hits += match.length if match is not None else 0
        seq.num_cached_tokens = match.length if match is not None else 0

    # ---- insertion ------------------------------------------------------------------------------
    def _register(self, seq, upto: int) -> _Node | None:
        """Enter the full blocks of `seq` below token `upto` in the trie (those already there stay as they are);
        returns the node of the last one (the root below one block), or None when its path was evicted."""
        node = getattr(seq, "prefix_node", None) or self.root
        if not node.alive or node.end > upto:
            node = self.root
        tokens, bs = seq.token_ids, self.bs
        while node.end + bs <= upto:
            key = (node.id, tuple(tokens[node.end : node.end + bs]))
            child = self._nodes.get(key)
            if child is None:
                block = seq.block_table[node.end // bs]
                if block in self._node_of_block:  # the block names another prefix: not ours to enter
                    return None
                child = _Node(next(self._ids), block, node.end + bs, node, key)
                self._nodes[key] = child
                self._node_of_block[block] = child
                node.children.append(child)
            node = child
        seq.prefix_node = node
        return node

    def take(self, seqs: list) -> None:
        """Snapshot each sequence at its `num_computed` tokens (right after the forward that computed them, before
        its slot or its last block change): its full blocks enter the trie, its state and partial last block are
        copied into a snapshot. Prefixes shorter than a block are not worth a snapshot."""
        slots: dict[int, int] = {}  # destination -> source: a snapshot evicted within this call is overwritten
        blocks: dict[int, int] = {}
        cache = self.cache
        for seq in seqs:
            p = seq.num_computed
            if p < self.bs or seq.slot < 0:
                continue
            node = self._register(seq, p)
            if node is None:
                continue
            tail = tuple(seq.token_ids[node.end : p])
            snap = node.snapshots.get(tail)
            if snap is not None:
                self._lru.move_to_end(snap.index)
                continue
            index = self._free_index()
            if index is None:  # no snapshot fits the budget
                break
            snap = _Snapshot(index, node, tail)
            node.snapshots[tail] = snap
            self._lru[index] = snap
            slots[cache.layout.num_slots + index] = seq.slot
            if tail:
                blocks[cache.snapshot_block0 + index] = seq.block_table[node.end // self.bs]
            else:
                blocks.pop(cache.snapshot_block0 + index, None)
        cache.copy_states(list(slots.values()), list(slots))
        cache.copy_blocks(list(blocks.values()), list(blocks))

    def due(self, seq) -> bool:
        """Whether the tokens `seq` just computed end where a snapshot is kept: a multiple of the interval, or the
        end of the prompt minus one token."""
        p = seq.num_computed
        return p % self.interval == 0 or p == seq.num_prompt - 1

    def chunk_end(self, seq, start: int, end: int) -> int:
        """Where a chunk of `seq` from token `start` to `end` stops: not past the next multiple of the interval (its
        state is kept), nor past the prompt's last token when a resend of the prompt would otherwise recompute at
        least `min_prompt_tail` tokens since the last state kept before it (the later of that multiple and where
        the sequence resumed). Stopping there costs the request one more step (its last prompt token alone): a chat
        turn that resumed from the previous turn and adds a short message is not worth it."""
        end = min(end, (start // self.interval + 1) * self.interval)
        last = seq.num_prompt - 1
        if start < last < end and last - max(last - last % self.interval, seq.resumed_at) >= self.min_prompt_tail:
            end = last
        return end

    # ---- eviction -------------------------------------------------------------------------------
    def _free_index(self) -> int | None:
        if not self._free:
            if not self._lru:
                return None
            _, snap = self._lru.popitem(last=False)
            del snap.node.snapshots[snap.tail]
            self._free.append(snap.index)
        return self._free.pop()

    def on_reuse(self, block: int) -> None:
        """`block` is being taken for new contents: forget its node, the nodes below it and their snapshots."""
        node = self._node_of_block.get(block)
        if node is None:
            return
        node.parent.children.remove(node)
        stack = [node]
        while stack:
            n = stack.pop()
            n.alive = False
            del self._nodes[n.key]
            del self._node_of_block[n.block]
            for snap in n.snapshots.values():
                del self._lru[snap.index]
                self._free.append(snap.index)
            n.snapshots = {}
            stack.extend(n.children)
            n.children = []

    def reset(self) -> None:
        """Forget every cached prefix (the weights changed: what was computed no longer holds). Blocks stay with
        the sequences holding them."""
        for node in self._nodes.values():
            node.alive = False
            node.children, node.snapshots = [], {}
        self._nodes.clear()
        self._node_of_block.clear()
        self.root.children, self.root.snapshots = [], {}
        self._free = list(range(self.num_snapshots - 1, -1, -1))
        self._lru.clear()

    @property
    def num_cached_snapshots(self) -> int:
        return len(self._lru)
