"""RL benchmark (device H100, `small` preset): training/inference mismatch with alignment on vs off, side
by side on the same rollouts, and the reward curve of a short GRPO run on the arithmetic task.

Each run is an aligned RL run (trainer and engine on the same kernels; PPO clips against the engine's
scoring logprobs). At every step, before the update, the same tokens are also scored by the trainer on the
PyTorch reference path ("off": what a trainer that does not share the engine's kernels sees). Four gaps per
step, each of the trainer's logp against:
  on/scoring   the engine's scoring pass (same kernels, dtype, packs)        -> PPO's ratio in aligned mode
  on/sampling  the engine sampler's logprobs (chunked prefill + decode steps) -> rounding of decode vs prefill
  off/scoring  the engine's scoring pass, trainer on the reference path       -> kernel gap alone
  off/sampling the engine sampler's logprobs, trainer on the reference path   -> what verl/slime/AReaL-style
                                                                                 stacks correct with IS
Runs: `arithmetic` (short prompts; the reward curve) and `retrieval` (long key:value prompts prefilled in
several chunks). Prints a table; writes mismatch.png, reward.png, and --json PATH with every number.
`--quick` runs a tiny model for a few steps on the CPU to check that the script executes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

METRICS = ("mean_abs_logp_diff", "max_abs_logp_diff", "mean_abs_p_diff", "kl")
GAPS = ("on/scoring", "on/sampling", "off/scoring", "off/sampling")


def run_configs(quick: bool, steps: int) -> dict[str, dict]:
    if quick:
        common = dict(model="tiny", steps=steps or 3, prompts_per_step=2, group_size=4, sft_warmup_steps=20,
                      sft_batch=16, sft_lr=2e-3, lr=3e-4, eval_every=2, eval_prompts=8, engine_cpu_cache_gib=0.05)
        return {
            "arithmetic": dict(common, task="arithmetic", task_kwargs={"max_operand": 9, "ops": "+"}, max_tokens=4),
            "retrieval": dict(common, task="retrieval", task_kwargs={"num_pairs": 8}, max_tokens=4,
                              engine_max_num_batched_tokens=32),
        }
    common = dict(model="small", steps=steps or 120, prompts_per_step=32, group_size=8, sft_batch=64, sft_lr=1e-3,
                  lr=2e-4, eval_every=20, eval_prompts=256)
    return {
        # operands up to 20 with + and -: a warm start that is right some of the time, so groups disagree
        "arithmetic": dict(common, task="arithmetic", task_kwargs={"max_operand": 20, "ops": "+-"}, max_tokens=6,
                           sft_warmup_steps=300),
        # ~450-token prompts, engine budget 256 tokens per step: every prompt is prefilled in 2+ chunks; a few
        # steps suffice for the mismatch figures
        "retrieval": dict(common, task="retrieval", task_kwargs={"num_pairs": 64}, max_tokens=16, prompts_per_step=16,
                          engine_max_num_batched_tokens=256, sft_warmup_steps=100, steps=min(steps or 6, 6),
                          eval_every=0),
    }


def run_one(name: str, cfg_dict: dict, out: str, off_backend: str, engine_backend: str | None) -> dict:
    from ringlinear.rl.loop import RLRun
    from ringlinear.rl.losses import mismatch_metrics
    from ringlinear.rl.rl_config import RLConfig

    cfg = RLConfig.from_dict({**cfg_dict, "out_dir": os.path.join(out, name), "engine_backend": engine_backend,
                              "progress": False, "plot": importlib.util.find_spec("matplotlib") is not None})
    t0 = time.perf_counter()
    run = RLRun(cfg)
    t_setup = time.perf_counter() - t0
    for _ in range(cfg.steps):
        batch, rec = run.collect()
        # the trainer on the reference path, at the rollout weights, on the same packs
        ref = torch.cat(run.trainer.recompute(batch, backend=off_backend))
        ones = torch.ones_like(ref)
        for other, lps in (("scoring", batch.scoring_logprobs), ("sampling", batch.sampling_logprobs)):
            m = mismatch_metrics(ref, torch.cat(lps).to(ref.device), ones)
            rec.update({f"off/{other}/{k}": v for k, v in m.items()})
        rec = run.learn(batch, rec)
        for k in METRICS:  # the aligned trainer's gaps, logged by the update
            rec[f"on/scoring/{k}"] = rec[f"mismatch/{k}"]
            rec[f"on/sampling/{k}"] = rec[f"sampling/{k}"]
        print(f"[{name}] step {rec['step']:3d} reward {rec['reward_mean']:.3f}  max|dlogp| on/scoring "
              f"{rec['on/scoring/max_abs_logp_diff']:.2e} on/sampling {rec['on/sampling/max_abs_logp_diff']:.2e} "
              f"off/scoring {rec['off/scoring/max_abs_logp_diff']:.2e} off/sampling "
              f"{rec['off/sampling/max_abs_logp_diff']:.2e}  ({rec['time/step_s']:.2f}s)", flush=True)
    if cfg.eval_every:
        run.evals.append({"step": run.step_idx, "eval_accuracy": run.evaluate()})
    run.save(cfg.out_dir)
    hist = run.history
    k = max(1, len(hist) // 5)
    summary = {
        "setup_s": t_setup, "sft_final_loss": run.sft_losses[-1] if run.sft_losses else None,
        "reward_first": sum(h["reward_mean"] for h in hist[:k]) / k,
        "reward_last": sum(h["reward_mean"] for h in hist[-k:]) / k,
        "evals": run.evals, "step_s": sum(h["time/step_s"] for h in hist) / len(hist),
        "weight_sync_s": sum(h["time/weight_sync_s"] for h in hist) / len(hist),
        "prompt_tokens": sum(len(p) for p in batch.prompt_ids) / batch.num_seqs,
        "engine_max_num_batched_tokens": cfg.engine_max_num_batched_tokens,
    }
    for gap in GAPS:
        summary[gap] = {
            "mean_abs_logp_diff": sum(h[f"{gap}/mean_abs_logp_diff"] for h in hist) / len(hist),
            "max_abs_logp_diff": max(h[f"{gap}/max_abs_logp_diff"] for h in hist),
            "mean_abs_p_diff": sum(h[f"{gap}/mean_abs_p_diff"] for h in hist) / len(hist),
            "kl": sum(h[f"{gap}/kl"] for h in hist) / len(hist),
        }
    return {"config": cfg.to_dict(), "summary": summary, "history": hist}


def plot_mismatch(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(14, 3.6 * len(names)), squeeze=False)
    style = {"on/scoring": ("tab:green", "-"), "on/sampling": ("tab:green", ":"),
             "off/scoring": ("tab:red", "-"), "off/sampling": ("tab:red", ":")}
    for row, name in zip(axes, names):
        hist = results[name]["history"]
        steps = [h["step"] for h in hist]
        for ax, (metric, label) in zip(row, (("mean_abs_p_diff", "mean |p_train - p_rollout|"),
                                             ("max_abs_logp_diff", "max |logp_train - logp_rollout|"),
                                             ("kl", "KL(rollout || train), k3"))):
            series = {gap: [h[f"{gap}/{metric}"] for h in hist] for gap in GAPS}
            for gap, ys in series.items():
                color, ls = style[gap]
                on = gap.startswith("on/")  # drawn wide underneath, so equal curves stay visible
                ax.plot(steps, ys, color=color, ls=ls, lw=4 if on else 1.5, alpha=0.5 if on else 1.0, label=gap)
            positive = [y for ys in series.values() for y in ys if y > 0]
            # exact zeros sit on the axis; the linear band ends a decade below the smallest nonzero gap
            ax.set_yscale("symlog", linthresh=min(positive) / 10 if positive else 1e-12)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_xlabel("RL step")
        row[0].legend(fontsize=8)
    fig.suptitle("train vs rollout logprobs on the same tokens: aligned (green) vs trainer on the reference path "
                 "(red); solid = engine scoring pass, dotted = engine sampler (decode path); 0 plotted at the axis",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict) -> None:
    print(f"\n{'run':11s} {'gap':13s} {'mean|dlogp|':>12s} {'max|dlogp|':>12s} {'mean|dp|':>12s} {'KL':>12s}")
    for name, res in results.items():
        s = res["summary"]
        for gap in GAPS:
            g = s[gap]
            print(f"{name:11s} {gap:13s} {g['mean_abs_logp_diff']:12.3e} {g['max_abs_logp_diff']:12.3e} "
                  f"{g['mean_abs_p_diff']:12.3e} {g['kl']:12.3e}")
    print(f"\n{'run':11s} {'reward first':>12s} {'reward last':>12s} {'eval acc (step: acc)':>40s} {'step s':>8s} "
          f"{'sync ms':>8s}")
    for name, res in results.items():
        s = res["summary"]
        ev = " ".join(f"{e['step']}:{e['eval_accuracy']:.2f}" for e in s["evals"])
        print(f"{name:11s} {s['reward_first']:12.3f} {s['reward_last']:12.3f} {ev:>40s} {s['step_s']:8.2f} "
              f"{1e3 * s['weight_sync_s']:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU check)")
    ap.add_argument("--runs", default="arithmetic,retrieval")
    ap.add_argument("--steps", type=int, default=0, help="RL steps per run (default: 120 arithmetic, 6 retrieval)")
    ap.add_argument("--off-backend", default="torch", help="the trainer's path in the 'off' comparison")
    ap.add_argument("--engine-backend", default=None, help="force the engine's path (default: Triton on CUDA)")
    ap.add_argument("--out", default="runs/bench_rl")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfgs = run_configs(args.quick, args.steps)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {}
    for name in args.runs.split(","):
        results[name] = run_one(name, cfgs[name], args.out, args.off_backend, args.engine_backend)
        if args.json:  # after every run, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"device": dev, "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"\ndevice: {dev}; torch {torch.__version__}")
    print_table(results)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no figures")
        return
    plot_mismatch(results, os.path.join(args.out, "mismatch.png"))
    from ringlinear.plots import plot_rewards

    plot_rewards({n: (r["history"], r["summary"]["evals"]) for n, r in results.items()},
                 os.path.join(args.out, "reward.png"), title="GRPO reward (aligned)")
    print(f"wrote {args.out}/mismatch.png, {args.out}/reward.png")

if __name__ == "__main__":
    main()
