"""Pre-training loop: AdamW on fp32 master weights, linear warmup + cosine decay, global-norm gradient
clipping, gradient accumulation, optional activation checkpointing and FP8, aux-loss-free MoE balancing
after each step, FSDP2 data parallel and expert parallel on a device mesh under torchrun, sharded crash-safe
resumable checkpoints (DCP, async), a streamed HF export, TensorBoard / W&B logging.

Precision (one choice): the optimizer always steps fp32 master weights. Single process on GPU: the model
holds bf16 parameters (router fp32) and `MasterWeights` keeps an fp32 copy (gradients accumulated in fp32
there, updated weights copied back to bf16). Under FSDP2 the sharded fp32 parameters are the masters and
`MixedPrecisionPolicy` casts them to bf16 for compute. On the CPU everything is fp32 (masters = params).
Loss of a step = the mean over all its next-token targets (every micro-batch, every DP rank), so a loss mask
weighs each target equally and a micro-batch without targets adds nothing.
Parts: `train_config.py` (the config), `optim.py` (masters, AdamW, clipping, schedule), `state.py` (checkpoints),
`data.py` (packed rows), `metrics.py` (history, TensorBoard, W&B), `ringlinear.distributed` (mesh, expert
parallel, FSDP2, activation checkpointing), `fp8_recipe.py`.
"""

from __future__ import annotations

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
from ringlinear.distributed import (
    ParallelismConfig,
    apply_activation_checkpointing,
    build_mesh,
    init_distributed,
    parallelize,
)
from ringlinear.hf import save_streamed
from ringlinear.model import IGNORE_INDEX, build_model
from ringlinear.ops.batch_invariant import aligned_numerics
from ringlinear.plots import plot_losses
from ringlinear.pretrained import load_pretrained
from ringlinear.train import state as ckpt
from ringlinear.train.balancing import update_expert_bias
from ringlinear.train.data import PackedDataset
from ringlinear.train.metrics import MetricsLogger, write_history
from ringlinear.train.optim import MasterWeights, clip_and_step, invalidate_fp8_weights, lr_lambda, make_adamw
from ringlinear.train.sources import dataset_for
from ringlinear.train.train_config import TrainConfig

__all__ = ["TrainConfig", "Trainer"]


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: PackedDataset | None = None):
        cfg.validate()
        self.cfg = cfg
        cfg.check_model(cfg.model_config())  # before any weights or rows exist (a 100000-token row: OOM)
        self.rank, self.world, self.device = init_distributed()
        self._lock = self.checkpointer = self.metrics = None
        try:
            self._setup(dataset)
        except BaseException:
            self.close()
            raise

    def _setup(self, dataset: PackedDataset | None) -> None:
        cfg = self.cfg
        self.parallel = ParallelismConfig.from_dict(cfg.parallelism)
        self.parallel.resolve(self.world)  # degrees that do not tile the ranks: refused before any work
        if cfg.save_dir and self.rank == 0:
            self._lock = ckpt.SaveDirLock(cfg.save_dir)  # held until `fit` ends (or `close`)
            for path in ckpt.remove_interrupted_saves(cfg.save_dir):
                warnings.warn(f"removed {path}: left by a save that was interrupted", stacklevel=3)
        # the name every rank gives this run's temp checkpoint directories; a gloo group for the checkpoint thread
        tag = [f"{os.getpid()}-{os.urandom(4).hex()}"]
        self.ckpt_group = None
        if self.world > 1:
            dist.broadcast_object_list(tag, src=0)
            self.ckpt_group = dist.new_group(backend="gloo")
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            # Process-wide: bit-for-bit resume needs run-to-run identical kernels (CUDA also needs the
            # cuBLAS workspace setting before its first GEMM).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.compute_dtype = compute_dtype(self.device, cfg.compute_dtype)
        # fp32 init with the run's seed, on the CPU (the same weights on every rank and device) unless asked on the
        # device (`init_device`: the same on every rank of one kind of GPU)
        init = self.device if cfg.init_device == "device" else torch.device("cpu")
        loaded = load_pretrained(cfg.model, overrides=cfg.model_overrides, tokenizer=cfg.tokenizer, seed=cfg.seed,
                                 device=init, dtype="float32", embedding_std=cfg.embedding_init_std, init_device=init)
        model, self.tokenizer, self.model_config = loaded.model.to(self.device), loaded.tokenizer, loaded.config
        model.train()
        if cfg.fp8 and cfg.fp8_experts and self.parallel.ep > 1:
            raise ValueError("train config: fp8 with fp8_experts under expert parallelism (parallelism ep > 1) is not "
                             "supported yet: set fp8_experts=false (FP8 for the dense projections only) or ep=1")
        if cfg.fp8:
            from ringlinear.train.fp8_recipe import apply_fp8_recipe

            # raises on a device without FP8 GEMMs; FP8 weight copies reused across micro-batches (not under FSDP)
            apply_fp8_recipe(model, experts=cfg.fp8_experts, cache_weights=self.world == 1,
                             grouped_gemm=cfg.fp8_grouped_gemm)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.world > 1:
            self.mesh = build_mesh(self.parallel, self.world, self.device.type)
            model = parallelize(model, self.mesh, self.compute_dtype)
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
        self.data = dataset or dataset_for(cfg, self.tokenizer, loaded.eos_token_id)
        self.step = 0
        self.history: list[dict] = []
        self.flops_per_token = train_flops_per_token(self.model_config, cfg.seq_len)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device)
        if cfg.save_dir:
            self.checkpointer = ckpt.Checkpointer(cfg.save_dir, self.rank, self.world, cfg.keep_checkpoints,
                                                  cfg.async_save, self.ckpt_group, tag[0])
        if self.rank == 0:
            self.metrics = MetricsLogger(cfg.save_dir, cfg.tensorboard, cfg.wandb_project, cfg.to_dict())
        if cfg.resume:
            path = self._resumable()
            if path is not None:
                self.load(path)

    def close(self) -> None:
        """Finish the checkpoint in flight, close the logs, release the save directory (`fit` does this when it
        ends)."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
                self.checkpointer = None
        finally:
            data = getattr(self, "data", None)
            if data is not None and hasattr(data, "close"):
                data.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
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
            # the global batch, not how it is split over ranks and micro-batches: a checkpoint of 2 ranks x 1
            # micro-batch resumes on 1 rank x 2 (any world size, any EP degree: DCP reshards)
            "rows_per_step": self.cfg.micro_batch * self.cfg.grad_accum * self.world, "seq_len": self.cfg.seq_len,
            "compute_dtype": str(self.compute_dtype), "fp8": self.cfg.fp8,
            "data": getattr(self.data, "identity", f"rows:{self.data.num_rows}"),
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
        # masked prompt) adds nothing instead of NaN. FSDP sums gradients over ranks (divide factor 1), so each
        # rank's share is its targets over the global count.
        targets = torch.tensor(float(sum(m[3] for m in mbs)), device=self.device)
        if self.world > 1:
            dist.all_reduce(targets)
        denom = targets.clamp(min=1)
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        for ids, cu, labels, n in mbs:
            with aligned_numerics(self.cfg.aligned_numerics):  # the forward's numerics (RL alignment switches)
                out = self.model.loss(ids.to(self.device), cu.to(self.device),
                                      labels=None if labels is None else labels.to(self.device))
            w = n / denom  # exactly 1 for one micro-batch on one process
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
            dist.all_reduce(t)  # the shares sum to the global mean
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
        if self.metrics is not None:
            self.metrics.log(rec)
        return rec

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint this step (every rank writes its shards; rank 0 the plain state): started now, on disk when
        `checkpointer.wait()` returns (at once without `async_save`)."""
        tensors = ckpt.checkpoint_tensors(self.model, self.master.pairs, self.optimizer)
        meta = {"step": self.step, "optimizer_states": sorted(tensors["optim"]),
                "param_groups": ckpt.optimizer_groups(self.optimizer), "scheduler": self.scheduler.state_dict(),
                "data": self.data.state_dict(), "rng": ckpt.rng_state(), "history": self.history,
                "train_config": self.cfg.to_dict(), "world_size": self.world, "parallelism": self.cfg.parallelism}
        self.checkpointer.save(self.step, tensors, meta, self.fingerprint())

    def load(self, path: str) -> None:
        """Resume from checkpoint `path` (verified by `_resumable`), whatever world size and EP degree wrote it."""
        meta = ckpt.read_meta(path)
        ckpt.allocate_optimizer_state(self.model, self.master.pairs, self.optimizer, meta["optimizer_states"])
        ckpt.load_tensors(path, ckpt.checkpoint_tensors(self.model, self.master.pairs, self.optimizer),
                          self.ckpt_group)
        self.master.copy_to_model()
        ckpt.set_optimizer_groups(self.optimizer, meta["param_groups"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.data.load_state_dict(meta["data"])
        ckpt.set_rng_state(meta["rng"])
        self.step, self.history = meta["step"], meta["history"]

    def _export_tensors(self):
        """(name, full tensor in its export dtype) for every tensor of the HF checkpoint, one at a time: each
        sharded one gathered when it is asked for (a collective: every rank iterates in the same order)."""
        want = {k: v.dtype for k, v in build_model(self.model_config, "meta", self.cfg.export_dtype).state_dict().items()}
        masters = dict(ckpt.named_masters(self.model, self.master.pairs))
        tensors = {**dict(self.model.named_buffers()), **masters}
        for name, dtype in want.items():
            t = tensors[name]
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            # only rank 0 writes: the others take part in the gather and drop it
            yield name, full.detach().to("cpu", dtype) if self.rank == 0 else None

    def export(self, path: str) -> None:
        """The trained model in the HF layout (`export_dtype`, router fp32) + tokenizer files, streamed: tensors
        are gathered one at a time and rank 0 writes each shard file as it fills (no rank holds the model)."""
        from ringlinear.tokenizer import tokenizer_files

        if self.rank == 0:
            config = self.model_config.replace(torch_dtype=self.cfg.export_dtype)
            save_streamed(config, self._export_tensors(), path, extra_files=tokenizer_files(self.tokenizer))
        else:
            for _ in self._export_tensors():  # take part in each gather
                pass
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
            self.checkpointer.wait()
            if cfg.export:
                self.export(os.path.join(cfg.save_dir, "final"))
            if self.rank == 0:
                write_history(os.path.join(cfg.save_dir, "history.json"), self.history)
                if cfg.plot:
                    plot_losses({"train": self.history}, os.path.join(cfg.save_dir, "loss.png"))
        return self.history
