"""Runs one scheduled batch through the model over the hybrid cache: packs the new tokens of every sequence,
forwards them with the cache's `PagedContext`, and returns the fp32 logits of the sequences whose last
uncomputed token was in this batch (those that sample). Also sizes the cache from the memory budget. Under tensor
parallelism every rank runs one (`ringlinear.engine.workers.TensorParallelRunner` mirrors each call)."""

from __future__ import annotations

import torch

from ringlinear.engine.cache import CacheLayout, HybridCache, plan_layout
from ringlinear.layers.attention_context import PackedContext
from ringlinear.ops.batch_invariant import Alignment, aligned_numerics


class ModelRunner:
    def __init__(self, model, device: torch.device, kv_dtype: torch.dtype, cache_config=None):
        """`cache_config`: the config the cache is sized from (a tensor-parallel rank's heads); default the model's."""
        self.model = model
        self.config = model.config
        self.cache_config = cache_config or model.config
        self.device = device
        self.kv_dtype = kv_dtype
        self.cache: HybridCache | None = None
        self.graphs = None
        self.alignment = Alignment()  # EngineConfig.aligned_numerics: every forward runs under it

    def plan(self, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
             gpu_memory_utilization: float, cpu_cache_bytes: int,
             prefix_state_interval: int | None = None) -> CacheLayout:
        """On CUDA: budget = utilization x total memory - peak of a profiling forward of
        `max_num_batched_tokens` tokens (weights + activations). Elsewhere: `cpu_cache_bytes`. With
        `prefix_state_interval`, the budget holds prefix-cache snapshots too (`plan_layout`)."""
        budget = self.cache_budget(max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, cpu_cache_bytes)
        return plan_layout(self.cache_config, budget, block_size, max_num_seqs, self.kv_dtype,
                           prefix_state_interval)

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
        self.cache = HybridCache(self.cache_config, layout, self.device, self.kv_dtype)
        return self.cache

    def set_max_model_len(self, max_model_len: int) -> None:
        self.cache.set_max_model_len(max_model_len)

    def capture(self, max_batch: int, verbose: bool = True) -> None:
        """CUDA graphs for decode steps of up to `max_batch` sequences; on failure, say so and stay eager."""
        from ringlinear.engine.cuda_graphs import DecodeGraphs

        dtype = next(self.model.parameters()).dtype
        if self.config.num_experts and dtype != torch.bfloat16:
            # only bf16 experts run as one grouped GEMM; other dtypes loop over experts with host-side sizes
            print(f"[ringlinear engine] CUDA graphs off: MoE experts in {dtype} run a per-expert loop "
                  "sized on the host (bf16 runs grouped GEMMs); decode runs eagerly", flush=True)
            return
        try:
            with aligned_numerics(self.alignment):  # the captured kernels are the aligned ones
                self.graphs = DecodeGraphs(self.model, self.cache, max_batch)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured must not take the engine down
            self.graphs = None
            print(f"[ringlinear engine] CUDA graphs off (capture failed: {e!r}); decode runs eagerly", flush=True)
            return
        if verbose:
            print(f"[ringlinear engine] decode under CUDA graphs, batch buckets {self.graphs.sizes}", flush=True)

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

