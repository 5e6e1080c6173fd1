"""Runs one scheduled batch through the model over the hybrid cache: packs the new tokens of every sequence,
forwards them with the cache's `PagedContext`, and returns the fp32 logits of the sequences whose last
uncomputed token was in this batch (those that sample). Also sizes the cache from the memory budget. Under tensor
parallelism every rank runs one (`ringlinear.engine.workers.TensorParallelRunner` mirrors each call)."""

from __future__ import annotations

import torch

from ringlinear.engine.cache import MTP_SMALL_BATCH_LEN, CacheLayout, HybridCache, PagedContext, plan_layout
from ringlinear.layers.attention_context import PackedContext
from ringlinear.ops.batch_invariant import Alignment, aligned_numerics


class ModelRunner:
    def __init__(self, model, device: torch.device, kv_dtype: torch.dtype, cache_config=None, mtp_kv_layers: int = 0):
        """`cache_config`: the config the cache is sized from (a tensor-parallel rank's heads); default the model's.
        `mtp_kv_layers`: MTP layers whose KV the cache keeps (speculative decoding)."""
        self.mtp_kv_layers = mtp_kv_layers
        self.model = model
        self.config = model.config
        self.cache_config = cache_config or model.config
        self.device = device
        self.kv_dtype = kv_dtype
        self.cache: HybridCache | None = None
        self.graphs = None
        self.verify_graphs = None  # speculative decoding: ringlinear.engine.cuda_graphs.VerifyGraphs
        self.alignment = Alignment()  # EngineConfig.aligned_numerics: every forward runs under it
        self.last_verify_graph = False  # the last `execute_verify` replayed a verify graph

    def plan(self, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
             gpu_memory_utilization: float, cpu_cache_bytes: int,
             prefix_state_interval: int | None = None) -> CacheLayout:
        """On CUDA: budget = utilization x total memory - peak of a profiling forward of
        `max_num_batched_tokens` tokens (weights + activations). Elsewhere: `cpu_cache_bytes`. With
        `prefix_state_interval`, the budget holds prefix-cache snapshots too (`plan_layout`)."""
        budget = self.cache_budget(max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, cpu_cache_bytes)
        return plan_layout(self.cache_config, budget, block_size, max_num_seqs, self.kv_dtype,
                           prefix_state_interval, self.mtp_kv_layers)

    def cache_budget(self, max_num_seqs: int, max_num_batched_tokens: int, gpu_memory_utilization: float,
                     cpu_cache_bytes: int) -> int:
        """Bytes the cache may take (see `plan`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            with aligned_numerics(self.alignment):
                self.profile(max_num_batched_tokens, max_num_seqs)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = int(total * gpu_memory_utilization) - peak
            torch.cuda.empty_cache()
        else:
            budget = cpu_cache_bytes
        return budget

    @torch.no_grad()
    def profile(self, num_tokens: int, num_seqs: int) -> None:
        """A forward of `num_tokens` tokens (no cache) to measure the activation peak."""
        ids = torch.randint(0, self.config.vocab_size, (num_tokens,), device=self.device)
        ctx = PackedContext.from_lens([num_tokens], self.device)
        last = torch.arange(min(num_seqs, num_tokens), device=self.device)
        self.model(ids, ctx, logits_indices=last)

    def allocate(self, layout: CacheLayout) -> HybridCache:
        self.cache = HybridCache(self.cache_config, layout, self.device, self.kv_dtype, self.mtp_kv_layers)
        return self.cache

    def set_max_model_len(self, max_model_len: int) -> None:
        self.cache.set_max_model_len(max_model_len)

    def capture(self, max_batch: int, verbose: bool = True, verify_length: int = 0) -> None:
        """CUDA graphs for decode steps of up to `max_batch` sequences (with `verify_length` = k + 1: for verify
        steps of k drafts per sequence instead); on failure, say so and stay eager."""
        from ringlinear.engine.cuda_graphs import DecodeGraphs, VerifyGraphs

        dtype = next(self.model.parameters()).dtype
        if self.config.num_experts and dtype != torch.bfloat16:
            # only bf16 experts run as one grouped GEMM; other dtypes loop over experts with host-side sizes
            print(f"[ringlinear engine] CUDA graphs off: MoE experts in {dtype} run a per-expert loop "
                  "sized on the host (bf16 runs grouped GEMMs); decode runs eagerly", flush=True)
            return
        try:
            with aligned_numerics(self.alignment):  # the captured kernels are the aligned ones
                if verify_length:
                    self.verify_graphs = VerifyGraphs(self.model, self.cache, max_batch, verify_length)
                else:
                    self.graphs = DecodeGraphs(self.model, self.cache, max_batch)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured must not take the engine down
            self.graphs = self.verify_graphs = None
            print(f"[ringlinear engine] CUDA graphs off (capture failed: {e!r}); decode runs eagerly", flush=True)
            return
        if verbose:
            what = (f"verify steps ({verify_length} positions per sequence, with the MTP catch-up"
                    f"{' and the greedy draft chain' if verify_length > 2 else ''}; other steps eager)"
                    if verify_length else "decode")
            print(f"[ringlinear engine] {what} under CUDA graphs, batch buckets "
                  f"{(self.verify_graphs or self.graphs).sizes}", flush=True)

    @torch.no_grad()
    def execute(self, batch: list[tuple[object, int]], sampling_rows: list[int],
                token_rows: list[int] | None = None) -> torch.Tensor:
        """batch: (sequence, n new tokens); sampling_rows: indices into batch of sequences to sample; token_rows:
        indices among the batch's packed new tokens whose logits are wanted too (prompt logprobs).
        Returns fp32 logits [len(sampling_rows) + len(token_rows), V]: the sampling rows' last tokens first."""
        if (self.graphs is not None and len(batch) <= self.graphs.max_batch and len(sampling_rows) == len(batch)
                and not token_rows and all(n == 1 for _, n in batch)):
            return self.graphs.run(batch)
        with aligned_numerics(self.alignment):
            return self._execute(batch, sampling_rows, token_rows)

    def _execute(self, batch, sampling_rows, token_rows):
        ids = [t for seq, n in batch for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        ctx = self.cache.context(batch)
        b = ctx._bounds
        rows = torch.tensor([b[i + 1] - 1 for i in sampling_rows] + list(token_rows or ()), dtype=torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model(input_ids, ctx, logits_indices=rows.to(self.device, non_blocking=True))


    # ---- speculative decoding (ringlinear.engine.spec_decode) ---------------------------------------------------
    @torch.no_grad()
    def execute_verify(self, batch: list[tuple[object, int]], num_verify: int, sampling_rows: list[int],
                       token_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, PagedContext]:
        """`execute` where the first `num_verify` sequences of `batch` verify their drafts: each computes its last
        token and its `draft_tokens` (k + 1 positions, every one of them with logits; linear states not advanced
        until `ctx.commit`). Returns the last hidden states before the final norm [T, hidden] (the MTP's input),
        fp32 logits [len(sampling_rows) + num_verify * (k + 1) + len(token_rows), V] in that order, and the
        context."""
        vg = self.verify_graphs
        self.last_verify_graph = (vg is not None and num_verify == len(batch) <= vg.max_batch and not sampling_rows
                                  and not token_rows)
        if self.last_verify_graph:  # the MTP catch-up then replays `vg.mtp` over the same positions
            return vg.run([seq for seq, _ in batch])
        ids = []
        for i, (seq, n) in enumerate(batch):
            nc = seq.num_computed
            ids.extend([seq.token_ids[nc], *seq.draft_tokens] if i < num_verify else seq.token_ids[nc : nc + n])
        ctx = self.cache.context(batch)
        length = batch[0][1] if num_verify else 0
        if num_verify:
            ctx.set_verify(num_verify, length)
        b = ctx._bounds
        rows = [b[i + 1] - 1 for i in sampling_rows] + list(range(num_verify * length)) + list(token_rows or ())
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model.model(input_ids, ctx)
        rows_t = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        return hidden, self.model.compute_logits(self.model.model.norm(hidden.index_select(0, rows_t))), ctx

    @torch.no_grad()
    def mtp_forward(self, hidden: torch.Tensor, next_ids: list[int], lens: list[int], starts: list[int],
                    slots: list[int]) -> torch.Tensor:
        """The MTP module (depth 1) over packed positions: rows i of `hidden` [T, hidden] (the target's hidden
        state at a position, or the MTP's own output when chaining) with the embedding of the token after it,
        `lens[i]` positions from `starts[i]` for the sequence in state slot `slots[i]`; its KV is written at those
        positions. Returns its output before `final_layernorm`, [T, hidden]."""
        model = self.model.model
        self.cache.flush()
        ctx = PagedContext.of_rows(self.cache, lens, starts, slots)
        ctx.small_batch = max(lens) <= MTP_SMALL_BATCH_LEN
        ids = torch.tensor(next_ids, dtype=torch.long).to(self.device, non_blocking=True)
        return model.mtp[0](hidden, model.word_embeddings(ids), ctx)

    @torch.no_grad()
    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of MTP outputs [N, hidden] (its final norm, the shared lm_head)."""
        return self.model.compute_logits(self.model.model.mtp[0].final_layernorm(h))
