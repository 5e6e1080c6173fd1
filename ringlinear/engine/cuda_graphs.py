"""Decode steps under CUDA graphs: one graph per batch-size bucket, captured once over static input buffers
(token ids, positions, state slots, KV write slots, block tables, lengths); a step copies its batch into the
buffers (padding rows: slot -1, length 0, K/V written to a reserved block) and replays the smallest bucket
that holds it. Every op of the decode forward reads its sizes from device tensors (Triton Lightning decode,
Triton paged attention, grouped-GEMM MoE), so nothing is re-captured as sequences grow."""

from __future__ import annotations

import torch

from ringlinear.engine.cache import HybridCache, PagedContext
from ringlinear.layers.attention_context import AttentionContext

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class _StaticDecodeContext(PagedContext):
    def __init__(self, graphs: DecodeGraphs, B: int):  # noqa: D107 - views of the static buffers
        AttentionContext.__init__(self, torch.arange(B + 1, dtype=torch.int32), graphs.pos[:B])
        self.cu_seqlens = graphs.cu[: B + 1]
        self.cache = graphs.cache
        self.lens, self.starts = [1] * B, None
        self.is_decode = True
        self.slots = graphs.slots[:B]
        self.slot_mapping = graphs.slot_mapping[:B]
        self.block_tables = graphs.block_tables[:B]
        self.seq_lens = graphs.seq_lens[:B]


class DecodeGraphs:
    def __init__(self, model, cache: HybridCache, max_batch: int, max_model_len: int):
        self.model, self.cache = model, cache
        dev = cache.device
        self.sizes = [b for b in BUCKETS if b < max_batch] + [max_batch]
        B = self.max_batch = max_batch
        W = cache.blocks_for(max_model_len + 1)
        self.trash = cache.reserve_block() if cache.kv else 0
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((B,), self.trash * cache.block_size, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(B, W, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for b in reversed(self.sizes):
                ctx = _StaticDecodeContext(self, b)
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: kernel compilation, allocator, cuBLAS workspaces
                        model(self.ids[:b], ctx)
                torch.cuda.current_stream(dev).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.outputs[b] = model(self.ids[:b], ctx)
                self.graphs[b] = g
        torch.cuda.synchronize(dev)

    def run(self, batch: list[tuple[object, int]]) -> torch.Tensor:
        """batch: sequences adding one token each (len <= max_batch) -> fp32 logits [len(batch), V]."""
        N = len(batch)
        b = next(s for s in self.sizes if s >= N)
        seqs = [s for s, _ in batch]
        bs = self.cache.block_size
        pos = [s.num_computed for s in seqs]
        ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
        slot_map = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)] if self.cache.kv else [0] * N
        pad = b - N
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, [s.slot for s in seqs] + [-1] * pad,
                             slot_map + [self.trash * bs] * pad, [p + 1 for p in pos] + [0] * pad], dtype=torch.long)
        self.ids[:b].copy_(host[0], non_blocking=True)
        self.pos[:b].copy_(host[1], non_blocking=True)
        self.slots[:b].copy_(host[2], non_blocking=True)
        self.slot_mapping[:b].copy_(host[3], non_blocking=True)
        self.seq_lens[:b].copy_(host[4], non_blocking=True)
        if self.cache.kv:
            w = max(len(s.block_table) for s in seqs)
            bt = torch.tensor([s.block_table + [0] * (w - len(s.block_table)) for s in seqs], dtype=torch.int32)
            self.block_tables[:N, :w].copy_(bt, non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][:N]
