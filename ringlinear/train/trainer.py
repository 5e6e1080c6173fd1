"""Pre-training loop: AdamW on fp32 master weights, linear warmup + cosine decay, global-norm gradient
clipping, gradient accumulation, optional activation checkpointing and FP8, aux-loss-free MoE balancing
after each step, FSDP2 data parallel under torchrun, crash-safe resumable checkpoints, HF export.

Precision (one choice): the optimizer always steps fp32 master weights. Single process on GPU: the model
holds bf16 parameters (router fp32) and `MasterWeights` keeps an fp32 copy (gradients accumulated in fp32
there, updated weights copied back to bf16). Under FSDP2 the sharded fp32 parameters are the masters and
`MixedPrecisionPolicy` casts them to bf16 for compute. On the CPU everything is fp32 (masters = params).
Loss of a step = the mean over all its next-token targets (every micro-batch, every DP rank), so a loss mask
weighs each target equally and a micro-batch without targets adds nothing.
Parts: `train_config.py` (the config), `optim.py` (masters, AdamW, clipping, schedule), `state.py` (checkpoints),
`data.py` (packed rows), `ringlinear.distributed` (FSDP2, activation checkpointing), `fp8_recipe.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings

import torch
import torch.distributed as dist

from ringlinear.accounting import train_flops_per_token
from ringlinear.device import cast_for_compute, compute_dtype, peak_flops
from ringlinear.distributed import apply_activation_checkpointing, apply_fsdp, init_distributed
from ringlinear.hf import save_model
from ringlinear.model import IGNORE_INDEX, build_model
from ringlinear.plots import plot_losses
from ringlinear.pretrained import load_pretrained
from ringlinear.train import state as ckpt
from ringlinear.train.balancing import update_expert_bias
from ringlinear.train.data import PackedDataset
from ringlinear.train.metrics import write_history
from ringlinear.train.optim import MasterWeights, clip_and_step, invalidate_fp8_weights, lr_lambda, make_adamw
from ringlinear.train.train_config import TrainConfig

__all__ = ["TrainConfig", "Trainer"]


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: PackedDataset | None = None):
        cfg.validate()
        self.cfg = cfg
        cfg.check_model(cfg.model_config())  # before any weights or rows exist (a 100000-token row: OOM)
        self.rank, self.world, self.device = init_distributed()
        self._lock = None
        try:
            self._setup(dataset)
        except BaseException:
            self.close()
            raise

    def _setup(self, dataset: PackedDataset | None) -> None:
        cfg = self.cfg
        if cfg.save_dir and self.rank == 0:
            self._lock = ckpt.SaveDirLock(cfg.save_dir)  # held until `fit` ends (or `close`)
            for path in ckpt.remove_interrupted_saves(cfg.save_dir):
                warnings.warn(f"removed {path}: left by a save that was interrupted", stacklevel=3)
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            # Process-wide: bit-for-bit resume needs run-to-run identical kernels (CUDA also needs the
            # cuBLAS workspace setting before its first GEMM).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.compute_dtype = compute_dtype(self.device, cfg.compute_dtype)
        # fp32 init on the CPU with the run's seed: the same weights on every rank and device
        loaded = load_pretrained(cfg.model, overrides=cfg.model_overrides, tokenizer=cfg.tokenizer, seed=cfg.seed,
                                 device="cpu", dtype="float32", embedding_std=cfg.embedding_init_std)
        model, self.tokenizer, self.model_config = loaded.model.to(self.device), loaded.tokenizer, loaded.config
        model.train()
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
            cast_for_compute(model, self.compute_dtype)
            # after the cast: low-precision parameters get fp32 masters, fp32 ones (routers) are their own
            self.master = MasterWeights(list(model.parameters()))
        self.model = model
        self.optimizer = make_adamw(self.master, cfg.lr, cfg.betas, cfg.weight_decay, self.device, self.world > 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps,
                                              min_ratio=cfg.min_lr_ratio))
        self.data = dataset or PackedDataset.from_files(cfg.data, self.tokenizer, loaded.eos_token_id, cfg.seq_len,
                                                        seed=cfg.seed,
                                                        shuffle=cfg.shuffle, separator=cfg.doc_separator)
        self.step = 0
        self.history: list[dict] = []
        self.flops_per_token = train_flops_per_token(self.model_config, cfg.seq_len)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device)
        if cfg.resume:
            path = self._resumable()
            if path is not None:
                self.load(path)

    def close(self) -> None:
        """Release the save directory (`fit` does this when it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _resumable(self) -> str | None:
        """The newest intact checkpoint (rank 0 decides, every rank takes the same); corrupt newer ones are
        skipped with a warning saying why."""
        choice: list = [None]
        if self.rank == 0:
            try:
                path, skipped = ckpt.find_resumable(self.cfg.save_dir, self.fingerprint())
                choice = [(path, skipped, None)]
            except ckpt.TrainCheckpointError as e:
                choice = [(None, [], e)]
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        path, skipped, err = choice[0]
        if err is not None:
            raise err
        if self.rank == 0:
            for bad, why in skipped:
                warnings.warn(f"resume: skipped {bad}: {why}", stacklevel=3)
            if path is not None and skipped:
                warnings.warn(f"resume: using {path}, the newest intact checkpoint", stacklevel=3)
        return path

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
            ckpt.remove_interrupted_saves(self.cfg.save_dir)
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
        state = ckpt.read_state(path) if self.rank == 0 or self.world == 1 else ckpt.load_checkpoint(
            path, self.fingerprint())
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
                        if saved is None:  # written by a trainer that stepped bf16 weights directly (no masters)
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
        try:
            return self._fit(stop_after)
        finally:
            self.close()

    def _fit(self, stop_after: int | None) -> list[dict]:
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
                write_history(os.path.join(cfg.save_dir, "history.json"), self.history)
                if cfg.plot:
                    plot_losses({"train": self.history}, os.path.join(cfg.save_dir, "loss.png"))
        return self.history
