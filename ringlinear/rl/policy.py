"""The policy update of RL: GRPO advantages, PPO-clipped loss against the rollout logprobs (`losses.py`),
gradient accumulation over the same packs the engine scored, AdamW on fp32 master weights, aux-loss-free
MoE balancing (`ringlinear.train`), and the train/inference mismatch metrics of every step.

Which logprobs play "old" (the PPO ratio's denominator) and "rollout" (the sampler's, for importance sampling):
- aligned, `old_logprobs="rollout"`: both are the sampler's own logprobs; no scoring pass, no recompute, no TIS.
  Under `aligned_numerics="all"` the engine computes each token as the trainer does (docs/architecture.md, "RL
  alignment"), so at the rollout weights the trainer's logp equals them bit for bit and the first ratio is 1.
- aligned, `old_logprobs="scoring"`: old is the engine's scoring pass (`RolloutBatch.scoring_logprobs`), taken on
  the engine's own copy of the weights with the trainer's kernels, dtypes and packs (bit-equal to the trainer at
  the rollout weights); the sampler's logprobs still differ from it unless aligned_numerics is "all", so TIS
  (w = p_old / p_sampler) corrects for that.
- off: the trainer recomputes `old` on its own path (e.g. the PyTorch reference) before updating, and
  `rollout` is what the engine's sampler reported; truncated or masked importance sampling (w = p_old /
  p_rollout) corrects the gap, as verl/slime/AReaL do.
"""

from __future__ import annotations

import copy
import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from ringlinear.device import cast_for_compute
from ringlinear.layers.attention_context import PackedContext
from ringlinear.layers.moe import Router
from ringlinear.model import IGNORE_INDEX
from ringlinear.ops.backend import use_backend
from ringlinear.ops.batch_invariant import aligned_numerics
from ringlinear.rl.losses import PolicyLossConfig, group_advantages, mismatch_metrics, policy_loss
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import RolloutBatch
from ringlinear.rl.scoring import completion_logprobs, pack_completions
from ringlinear.train.balancing import update_expert_bias
from ringlinear.train.optim import MasterWeights, clip_and_step, lr_lambda, make_adamw


class PolicyTrainer:
    """Holds the policy (`model`, in the compute dtype), its fp32 masters and optimizer, and the frozen
    reference when `kl_coef > 0`."""

    def __init__(self, model: nn.Module, cfg: RLConfig, compute_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.rollout_is_old = cfg.aligned and cfg.old_logprobs == "rollout"
        self.device = next(model.parameters()).device
        if compute_dtype != torch.float32:
            cast_for_compute(model, compute_dtype)
        # after the cast: low-precision parameters get fp32 masters, fp32 ones are their own
        self.master = MasterWeights(list(model.parameters()))
        model.train()
        self.model = model
        self.optimizer = make_adamw(self.master, cfg.lr, cfg.betas, cfg.weight_decay, self.device, distributed=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=1.0))
        self.ref = None
        if cfg.kl_coef > 0:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.loss_cfg = PolicyLossConfig(
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, normalization=cfg.normalization,
            tis_cap=None if self.rollout_is_old or cfg.tis_mode is None else cfg.tis_cap, tis_mode=cfg.tis_mode or "truncate")
        self.backend = cfg.scoring_backends[0]

    def _packed(self, batch: RolloutBatch, mb: list[int]):
        return pack_completions([batch.prompt_ids[i] for i in mb], [batch.completion_ids[i] for i in mb], self.device)

    @torch.no_grad()
    def recompute(self, batch: RolloutBatch, model: nn.Module | None = None, backend: str | None = "trainer"
                  ) -> list[torch.Tensor]:
        """Per sequence, log p of its completion tokens under `model` (default: the policy) on the trainer's
        path (or the Lightning `backend` given), pack by pack, no grad."""
        model = model or self.model
        out: list[torch.Tensor | None] = [None] * batch.num_seqs
        with use_backend(self.backend if backend == "trainer" else backend), aligned_numerics(self.cfg.aligned_numerics):
            for mb in (mb for minibatch in batch.packs for mb in minibatch):
                lp = completion_logprobs(model, self._packed(batch, mb)).float()
                for j, part in enumerate(lp.split([len(batch.completion_ids[i]) for i in mb])):
                    out[mb[j]] = part
        return out

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One RL step on a rollout batch: `minibatches` optimizer steps per PPO epoch. Returns the step's
        metrics, including the mismatch between the trainer's logp at the rollout weights and the rollout's."""
        cfg, dev = self.cfg, self.device
        t0 = time.perf_counter()
        adv = group_advantages(batch.rewards, batch.group_size, cfg.scale_adv_by_std).to(dev)
        sampling = [x.to(dev) for x in batch.sampling_logprobs]
        scoring = [x.to(dev) for x in batch.scoring_logprobs] if batch.scoring_logprobs else None
        if self.rollout_is_old:
            old = rollout = sampling
            at_rollout: list[torch.Tensor | None] = [None] * batch.num_seqs  # filled by the first forwards
        elif cfg.aligned:
            if scoring is None:
                raise ValueError("aligned mode with old_logprobs 'scoring' needs the engine's scoring logprobs "
                                 "(RolloutWorker.rollout(score=True))")
            old, rollout = scoring, sampling
            at_rollout: list[torch.Tensor | None] = [None] * batch.num_seqs  # filled by the first forwards
        else:
            old, rollout = self.recompute(batch), sampling
            at_rollout = old
        ref = self.recompute(batch, self.ref) if self.ref is not None else None
        sums: dict[str, float] = {}
        n_opt = 0
        for _epoch in range(cfg.ppo_epochs):
            for minibatch in batch.packs:
                seqs = [i for mb in minibatch for i in mb]
                tok_total = sum(len(batch.completion_ids[i]) for i in seqs)
                for mb in minibatch:
                    packed = self._packed(batch, mb)
                    with use_backend(self.backend), aligned_numerics(cfg.aligned_numerics):
                        logp, entropy = completion_logprobs(self.model, packed, with_entropy=True)
                    if n_opt == 0 and cfg.aligned:  # still at the rollout weights
                        for j, part in enumerate(logp.detach().float().split([len(batch.completion_ids[i]) for i in mb])):
                            at_rollout[mb[j]] = part
                    cat = lambda xs: torch.cat([xs[i] for i in mb])  # noqa: B023
                    n_tok = packed.targets.numel()
                    loss, m = policy_loss(
                        logp, cat(old), adv[mb][packed.seq_index], torch.ones(n_tok, device=dev), packed.seq_index,
                        len(mb), self.loss_cfg, logp_ref=cat(ref) if ref is not None else None,
                        logp_rollout=cat(rollout) if self.loss_cfg.tis_cap is not None else None)
                    # micro-batch means -> the minibatch's token (or sequence) mean
                    w = n_tok / tok_total if cfg.normalization == "token" else len(mb) / len(seqs)
                    (loss * w).backward()
                    self.master.accumulate_grads()
                    m.update(loss=float(loss.detach()), entropy=float(entropy.mean()))
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * n_tok
                    sums["_tokens"] = sums.get("_tokens", 0.0) + n_tok
                gnorm = clip_and_step(self.optimizer, self.master.params, cfg.grad_clip)
                self.optimizer.zero_grad(set_to_none=True)
                self.master.copy_to_model()
                n_opt += 1
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gnorm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        moe = update_expert_bias(self.model, cfg.moe_bias_update_rate)
        tokens = sums.pop("_tokens")
        out = {k: (v / n_opt if k == "grad_norm" else v / tokens) for k, v in sums.items()}
        out.update(moe)
        out["lr"] = lr
        # train/inference gap on the tokens the trainer saw at the rollout weights (all of them unless aligned
        # mode with minibatches > 1: then the first minibatch's)
        seen = [i for i in range(batch.num_seqs) if at_rollout[i] is not None]
        train_lp = torch.cat([at_rollout[i] for i in seen])
        ones = torch.ones_like(train_lp)
        pick = lambda xs: torch.cat([xs[i] for i in seen])
        # "mismatch": against what the ratio divides by (aligned) or what sampled (off)
        for name, other in (("mismatch", old if cfg.aligned else rollout), ("sampling", sampling)) + (
                (("scoring", scoring),) if not cfg.aligned and scoring is not None else ()):
            out.update({f"{name}/{k}": v for k, v in mismatch_metrics(train_lp, pick(other), ones).items()})
        out["time/update_s"] = time.perf_counter() - t0
        return out


def sft_warmup(model: nn.Module, task, tokenizer, eos_id: int, steps: int, lr: float, batch: int,
               progress: bool = False) -> list[float]:
    """Supervised warm start on task samples: cross entropy on `answer + EOS` given the prompt, fp32 AdamW.
    Gives a random model the answer format so that sampled rewards are not all zero. Returns the losses."""
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sft warmup", unit="step")
    for _ in it:
        ids, labels, lens = [], [], []
        for s in (task.sample() for _ in range(batch)):
            p = tokenizer.encode(s["prompt"]).ids
            a = tokenizer.encode(s["answer"]).ids + [eos_id]
            seq = p + a
            ids.extend(seq)
            labels.extend([IGNORE_INDEX] * (len(p) - 1) + a + [IGNORE_INDEX])  # label of t = token t + 1
            lens.append(len(seq))
        ids_t = torch.tensor(ids, device=dev)
        logits = model(ids_t, PackedContext.from_lens(lens, dev))
        loss = F.cross_entropy(logits, torch.tensor(labels, device=dev), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    for r in (m for m in model.modules() if isinstance(m, Router)):
        r.tokens_per_expert.zero_()
    return losses
