"""Continuous batching over the hybrid cache. Each step packs, within `max_num_batched_tokens`: first one
token for every running sequence (decode, or the next chunk of a prompt still being prefilled), then new
prompts from the queue, chunked when they do not fit (the linear state and the KV pages carry across
chunks); a new prompt starts from its longest cached prefix (`prefix_cache`). When blocks run out, the most
recently admitted sequence is preempted: its cache is freed (its state kept as a prefix snapshot) and it is
recomputed later from its tokens (prompt + what it generated), so nothing is lost or truncated."""

from __future__ import annotations

from collections import deque

from ringlinear.engine.cache import HybridCache
from ringlinear.engine.sequence import Sequence, SequenceStatus

PROMPT_LOGPROBS_CHUNK = 512  # prompt tokens per step of a request with prompt logprobs: its logits are [chunk, V]


class Scheduler:
    def __init__(self, cache: HybridCache, max_num_seqs: int, max_num_batched_tokens: int,
                 num_speculative_tokens: int = 0):
        self.cache = cache
        self.num_speculative_tokens = num_speculative_tokens
        # while set (a speculative step), `finish` only marks sequences; `release_finished` snapshots and frees
        # them once the step's linear states are committed and its MTP KV written
        self.defer_release = False
        self._finished: list[Sequence] = []
        self.prefix = cache.prefix
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # tokens scheduled for computation since start (the server's /metrics): decode = the one new token of a
        # sequence that has generated; prefill = the rest (prompt chunks, recomputation after preemption)
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seqs: list[Sequence]) -> None:
        """Sequences forked from a running one (they hold slots and blocks already)."""
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
        self.running.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute) for this step; blocks and slots are grown for them."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        queue = deque(self.running)  # admission order: the newest is preempted first
        while queue and budget > 0:
            seq = queue.popleft()
            n = self._chunk(seq, budget)
            while not self.cache.can_grow(seq, n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.cache.grow(seq, n)
                batch.append((seq, n))
                budget -= n
        # admit new prompts while there is budget, a seat (a request's n choices hold n) and blocks
        seats = sum(s.seats for s in self.running)
        while self.waiting and budget > 0 and seats + self.waiting[0].seats <= self.max_num_seqs:
            seq = self.waiting[0]
            match = self._match(seq)
            seq.resumed_at = 0 if match is None else match.length
            n = self._chunk(seq, budget, seq.resumed_at)
            if not self.cache.can_grow(seq, n, match):
                break
            self.waiting.popleft()
            if seq.num_cached_tokens is None and self.prefix is not None:
                self.prefix.count(seq, match)
            self.cache.grow(seq, n, match)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += seq.seats
            batch.append((seq, n))
            budget -= n
        if not batch and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"request {seq.request_id} ({seq.num_tokens} tokens) cannot be scheduled into an "
                               f"empty cache of {self.cache.layout.num_blocks} blocks x {self.cache.block_size}")
        decode = sum(n for seq, n in batch if (n == 1 or seq.draft_tokens) and seq.num_outputs
                     and seq.num_computed == seq.num_tokens - 1)
        self.num_decode_tokens += decode
        self.num_prefill_tokens += sum(n for _, n in batch) - decode
        return batch

    def _match(self, seq: Sequence):
        """The cached prefix a waiting sequence starts from (never all of it: the last token's logits are needed;
        none for prompt logprobs, which need every prompt position's logits)."""
        if self.prefix is None or seq.params.prompt_logprobs is not None:
            return None
        return self.prefix.match(seq.token_ids, seq.num_tokens - 1)

    def _chunk(self, seq: Sequence, budget: int, start: int | None = None) -> int:
        """Tokens of `seq` to compute this step from `start` (default: what it has computed) within `budget`;
        chunks end where prefix snapshots are kept."""
        start = seq.num_computed if start is None else start
        k = self.num_speculative_tokens
        if seq.draft_tokens and start == seq.num_tokens - 1:  # verify: its last token + k drafts
            if budget > k:
                return k + 1
            seq.clear_drafts()
        n = min(seq.num_tokens - start, budget)
        if seq.params.prompt_logprobs is not None and start < seq.num_prompt:
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        if self.prefix is not None:
            n = self.prefix.chunk_end(seq, start, start + n) - start
        return n

    def _preempt(self, seq: Sequence) -> None:
        if self.prefix is not None:
            self.prefix.take([seq])  # its recomputation starts from here, unless the snapshot is evicted first
        self.running.remove(seq)
        self.cache.release(seq)
        seq.clear_drafts()
        seq.num_computed = 0
        seq.prefix_node = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        was_running = seq in self.running
        if was_running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.clear_drafts()
        if self.defer_release and was_running:
            self._finished.append(seq)
            return
        self._release(seq, was_running)

    def _release(self, seq: Sequence, was_running: bool) -> None:
        if was_running and self.prefix is not None and seq.finish_reason in ("stop", "length"):
            self.prefix.take([seq])  # a chat's next turn resends this sequence: it resumes here
        self.cache.release(seq)

    def release_finished(self) -> None:
        """Snapshot and free the sequences finished while `defer_release` was set."""
        finished, self._finished = self._finished, []
        for seq in finished:
            self._release(seq, True)
