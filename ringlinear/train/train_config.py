"""`TrainConfig`: the `ringlinear train --config FILE` JSON (every field also a `--field` flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from ringlinear.config_base import ConfigBase
from ringlinear.ops.batch_invariant import parse_alignment


@dataclass
class TrainConfig(ConfigBase):
    _where: ClassVar[str] = "train config"

    model: str = "tiny"
    """Preset name or checkpoint directory (HF layout) to start from."""
    data: list[str] = field(default_factory=list)
    """Training data: plain text files (documents split at `doc_separator`), JSON lines / Parquet / CSV files
    (read with HF `datasets`, one record per document), or directories of HF datasets saved with save_to_disk."""
    data_format: str = "auto"
    """Format of `data`: auto (from the extension; a directory is a saved dataset), text, json, parquet, csv or
    dataset."""
    text_field: str = "text"
    """The record field holding a document's text (JSON / Parquet / CSV / datasets)."""
    sft: bool = False
    """Supervised fine-tuning: each record is {"prompt": ..., "response": ...} (e.g. a JSON lines file); the
    tokens are prompt + response + EOS and the loss counts only the response and the EOS."""
    streaming: bool = False
    """Read, tokenise (a background thread) and pack the data as training goes, in corpus order, instead of all of
    it up front (shuffled rows); for corpora larger than memory. Resumes at the exact record and token."""
    model_overrides: dict = field(default_factory=dict)
    """Model config fields to override (presets only)."""
    tokenizer: str | None = None
    """Directory with tokenizer.json; default: the checkpoint's own, byte-level for presets."""
    doc_separator: str | None = "\n\n\n"
    """Where text files split into documents (null: one document per file)."""
    seq_len: int = 256
    """Tokens per packed row."""
    micro_batch: int = 4
    """Rows per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""
    steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 10
    """Steps of linear warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (<= 0: none)."""
    seed: int = 0
    """Seed of the initial weights (presets), data order and dropout-free RNG state."""
    embedding_init_std: float | None = None
    """Presets: std of the input embeddings at init (default: initializer_range)."""
    init_device: str = "cpu"
    """Presets: where the initial weights are drawn: cpu (the same weights on any machine; one CPU thread draws
    them, minutes for billions of parameters) or device (each rank's own device, seconds; the same on every rank
    of one kind of GPU). A checkpoint's weights are read, not drawn."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: identical runs give identical losses and a resume continues bit for bit
    (slower on GPUs). Without it runs are NOT reproducible: two runs of one config differ from the first step on.
    On the CPU the one source is the backward of the MoE token dispatch `x[order // k]`
    (ringlinear.ops.moe.naive_moe_dispatch): an accumulating index_put_, whose parallel kernel adds a token's k
    gradients in a varying order; on GPUs also atomic adds in other kernels."""
    shuffle: bool = True
    """Shuffle the rows every epoch (seeded); streamed data comes in corpus order."""
    fp8: bool = False
    """FP8 recipe for the projections and experts (CUDA GPUs with FP8 GEMMs)."""
    fp8_experts: bool = True
    """With fp8: the routed expert GEMMs too (else only dense projections)."""
    fp8_grouped_gemm: str = "triton"
    """The experts' FP8 grouped GEMM: "triton" (ours) or "torch" (torch._scaled_grouped_mm)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward."""
    compute_dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32; the optimizer always steps fp32 master weights."""
    parallelism: dict = field(default_factory=dict)
    """Under torchrun: {"dp_shard": N, "ep": M} (ringlinear.distributed.ParallelismConfig): FSDP2 over dp_shard
    ranks (-1: all), routed experts split over ep of them; {} is FSDP over every rank, no expert parallelism."""
    save_dir: str | None = None
    """Directory of checkpoints, history.json, loss.png and the final export."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (older ones are deleted)."""
    async_save: bool = True
    """Write checkpoints in a background thread from a CPU copy of the state (training goes on meanwhile); false:
    the step waits until the checkpoint is on disk."""
    resume: bool = False
    """Continue from the newest intact checkpoint in save_dir."""
    export: bool = True
    """Write the final model in the HF layout to {save_dir}/final."""
    export_dtype: str = "bfloat16"
    """dtype of the exported weights (routers stay fp32)."""
    plot: bool = True
    """Write loss.png."""
    tensorboard: bool = True
    """Log every step to TensorBoard in {save_dir}/tensorboard (needs the `tensorboard` package)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the `wandb` package)."""
    progress: bool = True
    """Show a progress bar."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for MFU; default: the GPU's dense bf16 peak from ringlinear.device."""
    aligned_numerics: str = "off"
    """The forward's numerics under the RL alignment switches ("all", "off" or a comma list of unfused, rope, gemm,
    moe, softmax_attn, linear_attn; docs/architecture.md, "RL alignment"): a model trained so computes what an engine
    with the same `aligned_numerics` samples. Slower; the fused lm_head + cross entropy is unchanged."""

    def validate(self) -> None:
        super().validate()
        need = self.require
        try:
            parse_alignment(self.aligned_numerics)
        except ValueError as e:
            self.fail("aligned_numerics", str(e))
        from ringlinear.distributed.mesh import ParallelismConfig

        parallel = ParallelismConfig.from_dict(self.parallelism)  # its errors name the parallelism field
        need(self.aligned_numerics == "off" or not self.fp8, "aligned_numerics", "not yet with fp8 training")
        need(not parse_alignment(self.aligned_numerics).moe or parallel.ep <= 1,
             "aligned_numerics", "moe: not yet with expert parallelism (its all-to-all forward replaces the MoE's)")
        for name in ("seq_len", "micro_batch", "grad_accum", "steps"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(bool(self.data), "data", "must list at least one text file or dataset directory")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.init_device in ("cpu", "device"), "init_device", "must be cpu or device")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.compute_dtype in ("auto", "bf16", "fp32"), "compute_dtype", "must be auto, bf16 or fp32")
        need(self.export_dtype in ("bfloat16", "float32", "float16"), "export_dtype",
             "must be bfloat16, float32 or float16")
        need(self.embedding_init_std is None or self.embedding_init_std > 0, "embedding_init_std", "must be > 0")
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")
        need(self.fp8_grouped_gemm in ("torch", "triton"), "fp8_grouped_gemm", "must be one of ['torch', 'triton']")
        need(not (self.save_every or self.resume) or bool(self.save_dir), "save_dir",
             "must be set for save_every / resume")
        from ringlinear.train.sources import FORMATS

        need(self.data_format in FORMATS, "data_format", f"must be one of {list(FORMATS)}")
        need(bool(self.text_field), "text_field", "must be a field name")

        need(self.doc_separator is None or self.doc_separator != "", "doc_separator",
             "must be a non-empty string, or null for one document per file")

    def model_config(self):
        """The model's RingLinearConfig, read without building the model (a preset with `model_overrides`, or a
        checkpoint's config.json); None when `model` is neither (building the model then says why)."""
        from ringlinear.config import PRESETS, RingLinearConfig, preset

        if self.model in PRESETS:
            return preset(self.model, **self.model_overrides)
        if os.path.isfile(os.path.join(self.model, "config.json")):
            return RingLinearConfig.load(self.model)
        return None

    def check_model(self, model_config) -> None:
        """Refuse rows longer than the model's context: positions past `max_position_embeddings` are outside
        what its RoPE was set up for (and a 100000-token row is an out-of-memory kill, not a training run)."""
        if model_config is not None and self.seq_len > model_config.max_position_embeddings:
            self.fail("seq_len", f"must be <= the model's max_position_embeddings={model_config.max_position_embeddings} "
                                 f"(model {self.model!r}); raise max_position_embeddings (model_overrides for a preset, "
                                 "config.json for a checkpoint) if the model is meant for longer rows")
