"""The `ringlinear rl --config FILE` JSON: model, task and reward, rollout sampling, PPO/GRPO loss, alignment
mode and engine sizing. Every field has a default; unknown fields are refused by name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

_BACKENDS = (None, "torch", "triton")


@dataclass
class RLConfig:
    # model
    model: str = "tiny"  # preset name or checkpoint directory (HF layout)
    model_overrides: dict = field(default_factory=dict)  # config fields to override (presets only)
    tokenizer: str | None = None  # directory with tokenizer.json (default: the model dir; byte-level for presets)
    device: str | None = None  # default: cuda when available, else cpu
    compute_dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU (optimizer always steps fp32 masters)
    # task and reward
    task: str = "arithmetic"  # "arithmetic" | "retrieval"
    task_kwargs: dict = field(default_factory=dict)  # e.g. {"max_operand": 9, "ops": "+"}
    reward: str | None = None  # "package.module:function" called as f(prompt, completion, sample) -> float
    # rollouts
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8  # completions per prompt (GRPO group)
    max_tokens: int = 8
    temperature: float = 1.0  # logprobs are always the model's own (T = 1): T != 1 samples off-policy
    top_p: float = 1.0
    # policy update
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    minibatches: int = 1  # optimizer steps per rollout batch (> 1: later ones are off-policy, clipping acts)
    ppo_epochs: int = 1
    micro_batch_seqs: int = 0  # sequences per forward (gradient accumulation); 0 = a whole minibatch
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # > 0: k3 KL to the frozen initial policy
    normalization: str = "token"  # "token" | "sequence"
    scale_adv_by_std: bool = True
    moe_bias_update_rate: float = 0.0  # aux-loss-free balancing during RL (0: routers' biases frozen)
    # alignment
    aligned: bool = True  # PPO clips against the engine's scoring logprobs (bit-equal to the trainer's)
    trainer_backend: str | None = None  # Lightning path of the trainer's forward; off mode default: "torch"
    engine_backend: str | None = None  # Lightning path of the engine (None: Triton on CUDA, torch on CPU)
    tis_mode: str | None = "truncate"  # off mode only: "truncate" | "mask" | None (no correction)
    tis_cap: float = 2.0  # truncate: weight min(p_old/p_rollout, cap); mask: drop tokens outside [1/cap, cap]
    # engine
    engine_max_num_batched_tokens: int = 2048
    engine_memory_utilization: float = 0.3  # of the GPU, beside the trainer's weights and optimizer
    engine_cpu_cache_gib: float = 0.25
    # warm start and evaluation
    sft_warmup_steps: int = 0  # supervised steps on task samples (prompt -> answer) before RL
    sft_lr: float = 1e-3
    sft_batch: int = 32
    eval_every: int = 0  # greedy accuracy on `eval_prompts` held-out samples every N steps (0: off)
    eval_prompts: int = 64
    # run
    seed: int = 0
    out_dir: str | None = "runs/rl"
    progress: bool = True
    plot: bool = True

    @classmethod
    def from_json(cls, path: str) -> RLConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, d: dict) -> RLConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rl config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def scoring_backends(self) -> tuple[str | None, str | None]:
        """(trainer, engine) Lightning backends: equal in aligned mode; off mode puts the trainer on the
        PyTorch reference unless told otherwise."""
        if self.aligned:
            return self.engine_backend, self.engine_backend
        return self.trainer_backend or "torch", self.engine_backend

    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"rl config: {name} must be {allowed}, got {getattr(self, name)!r}")

        for name in ("steps", "prompts_per_step", "group_size", "max_tokens", "minibatches", "ppo_epochs",
                     "engine_max_num_batched_tokens", "sft_batch", "eval_prompts"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1")
        for name in ("micro_batch_seqs", "warmup_steps", "sft_warmup_steps", "eval_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "an integer >= 0")
        need(self.group_size >= 2, "group_size", ">= 2 (group-normalised advantages need a group)")
        need(self.prompts_per_step * self.group_size % self.minibatches == 0, "minibatches",
             "a divisor of prompts_per_step * group_size")
        need(self.lr > 0 and self.sft_lr > 0, "lr", "> 0 (and sft_lr > 0)")
        need(0 < self.temperature <= 100, "temperature", "in (0, 100]")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(self.clip_low >= 0 and self.clip_high >= 0, "clip_low", ">= 0 (and clip_high >= 0)")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.normalization in ("token", "sequence"), "normalization", "'token' or 'sequence'")
        need(self.compute_dtype in ("auto", "bf16", "fp32"), "compute_dtype", "auto, bf16 or fp32")
        need(self.task in ("arithmetic", "retrieval"), "task", "'arithmetic' or 'retrieval'")
        need(self.reward is None or (isinstance(self.reward, str) and ":" in self.reward), "reward",
             "None or 'package.module:function'")
        need(self.tis_mode in (None, "truncate", "mask"), "tis_mode", "None, 'truncate' or 'mask'")
        need(self.tis_cap > 1, "tis_cap", "> 1")
        need(self.trainer_backend in _BACKENDS, "trainer_backend", f"one of {_BACKENDS}")
        need(self.engine_backend in _BACKENDS, "engine_backend", f"one of {_BACKENDS}")
        if self.aligned and self.trainer_backend not in (None, self.engine_backend):
            raise ValueError(f"rl config: aligned mode runs the trainer on the engine's kernels; trainer_backend="
                             f"{self.trainer_backend!r} differs from engine_backend={self.engine_backend!r} "
                             "(set aligned: false to compare paths)")
        need(0 < self.engine_memory_utilization <= 1, "engine_memory_utilization", "in (0, 1]")
        need(self.engine_cpu_cache_gib > 0, "engine_cpu_cache_gib", "> 0")
