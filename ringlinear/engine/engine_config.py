"""`EngineConfig`: what an inference engine is built from (checkpoint, device, dtypes, batch and cache sizes);
one field per `ringlinear serve` flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ringlinear.config_base import ConfigBase
from ringlinear.device import DTYPES
from ringlinear.ops.batch_invariant import parse_alignment


@dataclass
class EngineConfig(ConfigBase):
    _where: ClassVar[str] = "engine config"

    model: str | None = None
    """Checkpoint directory in the HF layout (config.json, safetensors, tokenizer.json); None when a live model is
    passed to the engine (RL)."""
    device: str | None = None
    """Device of the weights and the cache; default: CUDA when available, else the CPU."""
    dtype: str | None = None
    """Weights and activations; default: bfloat16 on CUDA, float32 on the CPU."""
    kv_cache_dtype: str | None = None
    """dtype of the softmax layers' KV pages; default: the model's dtype."""
    max_model_len: int | None = None
    """Prompt + generated tokens per request; default: the model's max_position_embeddings, capped by the cache."""
    max_num_seqs: int = 64
    """Sequences in one batch (each holds a linear-state slot)."""
    max_num_batched_tokens: int = 8192
    """Tokens computed in one step (decode tokens + prompt chunks): the chunked-prefill budget."""
    block_size: int = 16
    """Tokens per KV page."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory for weights, activations and the cache."""
    cpu_cache_gib: float = 1.0
    """Cache budget on the CPU, GiB."""
    seed: int = 0
    """Seed of the sampler for requests without their own seed."""
    enforce_eager: bool = False
    """Decode without CUDA graphs."""
    enable_prefix_caching: bool = True
    """Reuse the cache of prompt prefixes seen before (chat history, shared system prompts, RL groups): full KV
    blocks are shared and the linear layers resume from a state snapshot, so a request computes only what follows
    its longest cached prefix."""
    prefix_state_interval: int = 8192
    """Prefix caching: tokens between the linear-state snapshots kept along a sequence (besides the end of each
    prompt and of each sequence); a multiple of block_size. Prefill chunks end at its multiples (the default equals
    the default max_num_batched_tokens, so chunks stay whole), and the cache budget holds one snapshot per this
    many tokens of KV: lower it for more, shorter cached conversations."""
    verbose: bool = True
    """Print the cache layout and loading progress at start."""
    tensor_parallel_size: int = 1
    """Ranks (one GPU each) the model is split over: attention and MLPs by heads and columns, MoE experts across
    ranks, one all-reduce per block. The engine starts the other ranks' processes itself (no torchrun); each reads
    only its slices of the checkpoint. Ring-flash-linear-2.0 in bf16 needs 2 H200s."""
    distributed_backend: str | None = None
    """torch.distributed backend between the ranks: nccl (default on CUDA; one GPU per rank) or gloo (default on the
    CPU; on CUDA it lets ranks share one GPU, for tests, and decodes without CUDA graphs)."""
    load_format: str = "auto"
    """auto: the checkpoint's weights; dummy: random weights made on each device, nothing read (benchmarks; `model`
    may then be a preset name)."""
    num_speculative_tokens: int = 0
    """Speculative decoding: tokens the model's MTP module drafts per sequence and step (0 = off), verified by one
    target forward of k + 1 positions per sequence (rejection sampling keeps the output distribution the target's;
    greedy gives exactly the tokens of plain decoding). Needs a model with MTP layers (num_nextn_predict_layers >=
    1); on CUDA, verify-only steps replay CUDA graphs and other steps run eagerly; not yet with tensor parallel."""
    quantization: str | None = None
    """fp8: quantize a bf16 checkpoint's projections and experts to e4m3 at load (128x128 block scales; activations
    quantized per 1x128 group at run time), half the weight bytes and faster decode. Checkpoints that ship FP8
    weights (config.json quantization_config quant_method fp8) load as FP8 without it."""

    aligned_numerics: str = "off"
    """RL alignment (docs/architecture.md, "RL alignment"): "all", "off" or a comma list of unfused, rope, gemm,
    moe, softmax_attn, linear_attn. With "all" a token's logprobs do not depend on its batch nor on prefill vs decode,
    and equal the trainer's forward under the same switch (`RLConfig.aligned_numerics`); costs decode speed."""

    def validate(self) -> None:
        super().validate()
        need = self.require
        need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        need(self.block_size >= 1, "block_size", "must be >= 1")
        need(self.prefix_state_interval >= 1 and self.prefix_state_interval % self.block_size == 0,
             "prefix_state_interval", f"must be a positive multiple of block_size={self.block_size}")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        need(self.cpu_cache_gib > 0, "cpu_cache_gib", "must be > 0")
        need(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        need(self.num_speculative_tokens >= 0, "num_speculative_tokens", "must be >= 0 (0 = off)")
        need(self.num_speculative_tokens < min(16, self.max_num_batched_tokens), "num_speculative_tokens",
             f"must be < 16 and < max_num_batched_tokens={self.max_num_batched_tokens} (a verify step computes k + 1 "
             "positions per sequence)")
        need(self.num_speculative_tokens == 0 or (self.quantization is None and self.load_format == "auto"),
             "num_speculative_tokens", "not yet with quantization or load_format dummy (their loader leaves the MTP "
             "layers out)")
        need(self.num_speculative_tokens == 0 or self.tensor_parallel_size == 1, "num_speculative_tokens",
             f"not yet with tensor_parallel_size={self.tensor_parallel_size}: speculative decoding runs on one device "
             "(use 0, or tensor_parallel_size 1)")
        need(self.distributed_backend in (None, "nccl", "gloo"), "distributed_backend", "must be nccl, gloo or null")
        need(self.quantization in (None, "fp8"), "quantization", "must be fp8 or null (the weights' own dtype)")
        need(self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy")
        try:
            al = parse_alignment(self.aligned_numerics)
        except ValueError as e:
            self.fail("aligned_numerics", str(e))
        need(not al.any or (self.tensor_parallel_size == 1 and self.quantization is None), "aligned_numerics",
             "not yet with tensor_parallel_size > 1 or fp8 quantization")
        need(not al.any or self.num_speculative_tokens == 0, "aligned_numerics",
             "not yet with num_speculative_tokens > 0 (the verify pass and the MTP drafts are not aligned)")
        for name in ("dtype", "kv_cache_dtype"):
            need(getattr(self, name) is None or getattr(self, name) in DTYPES, name,
                 f"must be one of {sorted(DTYPES)}")
