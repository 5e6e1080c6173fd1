"""Decode steps under CUDA graphs: one graph per batch-size bucket, captured once over static input buffers (token
ids, positions, state slots, block-table rows: one pinned host buffer copied in one transfer). The graph builds
its `PagedContext` on the device (block tables gathered from the cache's persistent tables, write slots and
lengths from the positions), so a step's host work is O(batch), whatever the context length. A step replays the
smallest bucket that holds its batch; padding rows use state slot -1 and the cache's pad row and block."""

from __future__ import annotations

from functools import partial

import torch

from ringlinear.engine.cache import MTP_SMALL_BATCH_LEN, HybridCache, PagedContext

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)



def capture_graph(fn, pool, dev: torch.device):
    """(graph, outputs) of `fn()` captured in `pool` after two warm-up calls on a side stream (kernel compilation,
    the allocator, cuBLAS workspaces). thread_local: other threads (torch.distributed's NCCL watchdog under tensor
    parallelism) keep querying their events while this thread captures."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return g, out

class DecodeGraphs:
    def __init__(self, model, cache: HybridCache, max_batch: int):
        self.model, self.cache = model, cache
        dev = cache.device
        self.sizes = [b for b in BUCKETS if b < max_batch] + [max_batch]
        B = self.max_batch = max_batch
        # rows of `inputs`: token id, position, state slot, block-table row
        self.host = torch.zeros(4, B, dtype=torch.long).pin_memory()
        self._host = self.host.numpy()
        self._copied = torch.cuda.Event()
        self.inputs = torch.zeros(4, B, dtype=torch.long, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._fill_padding(0)
        self.inputs.copy_(self.host)
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for b in reversed(self.sizes):
                self.graphs[b], self.outputs[b] = capture_graph(partial(self._forward, b), pool, dev)
        torch.cuda.synchronize(dev)

    def _fill_padding(self, n: int) -> None:
        self._host[:, n:] = ((0,), (0,), (-1,), (self.cache.pad_row,))

    def _forward(self, b: int) -> torch.Tensor:
        ids, pos, slots, rows = self.inputs[:, :b]
        ctx = PagedContext(self.cache, self.cu[: b + 1], pos, slots, rows, None, is_decode=True, max_len=1)
        return self.model(ids, ctx)

    def run(self, batch: list[tuple[object, int]]) -> torch.Tensor:
        """batch: sequences adding one token each (len <= max_batch) -> fp32 logits [len(batch), V]."""
        N = len(batch)
        b = next(s for s in self.sizes if s >= N)
        self.cache.flush()
        self._copied.synchronize()  # the last step's copy out of `host` is done before `host` is rewritten
        seqs = [s for s, _ in batch]
        pos = [s.num_computed for s in seqs]
        slots = [s.slot for s in seqs]
        self._host[:, :N] = ([s.token_ids[p] for s, p in zip(seqs, pos)], pos, slots, slots)
        self._fill_padding(N)
        self.inputs[:, :b].copy_(self.host[:, :b], non_blocking=True)
        self._copied.record()
        self.graphs[b].replay()
        return self.outputs[b][:N]


class VerifyGraphs:
    """Speculative decoding's verify steps under CUDA graphs, one per batch-size bucket, for batches where every
    sequence verifies `length` = k + 1 positions (its last token and k drafts): static token ids and positions
    `[max_batch * length]`, state slots and block-table rows `[max_batch]`, one host buffer copied in one transfer.
    A graph's outputs are the last hidden states `[b * length, hidden]` (the MTP's input) and fp32 logits of every
    position; its context keeps the linear layers' k, v for `commit` after the drafts are judged. Padding rows use
    state slot -1 and the pad row and block. A second graph per bucket (`mtp`) runs the MTP catch-up over the same
    b x length positions, from the verify graph's hidden states and the next tokens (those kept, 0 past them; one
    more transfer): its output and fp32 logits at every position. With k >= 2 a third (`chain`) completes greedy
    drafts before the verify: the k - 1 chained MTP decode steps with their argmaxes on the device, one read of the
    b x (k - 1) tokens. `capture=False` runs the same static-buffer forwards eagerly (how the CPU tests check
    everything but the capture)."""

    def __init__(self, model, cache: HybridCache, max_batch: int, length: int, capture: bool = True):
        self.model, self.cache, self.length, self.capture = model, cache, length, capture
        dev = cache.device
        B, L = max_batch, length
        self.sizes = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        # rows: token id and position of each of the B * L tokens, then state slot and block-table row of each
        # sequence (padded to B * L)
        self.host = torch.zeros(4, B * L, dtype=torch.long)
        if dev.type == "cuda":
            self.host = self.host.pin_memory()
        self._host = self.host.numpy()
        self.inputs = torch.zeros(4, B * L, dtype=torch.long, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * L
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple] = {}
        # the MTP catch-up's next-token ids
        self.mtp_host = torch.zeros(B * L, dtype=torch.long)
        if dev.type == "cuda":
            self.mtp_host = self.mtp_host.pin_memory()
        self._mtp_host = self.mtp_host.numpy()
        self.mtp_ids = torch.zeros(B * L, dtype=torch.long, device=dev)
        self.mtp_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mtp_outputs: dict[int, tuple] = {}
        self._last: tuple[int, torch.Tensor] | None = None  # (bucket, verify hidden states) of the last `run`
        # the greedy chain (k >= 2): rows first draft, position, state slot, block-table row; the MTP hidden states
        self.has_chain = L >= 3
        self.chain_host = torch.zeros(4, B, dtype=torch.long)
        if dev.type == "cuda":
            self.chain_host = self.chain_host.pin_memory()
        self._chain_host = self.chain_host.numpy()
        self.chain_inputs = torch.zeros(4, B, dtype=torch.long, device=dev)
        self.chain_h = torch.zeros(B, model.config.hidden_size, dtype=next(model.parameters()).dtype, device=dev)
        self.cu1 = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.chain_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.chain_outputs: dict[int, torch.Tensor] = {}
        self._fill_chain(0, [], [], [])
        self.chain_inputs.copy_(self.chain_host)
        self._fill(0, [], [], [], [])
        self.inputs.copy_(self.host)
        if not capture:
            return
        self._copied = torch.cuda.Event()
        self._mtp_copied = torch.cuda.Event()
        self._chain_copied = torch.cuda.Event()
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for b in reversed(self.sizes):
                self.graphs[b], self.outputs[b] = capture_graph(partial(self._forward, b), pool, dev)
                # the catch-up after it, reading its hidden states (captured after it: its scratch never overlaps
                # the verify graph's outputs)
                self.mtp_graphs[b], self.mtp_outputs[b] = capture_graph(
                    partial(self._mtp_forward, b, self.outputs[b][0]), pool, dev)
                if self.has_chain:
                    self.chain_graphs[b], self.chain_outputs[b] = capture_graph(partial(self._chain_forward, b), pool, dev)
        torch.cuda.synchronize(dev)

    def _fill(self, n: int, ids: list[int], pos: list[int], slots: list[int], rows: list[int]) -> None:
        L, h = self.length, self._host
        h[0, : n * L], h[1, : n * L], h[2, :n], h[3, :n] = ids, pos, slots, rows
        h[0, n * L :] = 0
        # padding sequences: positions 0..L-1 in the pad block, no state
        h[1, n * L :] = torch.arange(L).repeat(self.max_batch - n).numpy() if n < self.max_batch else []
        h[2, n:], h[3, n:] = -1, self.cache.pad_row

    def _forward(self, b: int) -> tuple:
        L = self.length
        ids, pos = self.inputs[0, : b * L], self.inputs[1, : b * L]
        slots, rows = self.inputs[2, :b], self.inputs[3, :b]
        ctx = PagedContext(self.cache, self.cu[: b + 1], pos, slots, rows, [i * L for i in range(b + 1)],
                           is_decode=False, max_len=L)
        ctx.set_verify(b, L)
        hidden = self.model.model(ids, ctx)
        return hidden, self.model.compute_logits(self.model.model.norm(hidden)), ctx

    def _mtp_forward(self, b: int, hidden: torch.Tensor) -> tuple:

        L = self.length
        pos, slots, rows = self.inputs[1, : b * L], self.inputs[2, :b], self.inputs[3, :b]
        ctx = PagedContext(self.cache, self.cu[: b + 1], pos, slots, rows, [i * L for i in range(b + 1)],
                           is_decode=False, max_len=L)
        ctx.small_batch = L <= MTP_SMALL_BATCH_LEN
        m = self.model.model
        h = m.mtp[0](hidden, m.word_embeddings(self.mtp_ids[: b * L]), ctx)
        return h, self.model.compute_logits(m.mtp[0].final_layernorm(h))

    def _fill_chain(self, n: int, ids: list[int], pos: list[int], slots: list[int]) -> None:
        h = self._chain_host
        h[:, :n] = (ids, pos, slots, slots)
        h[:, n:] = ((0,), (0,), (-1,), (self.cache.pad_row,))

    def _chain_forward(self, b: int) -> torch.Tensor:
        ids, pos, slots, rows = self.chain_inputs[:, :b]
        m = self.model.model
        h, tok, out = self.chain_h[:b], ids, []
        for j in range(self.length - 2):  # drafts 2..k, each from the MTP at the previous position
            ctx = PagedContext(self.cache, self.cu1[: b + 1], pos + j, slots, rows, None, is_decode=True, max_len=1)
            h = m.mtp[0](h, m.word_embeddings(tok), ctx)
            tok = torch.argmax(self.model.compute_logits(m.mtp[0].final_layernorm(h)).float(), dim=-1)
            out.append(tok)
        return torch.stack(out, 1)

    @torch.no_grad()
    def chain(self, seqs: list) -> list[list[int]]:
        """Greedy drafts 2..k of `seqs` (each holding its first draft and `mtp_hidden`; blocks grown for k + 1
        positions): the MTP chained on its own output and argmax, as `LLMEngine._chain_drafts` for greedy requests
        without logit_bias. Returns the k - 1 tokens of each sequence (one read)."""
        N = len(seqs)
        b = next(s for s in self.sizes if s >= N)
        self.cache.flush()
        if self.capture:
            self._chain_copied.synchronize()
        self._fill_chain(N, [s.draft_tokens[0] for s in seqs], [s.num_computed for s in seqs], [s.slot for s in seqs])
        self.chain_inputs.copy_(self.chain_host, non_blocking=True)
        self.chain_h[:N].copy_(torch.stack([s.mtp_hidden for s in seqs]))
        if self.capture:
            self._chain_copied.record()
            self.chain_graphs[b].replay()
            out = self.chain_outputs[b]
        else:
            out = self._chain_forward(b)
        return out[:N].tolist()

    @torch.no_grad()
    def mtp(self, next_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP catch-up after `run` over the same N sequences x `length` positions: `next_ids` [N * length],
        the token after each position (0 where it was rejected) -> (MTP output before its final norm
        [N * length, hidden], fp32 logits [N * length, V])."""
        b, hidden = self._last
        n = len(next_ids)
        if self.capture:
            self._mtp_copied.synchronize()
        self._mtp_host[:n] = next_ids
        self._mtp_host[n:] = 0
        self.mtp_ids.copy_(self.mtp_host, non_blocking=True)
        if self.capture:
            self._mtp_copied.record()
            self.mtp_graphs[b].replay()
            h, logits = self.mtp_outputs[b]
        else:
            h, logits = self._mtp_forward(b, hidden)
        return h[:n], logits[:n]

    @torch.no_grad()
    def run(self, seqs: list) -> tuple[torch.Tensor, torch.Tensor, PagedContext]:
        """seqs: sequences holding k drafts (len <= max_batch) -> (hidden [N * L, hidden], logits [N * L, V],
        the context whose `commit` keeps the accepted tokens' states)."""
        N, L = len(seqs), self.length
        b = next(s for s in self.sizes if s >= N)
        self.cache.flush()
        if self.capture:
            self._copied.synchronize()  # the last step's copy out of `host` is done before `host` is rewritten
        ids = [t for s in seqs for t in (s.token_ids[s.num_computed], *s.draft_tokens)]
        pos = [s.num_computed + j for s in seqs for j in range(L)]
        slots = [s.slot for s in seqs]
        self._fill(N, ids, pos, slots, slots)
        self.inputs.copy_(self.host, non_blocking=True)
        if self.capture:
            self._copied.record()
            self.graphs[b].replay()
            hidden, logits, ctx = self.outputs[b]
        else:
            hidden, logits, ctx = self._forward(b)
        self._last = (b, hidden)
        return hidden[: N * L], logits[: N * L], ctx
