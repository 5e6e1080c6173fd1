"""Policy-gradient losses for RL on rollouts: GRPO group-normalised advantages, the PPO clipped objective
against the rollout logprobs, optional KL to a reference (k3 estimator), token- or sequence-level
normalisation, and truncated (or masked) importance sampling for when trainer and engine disagree.

PPO: L = -E[min(r A, clip(r, 1-eps_lo, 1+eps_hi) A)], r = exp(logp - logp_old)   (Schulman et al. 2017)
GRPO: A_i = (R_i - mean(R_group)) / (std(R_group) + eps)                         (Shao et al. 2024)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards: [G * group_size] (groups contiguous) -> advantages of the same shape."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


@dataclass
class PolicyLossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    normalization: str = "token"  # "token": mean over all response tokens; "sequence": mean of per-sequence means
    tis_cap: float | None = None  # importance-sampling cap on w = p_old/p_rollout (alignment off); None = off
    tis_mode: str = "truncate"  # "truncate": weight min(w, cap); "mask": drop tokens with w outside [1/cap, cap]

    def __post_init__(self) -> None:
        if self.normalization not in ("token", "sequence"):
            raise ValueError(f"normalization={self.normalization!r}: use 'token' or 'sequence'")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("clip_low and clip_high must be >= 0")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap={self.tis_cap}: must be > 0")
        if self.tis_mode not in ("truncate", "mask"):
            raise ValueError(f"tis_mode={self.tis_mode!r}: use 'truncate' or 'mask'")


def _reduce(x: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, how: str) -> torch.Tensor:
    if how == "token":
        return (x * mask).sum() / mask.sum().clamp_min(1)
    per_seq = torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(0, seq_index, x * mask)
    counts = torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(0, seq_index, mask)
    return (per_seq / counts.clamp_min(1)).mean()


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    cfg: PolicyLossConfig,
    logp_ref: torch.Tensor | None = None,
    logp_rollout: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token tensors [T]: `logp` (trainer, differentiable), `logp_old` (the policy that sampled: in aligned
    mode the rollout's own logprobs), `advantages` (broadcast per sequence), `mask` (1 on response tokens),
    `seq_index` (sequence of each token). `logp_rollout` + `cfg.tis_cap` weight tokens by
    min(p_old / p_rollout, cap) ("truncate") or drop tokens whose ratio leaves [1/cap, cap] ("mask") when the
    trainer's old logprobs differ from the engine's (the dropped tokens still count in the normalisation)."""
    mask = mask.float()
    ratio = torch.exp(logp - logp_old.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    per_tok = -torch.minimum(unclipped, clipped)
    # tokens where the clipped term wins the min: their gradient is cut
    metrics = {"clip_frac": float(((clipped < unclipped).float() * mask).sum() / mask.sum().clamp_min(1))}
    if cfg.tis_cap is not None and logp_rollout is not None:
        w = torch.exp(logp_old.detach() - logp_rollout.detach())
        if cfg.tis_mode == "truncate":
            per_tok = per_tok * w.clamp(max=cfg.tis_cap)
            metrics["tis_clip_frac"] = float(((w > cfg.tis_cap).float() * mask).sum() / mask.sum().clamp_min(1))
        else:
            keep = ((w >= 1 / cfg.tis_cap) & (w <= cfg.tis_cap)).float()
            per_tok = per_tok * keep
            metrics["tis_mask_frac"] = float(((1 - keep) * mask).sum() / mask.sum().clamp_min(1))
    if cfg.kl_coef > 0:
        if logp_ref is None:
            raise ValueError("kl_coef > 0 needs logp_ref (the reference policy's logprobs)")
        d = logp_ref.detach() - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative
        per_tok = per_tok + cfg.kl_coef * kl
        metrics["kl_ref"] = float(_reduce(kl.detach(), mask, seq_index, num_seqs, "token"))
    loss = _reduce(per_tok, mask, seq_index, num_seqs, cfg.normalization)
    return loss, metrics


def mismatch_metrics(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Training/inference disagreement on the same sampled tokens: mean/max |dlogp|, mean |dp|, and
    KL(rollout || train) estimated on the sampled tokens (k3)."""
    m = mask.bool()
    # fp64 so that tiny gaps are not rounded away (k3 = expm1(d) - d >= 0, not the cancelling e^d - 1 - d)
    a, b = logp_train.detach().double()[m], logp_rollout.detach().double()[m]
    if a.numel() == 0:
        return {"mean_abs_logp_diff": 0.0, "max_abs_logp_diff": 0.0, "mean_abs_p_diff": 0.0, "kl": 0.0}
    d = a - b
    return {
        "mean_abs_logp_diff": float(d.abs().mean()),
        "max_abs_logp_diff": float(d.abs().max()),
        "mean_abs_p_diff": float((a.exp() - b.exp()).abs().mean()),
        "kl": float((torch.expm1(d) - d).mean()),
    }
