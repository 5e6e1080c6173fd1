"""`RLConfig`: the `ringlinear rl --config FILE` JSON (every field also a `--field` flag): model, task and reward,
rollout sampling, PPO/GRPO loss, alignment mode and engine sizing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ringlinear.config_base import ConfigBase
from ringlinear.ops.batch_invariant import parse_alignment

_BACKENDS = (None, "torch", "triton")


@dataclass
class RLConfig(ConfigBase):
    _where: ClassVar[str] = "rl config"

    # ---- model
    model: str = "tiny"
    """Preset name or checkpoint directory (HF layout)."""
    model_overrides: dict = field(default_factory=dict)
    """Model config fields to override (presets only)."""
    tokenizer: str | None = None
    """Directory with tokenizer.json; default: the checkpoint's, byte-level for presets."""
    device: str | None = None
    """Default: CUDA when available, else the CPU."""
    compute_dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32; the optimizer always steps fp32 master weights."""
    # ---- task and reward
    task: str = "arithmetic"
    """Built-in task: "arithmetic" or "retrieval" (examples; `prompts` replaces it)."""
    prompts: str | None = None
    """Prompts from a JSON-lines file (one object per line) or a `datasets.save_to_disk` directory; each record's
    `prompt_key` field is a string or a list of chat messages, and the whole record reaches the reward as `sample`.
    Needs `reward`."""
    prompt_key: str = "prompt"
    """The record field that holds the prompt."""
    chat_template: bool = False
    """Render each prompt with the tokenizer's chat template (a string prompt becomes one user message)."""
    task_kwargs: dict = field(default_factory=dict)
    """Arguments of the task, e.g. {"max_operand": 9, "ops": "+"}."""
    reward: str | None = None
    """"package.module:function" (or "path/to/file.py:function") called as f(prompt, completion, sample) -> float;
    default: the task's reward. This imports and runs that code in the RL process: name only code you trust."""
    # ---- rollouts
    steps: int = 50
    """RL steps (rollout batch + update)."""
    prompts_per_step: int = 8
    """Prompts sampled per step."""
    group_size: int = 8
    """Completions per prompt (the GRPO group)."""
    max_tokens: int = 8
    """Longest completion."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are always the model's own (T = 1), so T != 1 samples off-policy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    # ---- policy update
    lr: float = 1e-4
    """AdamW learning rate."""
    warmup_steps: int = 0
    """Steps of linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (<= 0: none)."""
    minibatches: int = 1
    """Optimizer steps per rollout batch (> 1: later ones are off-policy and clipping acts)."""
    ppo_epochs: int = 1
    """Passes over the rollout batch."""
    micro_batch_seqs: int = 0
    """Sequences per forward (gradient accumulation); 0: a whole minibatch."""
    clip_low: float = 0.2
    """PPO ratio clip below 1."""
    clip_high: float = 0.2
    """PPO ratio clip above 1."""
    kl_coef: float = 0.0
    """> 0: k3 KL penalty to the frozen initial policy."""
    normalization: str = "token"
    """Loss mean over "token"s or over "sequence"s."""
    scale_adv_by_std: bool = True
    """Divide group advantages by the group's reward std."""
    moe_bias_update_rate: float = 0.0
    """Aux-loss-free balancing during RL (0: the routers' biases stay frozen)."""
    # ---- alignment
    aligned: bool = True
    """PPO clips against the engine's scoring logprobs (bit-equal to the trainer's)."""
    trainer_backend: str | None = None
    """Ops backend of the trainer's forward ("torch" or "triton"; off mode default: "torch")."""
    engine_backend: str | None = None
    """Ops backend of the engine (None: Triton on CUDA, torch on the CPU)."""
    old_logprobs: str = "scoring"
    """Aligned mode: the PPO ratio's denominator. "scoring": the engine's scoring pass (bit-equal to the trainer;
    TIS corrects for the sampler's own logprobs); "rollout": the sampler's own logprobs, no scoring pass (with
    aligned_numerics "all" they equal the trainer's, so the first ratio is exactly 1)."""
    aligned_numerics: str = "off"
    """Switches that make the sampler compute what the trainer computes, for the rollout engine and every trainer
    forward: "all", "off" or a comma list of unfused, rope, gemm, moe, softmax_attn, linear_attn (docs/architecture.md,
    "RL alignment")."""
    tis_mode: str | None = "truncate"
    """Importance-sampling correction toward the sampler (off mode, and aligned mode with old_logprobs "scoring"):
    "truncate", "mask" or null (none)."""
    tis_cap: float = 2.0
    """truncate: weight min(p_old / p_sampler, cap); mask: drop tokens whose ratio is outside [1/cap, cap]."""
    # ---- engine
    engine_max_num_batched_tokens: int = 2048
    """The rollout engine's tokens per step."""
    engine_memory_utilization: float = 0.3
    """Fraction of the GPU for the rollout engine, beside the trainer's weights and optimizer."""
    engine_cpu_cache_gib: float = 0.25
    """The rollout engine's cache budget on the CPU, GiB."""
    # ---- warm start and evaluation
    sft_warmup_steps: int = 0
    """Supervised steps on task samples (prompt -> answer) before RL."""
    sft_lr: float = 1e-3
    """Learning rate of the supervised warm start."""
    sft_batch: int = 32
    """Samples per supervised step."""
    eval_every: int = 0
    """Greedy accuracy on `eval_prompts` held-out samples every N steps (0: off)."""
    eval_prompts: int = 64
    """Held-out samples of the evaluation."""
    # ---- run
    seed: int = 0
    """Seed of the initial weights (presets), tasks and sampling."""
    out_dir: str | None = "runs/rl"
    """Where history.json, config.json and reward.png go (null: nowhere)."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write reward.png."""

    @property
    def scoring_backends(self) -> tuple[str | None, str | None]:
        """(trainer, engine) ops backends: equal in aligned mode; off mode puts the trainer on the PyTorch
        reference unless told otherwise."""
        if self.aligned:
            return self.engine_backend, self.engine_backend
        return self.trainer_backend or "torch", self.engine_backend

    def validate(self) -> None:
        super().validate()
        need = self.require
        for name in ("steps", "prompts_per_step", "group_size", "max_tokens", "minibatches", "ppo_epochs",
                     "engine_max_num_batched_tokens", "sft_batch", "eval_prompts"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("micro_batch_seqs", "warmup_steps", "sft_warmup_steps", "eval_every"):
            need(getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(self.group_size >= 2, "group_size", "must be >= 2 (group-normalised advantages need a group)")
        need(self.prompts_per_step * self.group_size % self.minibatches == 0, "minibatches",
             "must divide prompts_per_step * group_size")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.sft_lr > 0, "sft_lr", "must be > 0")
        need(0 < self.temperature <= 100, "temperature", "must be in (0, 100]")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.clip_low >= 0, "clip_low", "must be >= 0")
        need(self.clip_high >= 0, "clip_high", "must be >= 0")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.normalization in ("token", "sequence"), "normalization", "must be 'token' or 'sequence'")
        need(self.compute_dtype in ("auto", "bf16", "fp32"), "compute_dtype", "must be auto, bf16 or fp32")
        need(self.task in ("arithmetic", "retrieval"), "task", "must be 'arithmetic' or 'retrieval'")
        need(self.reward is None or (":" in self.reward and all(self.reward.rpartition(":")[::2])), "reward",
             "must be null or 'package.module:function'")
        need(self.prompts is None or self.reward is not None, "reward",
             "is needed with prompts (the built-in tasks' rewards only know their own samples)")
        need(bool(self.prompt_key), "prompt_key", "must be a non-empty field name")
        need(self.prompts is None or self.sft_warmup_steps == 0, "sft_warmup_steps",
             "must be 0 with prompts (the warm start trains on a built-in task's answers)")
        need(self.old_logprobs in ("scoring", "rollout"), "old_logprobs", "must be 'scoring' or 'rollout'")
        need(self.aligned or self.old_logprobs == "scoring", "old_logprobs",
             "'rollout' needs aligned: true (off mode recomputes old logprobs on the trainer's path)")
        try:
            parse_alignment(self.aligned_numerics)
        except ValueError as e:
            self.fail("aligned_numerics", str(e))
        need(self.tis_mode in (None, "truncate", "mask"), "tis_mode", "must be null, 'truncate' or 'mask'")
        need(self.tis_cap > 1, "tis_cap", "must be > 1")
        need(self.trainer_backend in _BACKENDS, "trainer_backend", f"must be one of {_BACKENDS}")
        need(self.engine_backend in _BACKENDS, "engine_backend", f"must be one of {_BACKENDS}")
        need(not self.aligned or self.trainer_backend in (None, self.engine_backend), "trainer_backend",
             f"differs from engine_backend={self.engine_backend!r}: aligned mode runs the trainer on the engine's "
             "kernels (set aligned: false to compare paths)")
        need(0 < self.engine_memory_utilization <= 1, "engine_memory_utilization", "must be in (0, 1]")
        need(self.engine_cpu_cache_gib > 0, "engine_cpu_cache_gib", "must be > 0")
