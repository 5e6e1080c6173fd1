"""Pre-training loop: AdamW on fp32 master weights, linear warmup + cosine decay, global-norm gradient
clipping, gradient accumulation, optional activation checkpointing and FP8, aux-loss-free MoE balancing
after each step, FSDP2 data parallel under torchrun, crash-safe resumable checkpoints, HF export.

Precision (one choice): the optimizer always steps fp32 master weights. Single process on GPU: the model
holds bf16 parameters (router fp32) and `MasterWeights` keeps an fp32 copy (gradients accumulated in fp32
there, updated weights copied back to bf16). Under FSDP2 the sharded fp32 parameters are the masters and
`MixedPrecisionPolicy` casts them to bf16 for compute. On the CPU everything is fp32 (masters = params).
Loss of a step = mean over micro-batches (and DP ranks) of each micro-batch's mean token loss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ringlinear.checkpoint import build_model, init_model, load_model, save_model
from ringlinear.config import PRESETS, RingLinearConfig, preset
from ringlinear.layers.moe import Router
from ringlinear.model import IGNORE_INDEX, DecoderLayer, RingLinearForCausalLM
from ringlinear.train import checkpointing as ckpt
from ringlinear.train.balancing import update_expert_bias
from ringlinear.train.data import PackedDataset
from ringlinear.train.parallelize import apply_fsdp, init_distributed


@dataclass
class TrainConfig:
    """The `ringlinear train --config FILE` JSON; every field has a default except `model` and `data`."""

    model: str = "tiny"  # preset name or checkpoint directory
    data: list[str] = field(default_factory=list)  # text files (documents split at doc_separator) or HF dataset dirs
    model_overrides: dict = field(default_factory=dict)  # config fields to override (presets only)
    tokenizer: str | None = None  # directory with tokenizer.json (default: the model dir, byte-level for small presets)
    doc_separator: str | None = "\n\n\n"
    seq_len: int = 256
    micro_batch: int = 4  # rows per micro-batch per rank
    grad_accum: int = 1
    steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    embedding_init_std: float | None = None  # presets: std of the input embeddings at init (default initializer_range)
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU embedding backward is not, by default)
    shuffle: bool = True
    fp8: bool = False
    fp8_experts: bool = True  # with fp8: the routed expert GEMMs too (else only dense projections)
    # the experts' FP8 grouped GEMM: "triton" (ours: 1.21x / 0.91x the speed of BF16's on the H100) or "torch"
    # (torch._scaled_grouped_mm: 0.64x / 0.57x)
    fp8_grouped_gemm: str = "triton"
    activation_checkpointing: bool = False
    compute_dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    save_dir: str | None = None
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    export: bool = True  # write the final model in the HF layout to {save_dir}/final
    export_dtype: str = "bfloat16"
    plot: bool = True
    progress: bool = True
    peak_tflops: float | None = None  # for MFU; default: H100 dense bf16 989 when the GPU is an H100

    @classmethod
    def from_json(cls, path: str) -> TrainConfig:
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown field(s) {unknown}; known: {sorted(known)}")
        if "betas" in d:
            d = {**d, "betas": tuple(d["betas"])}
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.data:
            raise ValueError("train config: `data` must list at least one text file or dataset directory")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("train config: need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train config: compute_dtype must be auto, bf16 or fp32, got {self.compute_dtype!r}")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"train config: embedding_init_std must be > 0, got {self.embedding_init_std!r}")
        from ringlinear.train.fp8_recipe import GROUPED_GEMMS

        if self.fp8_grouped_gemm not in GROUPED_GEMMS:
            raise ValueError(f"train config: fp8_grouped_gemm must be one of {sorted(GROUPED_GEMMS)}, "
                             f"got {self.fp8_grouped_gemm!r}")
        if (self.save_every or self.resume) and not self.save_dir:
            raise ValueError("train config: save_every / resume need save_dir")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class MasterWeights:
    """fp32 master copies of low-precision parameters (fp32 parameters are their own master)."""

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = []
        for p in params:
            m = p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
            self.pairs.append((p, m))

    @property
    def params(self) -> list[nn.Parameter]:
        return [m for _, m in self.pairs]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move this micro-batch's low-precision gradients into fp32 (so accumulation is in fp32): the first
        micro-batch's are cast, later ones added in place into the fp32 sums (one multi-tensor call, no fp32
        copies of the low-precision gradients)."""
        acc_m, acc_p = [], []
        for p, m in self.pairs:
            if m is not p and p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    acc_m.append(m.grad)
                    acc_p.append(p.grad)
        if acc_m:
            torch._foreach_add_(acc_m, acc_p)
        for p, m in self.pairs:
            if m is not p:
                p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        low = [(p, m) for p, m in self.pairs if m is not p]
        if low:
            torch._foreach_copy_([p for p, _ in low], [m for _, m in low])


def make_adamw(master: MasterWeights, lr: float, betas, weight_decay: float, device: torch.device,
               distributed: bool) -> torch.optim.AdamW:
    """AdamW over the fp32 masters, weight decay on matrices only. On a GPU the fused kernel (one pass over
    params, grads and both moments; the multi-tensor path makes ~8) unless the masters are FSDP shards, where
    the multi-tensor path is kept; on the CPU the plain loop (bit-for-bit the reference for resume tests)."""
    decay = [m for p, m in master.pairs if p.dim() >= 2]
    no_decay = [m for p, m in master.pairs if p.dim() < 2]
    gpu = device.type == "cuda"
    kind = {"fused": True} if gpu and not distributed else {"foreach": gpu}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=1e-8, **kind)


def invalidate_fp8_weights(model: nn.Module) -> None:
    """Drop the FP8 recipe's cached weight quantizations (they are reused across the micro-batches of one step):
    after an optimizer step they are stale. Explicit, so no optimizer's in-place update can be missed."""
    for mod in model.modules():
        cache = mod.__dict__.get("_fp8_cache")
        if cache:
            cache.clear()


def clip_and_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to global norm `max_norm` (<= 0: no clipping), step `opt`, return the norm
    before clipping. A fused AdamW divides every gradient by its `grad_scale` inside its one pass (the hook of
    AMP's GradScaler), so clipping there costs no read-modify-write of the fp32 gradients (for the Ring-mini slice
    of bench_train: 19 GB of traffic, ~10 ms a step); otherwise `clip_grad_norm_` (under FSDP: the global norm)."""
    if opt.defaults.get("fused"):
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
        opt.grad_scale = torch.clamp((gnorm + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
        try:
            opt.step()
        finally:
            opt.grad_scale = None
        return gnorm
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):
        gnorm = gnorm.full_tensor()
    opt.step()
    return gnorm


def apply_activation_checkpointing(model: RingLinearForCausalLM) -> None:
    """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant). Routers count their
    tokens twice (forward + recompute): the balancing update and load ratios only use relative loads."""
    for mod in model.modules():
        if isinstance(mod, DecoderLayer):
            fwd = type(mod).forward
            mod.forward = functools.partial(lambda f, m, x, ctx: checkpoint(f, m, x, ctx, use_reentrant=False), fwd, mod)


def flops_per_token(config: RingLinearConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (activated non-embedding params + lm_head) + attention: causal softmax
    6*2*H*D*T/2 per softmax layer (QK^T and PV, average context T/2), linear 6*2*H*D*D per linear layer
    (state update k^T v and readout q S)."""
    from ringlinear.accounting import model_stats

    s = model_stats(config)
    dense = 6 * (s.active_params + config.hidden_size * config.vocab_size)
    H, D = config.num_attention_heads, config.head_dim
    n_soft = config.layer_types.count("softmax")
    n_lin = config.layer_types.count("linear")
    return dense + n_soft * 6 * 2 * H * D * seq_len / 2 + n_lin * 6 * 2 * H * D * D


def _default_peak(device: torch.device) -> float | None:
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        return 989e12
    return None


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: PackedDataset | None = None):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            # Process-wide: bit-for-bit resume needs run-to-run identical kernels (CUDA also needs the
            # cuBLAS workspace setting before its first GEMM).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if cfg.compute_dtype == "auto":
            self.compute_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.compute_dtype]
        self.model_config, model, self.tokenizer = self._build_model()
        if cfg.fp8:
            from ringlinear.train.fp8_recipe import apply_fp8_recipe

            # raises on a device without FP8 GEMMs; FP8 weight copies reused across micro-batches (not under FSDP)
            apply_fp8_recipe(model, experts=cfg.fp8_experts, cache_weights=self.world == 1,
                             grouped_gemm=cfg.fp8_grouped_gemm)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.world > 1:
            model = apply_fsdp(model, self.compute_dtype)
            self.master = MasterWeights(list(model.parameters()))  # fp32 shards are the masters
        else:
            if self.compute_dtype != torch.float32:
                self._cast_params(model)
            # after the cast: low-precision parameters get fp32 masters, fp32 ones (routers) are their own
            self.master = MasterWeights(list(model.parameters()))
        self.model = model
        self.optimizer = make_adamw(self.master, cfg.lr, cfg.betas, cfg.weight_decay, self.device, self.world > 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps,
                                              min_ratio=cfg.min_lr_ratio))
        eos = self.model_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self.data = dataset or PackedDataset.from_files(cfg.data, self.tokenizer, eos, cfg.seq_len, seed=cfg.seed,
                                                        shuffle=cfg.shuffle, separator=cfg.doc_separator)
        self.step = 0
        self.history: list[dict] = []
        self.flops_per_token = flops_per_token(self.model_config, cfg.seq_len)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else _default_peak(self.device)
        if cfg.resume:
            path = ckpt.latest_checkpoint(cfg.save_dir)
            if path is not None:
                self.load(path)

    # ---- setup ----------------------------------------------------------------------------------
    def _build_model(self):
        from ringlinear.tokenizer import byte_level_tokenizer, load_tokenizer

        cfg = self.cfg
        if cfg.model in PRESETS:
            mcfg = preset(cfg.model, **cfg.model_overrides)
            if cfg.tokenizer:
                tok = load_tokenizer(cfg.tokenizer)
            else:
                tok = byte_level_tokenizer()
                if tok.get_vocab_size() > mcfg.vocab_size:
                    raise ValueError(f"preset {cfg.model} has vocab {mcfg.vocab_size}: give `tokenizer` (a directory "
                                     "with tokenizer.json) whose vocabulary fits")
                mcfg = mcfg.replace(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
            # fp32 init on the CPU with the run's seed: the same weights on every rank and device.
            model = init_model(mcfg, seed=cfg.seed, device="cpu", dtype="float32", embedding_std=cfg.embedding_init_std)
        else:
            if cfg.model_overrides or cfg.embedding_init_std is not None:
                raise ValueError("model_overrides and embedding_init_std only apply to presets (a checkpoint brings "
                                 "its weights and config.json)")
            model = load_model(cfg.model, device="cpu", dtype="float32")
            mcfg = model.config
            tok = load_tokenizer(cfg.tokenizer or cfg.model)
        if tok.get_vocab_size() > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is {mcfg.vocab_size}")
        model.to(self.device)
        model.train()
        return mcfg, model, tok

    def _cast_params(self, model: nn.Module) -> None:
        routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in routers:
                p.data = p.data.to(self.compute_dtype)

    def fingerprint(self) -> dict:
        names = ";".join(f"{n}:{tuple(p.shape)}" for n, p in self.model.named_parameters())
        return {
            "model_config": hashlib.sha256(json.dumps(self.model_config.to_dict(), sort_keys=True).encode()).hexdigest(),
            "parameters": hashlib.sha256(names.encode()).hexdigest(),
            "world_size": self.world, "seq_len": self.cfg.seq_len, "micro_batch": self.cfg.micro_batch,
            "grad_accum": self.cfg.grad_accum, "compute_dtype": str(self.compute_dtype), "fp8": self.cfg.fp8,
            "data_rows": self.data.num_rows,
        }

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        rows = self.data.next_row_ids(cfg.micro_batch * cfg.grad_accum * self.world)
        t0 = time.perf_counter()
        # Micro-batch j of rank r: chunk r*accum + j of the global step (1 rank x accum 2 == 2 ranks x 1).
        mbs = []
        for j in range(cfg.grad_accum):
            c = self.rank * cfg.grad_accum + j
            mb = rows[c * cfg.micro_batch:(c + 1) * cfg.micro_batch]
            ids, cu = self.data.batch(mb)
            labels = self.data.labels(mb, cu)
            # targets trained in this micro-batch: every token but each sequence's last, less the masked ones
            n = ids.numel() - (cu.numel() - 1) if labels is None else int((labels != IGNORE_INDEX).sum())
            mbs.append((ids, cu, labels, n))
        # The step's loss is the mean over all its targets (every micro-batch, every rank), not the mean of the
        # micro-batches' means: under a loss mask their target counts differ, and a micro-batch with none (a long
        # masked prompt) adds nothing instead of NaN. FSDP averages gradients over ranks, hence the `world`.
        targets = torch.tensor(float(sum(m[3] for m in mbs)), device=self.device)
        if self.world > 1:
            dist.all_reduce(targets)
        denom = targets.clamp(min=1)
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        for ids, cu, labels, n in mbs:
            out = self.model.loss(ids.to(self.device), cu.to(self.device),
                                  labels=None if labels is None else labels.to(self.device))
            w = n * self.world / denom  # exactly 1 for one micro-batch on one process
            if not n:  # a mean over no targets is NaN: count it as 0 (the backward still runs: FSDP's collectives)
                out = {k: v.nan_to_num(0.0) for k, v in out.items()}
            (out["loss"] * w).backward()
            self.master.accumulate_grads()
            for k in sums:  # summed on the device: no wait for the GPU between micro-batches
                if k in out:
                    sums[k] = sums[k] + out[k].detach().float() * w
        gnorm = clip_and_step(self.optimizer, self.master.params, cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.master.copy_to_model()
        invalidate_fp8_weights(self.model)
        moe = update_expert_bias(self.model, self.model_config.moe_router_bias_update_rate)
        t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device)
                         for k in ("loss", "lm_loss", "mtp_loss")])
        if self.world > 1:
            dist.all_reduce(t)
            t = t / self.world
        sums = dict(zip(("loss", "lm_loss", "mtp_loss"), t.tolist()))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = len(rows) * cfg.seq_len
        rec = {"step": self.step, **sums, "targets": int(targets.item()), "lr": lr, "grad_norm": float(gnorm),
               "tokens_per_s": tokens / dt, **moe}
        if self.peak:
            rec["mfu"] = self.flops_per_token * tokens / dt / self.peak
        self.history.append(rec)
        return rec

    # ---- checkpoints ----------------------------------------------------------------------------
    def _full_states(self) -> tuple[dict, dict]:
        if self.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=opts), get_optimizer_state_dict(
                self.model, self.optimizer, options=opts)
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> str | None:
        model_sd, optim_sd = self._full_states()
        path = None
        if self.rank == 0:
            state = {
                "step": self.step, "model": model_sd, "optimizer": optim_sd,
                "master": [m.detach().cpu() if m is not p else None for p, m in self.master.pairs],
                "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                "rng": ckpt.rng_state(), "history": self.history, "train_config": dataclasses.asdict(self.cfg),
            }
            path = ckpt.save_checkpoint(self.cfg.save_dir, self.step, state, self.fingerprint(),
                                        keep=self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, path: str) -> None:
        state = ckpt.load_checkpoint(path, self.fingerprint())
        if self.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(state["model"])
            with torch.no_grad():
                missing = 0
                for (p, m), saved in zip(self.master.pairs, state["master"]):
                    if m is not p:
                        if saved is None:  # written before 2026-11-24, when bf16 weights were their own masters
                            missing += 1
                            m.copy_(p.detach().float())
                        else:
                            m.copy_(saved)
                if missing:
                    import warnings

                    warnings.warn(f"resume: the checkpoint has no fp32 masters for {missing} bf16 parameters (saved by "
                                  "a trainer that stepped bf16 weights); their masters start from the bf16 weights",
                                  stacklevel=2)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]

    def export(self, path: str) -> None:
        """The trained model in the HF layout (`export_dtype`, router fp32) + tokenizer files."""
        from ringlinear.tokenizer import tokenizer_files

        model_sd, _ = self._full_states() if self.world > 1 else (self.model.state_dict(), None)
        if self.rank == 0:
            out = build_model(self.model_config, "cpu", self.cfg.export_dtype)
            out.load_state_dict({k: v.detach().cpu() for k, v in model_sd.items()})
            save_model(out, path, extra_files=tokenizer_files(self.tokenizer))
        if self.world > 1:
            dist.barrier()

    # ---- loop -----------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to `cfg.steps` (checkpoint every `save_every`, final checkpoint, export, plot). `stop_after`
        returns right after that step, without the end-of-run work, as a crash there would."""
        cfg = self.cfg
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        while self.step < cfg.steps:
            rec = self.train_step()
            if bar is not None:
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                if "mfu" in rec:
                    post["mfu"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(post)
                bar.update(1)
            if cfg.save_dir and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                return self.history
        if bar is not None:
            bar.close()
        if cfg.save_dir:
            self.save()
            if cfg.export:
                self.export(os.path.join(cfg.save_dir, "final"))
            if self.rank == 0:
                with open(os.path.join(cfg.save_dir, "history.json"), "w") as f:
                    json.dump(self.history, f)
                if cfg.plot:
                    plot_losses({"train": self.history}, os.path.join(cfg.save_dir, "loss.png"))
        return self.history


def plot_losses(runs: dict[str, list[dict]], path: str, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in runs.items():
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
