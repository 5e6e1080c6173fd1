"""The optimizer side of training: fp32 master weights for low-precision parameters, AdamW over them (weight decay
on matrices only), global-norm clipping folded into the fused AdamW, and the learning-rate schedule (linear
warmup, cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


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


def clip_and_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to global norm `max_norm` (<= 0: no clipping), step `opt`, return the norm
    before clipping. A fused AdamW divides every gradient by its `grad_scale` inside its one pass (the hook of
    AMP's GradScaler), so clipping there costs no read-modify-write of the fp32 gradients; otherwise
    `clip_grad_norm_` (under FSDP: the global norm)."""
    if opt.defaults.get("fused"):
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
        opt.grad_scale = torch.clamp((gnorm + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
        try:
            opt.step()
        finally:
            opt.grad_scale = None
        return gnorm
    grads = [p.grad for p in params if p.grad is not None]
    if any(hasattr(g, "to_local") for g in grads):
        gnorm = sharded_grad_norm(grads)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (gnorm + 1e-6), max=1.0)
            torch._foreach_mul_([g.to_local() for g in grads], coef.to(grads[0].device))
    else:
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    opt.step()
    return gnorm


@torch.no_grad()
def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of gradients that are DTensor shards over meshes of all ranks (FSDP's `dp`, the experts'
    `(efsdp, ep)`: each element on exactly one rank): the squares of the local shards summed, one all-reduce.
    `clip_grad_norm_` cannot mix DTensors of different meshes in one norm."""
    from torch.distributed.tensor import Replicate

    local = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        if hasattr(g, "to_local"):
            if any(isinstance(pl, Replicate) for pl in g.placements):
                raise ValueError("sharded_grad_norm: a gradient is replicated over a mesh dimension (it would be "
                                 "counted once per replica)")
            g = g.to_local()
        elif dist.is_initialized() and dist.get_rank() != 0:  # a plain tensor is the same on every rank: count once
            continue
        local += g.float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(local)
    return local.sqrt()


def invalidate_fp8_weights(model: nn.Module) -> None:
    """Drop the FP8 recipe's cached weight quantizations (they are reused across the micro-batches of one step):
    after an optimizer step they are stale. Explicit, so no optimizer's in-place update can be missed."""
    for mod in model.modules():
        cache = mod.__dict__.get("_fp8_cache")
        if cache:
            cache.clear()
