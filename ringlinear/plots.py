"""Plots of training runs (matplotlib, written to PNG): loss curves of one or several runs, and RL reward curves
with their moving average and greedy evaluation accuracy."""

from __future__ import annotations

import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict[str, list[dict]], path: str, title: str = "training loss") -> None:
    plt = _pyplot()
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


def moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_rewards(runs: dict[str, tuple[list[dict], list[dict]]], path: str, title: str = "RL reward") -> None:
    """Per run (step records, eval records): per-step mean sampled reward (thin), its moving average (thick)
    and greedy eval accuracy (markers)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (hist, evals) in runs.items():
        steps, rew = [h["step"] for h in hist], [h["reward_mean"] for h in hist]
        line = ax.plot(steps, rew, lw=0.8, alpha=0.4)[0]
        ax.plot(steps, moving_average(rew, max(1, math.ceil(len(rew) / 10))), lw=2, color=line.get_color(),
                label=f"{name}: sampled reward (moving avg)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_accuracy"] for e in evals], "o--", ms=4, color=line.get_color(), label=f"{name}: greedy eval accuracy")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
