"""Training benchmark (device H100): FP8 vs BF16 step throughput at Ring-mini-linear-2.0 widths (a slice of
layers, 256 experts), MFU of the BF16 step (6 x activated params x tokens + attention), each fused FP8
kernel vs the unfused PyTorch sequence it replaces, and (--curve) an FP8-vs-BF16 loss curve of the
`small` preset. Prints a table; --json PATH writes every number.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import time

import torch


def bench_kernels() -> list[dict]:
    from triton.testing import do_bench

    from ringlinear.ops.fp8 import quantize_transpose_ref, rmsnorm_quantize_ref, swiglu_quantize_ref
    from ringlinear.ops.fp8.kernels import quantize_transpose, rmsnorm_quantize, swiglu_quantize

    M = 16384
    x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
    g, u = torch.randn(2, M, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda")
    cases = [
        ("quantize+transpose [16384,2048]", lambda: quantize_transpose(x), lambda: quantize_transpose_ref(x), x.numel() * 4),
        ("quantize 1x128 [16384,2048]", lambda: quantize_transpose(x, False), lambda: quantize_transpose_ref(x)[:2], x.numel() * 3),
        ("swiglu+quantize [16384,5120]", lambda: swiglu_quantize(g, u), lambda: swiglu_quantize_ref(g, u), g.numel() * 5),
        ("rmsnorm+quantize [16384,2048]", lambda: rmsnorm_quantize(x, w, 1e-6), lambda: rmsnorm_quantize_ref(x, w, 1e-6), x.numel() * 3),
    ]
    rows = []
    for name, fused, ref, nbytes in cases:
        tf = do_bench(fused, warmup=25, rep=100, return_mode="median")
        tr = do_bench(ref, warmup=25, rep=100, return_mode="median")
        rows.append({"kernel": name, "fused_ms": tf, "unfused_ms": tr, "speedup": tr / tf, "fused_GBps": nbytes / tf / 1e6})
    return rows


def _synthetic(rows: int, seq_len: int, vocab: int, seed: int = 0):
    from ringlinear.train.data import PackedDataset

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=g)
    segs = [[seq_len // 2, seq_len - seq_len // 2]] * rows  # two documents per row (varlen path)
    return PackedDataset(tokens, segs, seed=seed)


def bench_step(fp8: bool, layers: int, seq_len: int, micro_batch: int, steps: int) -> dict:
    from ringlinear.train.trainer import TrainConfig, Trainer

    over = {"num_hidden_layers": layers, "first_k_dense_replace": max(1, layers - 2)}
    cfg = TrainConfig.from_dict({"model": "ring-mini-linear-2.0", "model_overrides": over, "data": ["<synthetic>"],
                                 "seq_len": seq_len, "micro_batch": micro_batch, "steps": steps + 3, "fp8": fp8,
                                 "progress": False, "lr": 1e-4, "warmup_steps": 2})
    tr = Trainer(cfg, dataset=_synthetic(256, seq_len, 157184))
    for _ in range(3):
        tr.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        rec = tr.train_step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = seq_len * micro_batch
    out = {"recipe": "fp8" if fp8 else "bf16", "layers": layers, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
           "mfu_vs_989T": tr.flops_per_token * tokens / dt / 989e12, "loss": rec["loss"],
           "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
    del tr
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def loss_curves(steps: int, out_dir: str) -> dict:
    from ringlinear.train.trainer import TrainConfig, Trainer, plot_losses

    files = sorted(glob.glob("ringlinear/**/*.py", recursive=True)) + ["README.md"]
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        for p in files:
            f.write(open(p).read() + "\n\n\n")
    hist = {}
    for fp8 in (False, True):
        cfg = TrainConfig.from_dict({"model": "small", "data": [corpus], "seq_len": 512, "micro_batch": 4,
                                     "steps": steps, "fp8": fp8, "lr": 2e-3, "warmup_steps": 30, "progress": False,
                                     "seed": 0})
        hist["fp8" if fp8 else "bf16"] = Trainer(cfg).fit()
    os.remove(corpus)
    plot_losses(hist, os.path.join(out_dir, "loss_fp8_vs_bf16.png"), "small preset: FP8 vs BF16")
    tail = max(10, steps // 10)
    mean = {k: sum(h["loss"] for h in v[-tail:]) / tail for k, v in hist.items()}
    return {"steps": steps, "tail_steps": tail, "bf16_tail_loss": mean["bf16"], "fp8_tail_loss": mean["fp8"],
            "rel_diff": abs(mean["fp8"] - mean["bf16"]) / mean["bf16"],
            "curves": {k: [h["loss"] for h in v] for k, v in hist.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--curve-steps", type=int, default=0, help="also run the FP8-vs-BF16 loss curves")
    ap.add_argument("--out", default=".")
    ap.add_argument("--json")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name()}
    if args.curve_steps:
        res["curve"] = loss_curves(args.curve_steps, args.out)
        c = res["curve"]
        print(f"loss curve ({c['steps']} steps, mean of last {c['tail_steps']}): bf16 {c['bf16_tail_loss']:.4f} "
              f"fp8 {c['fp8_tail_loss']:.4f} rel diff {c['rel_diff']:.4%}", flush=True)
    res["kernels"] = bench_kernels()
    print(f"{'kernel':34s} {'fused ms':>9s} {'unfused ms':>10s} {'speedup':>8s} {'GB/s':>7s}")
    for r in res["kernels"]:
        print(f"{r['kernel']:34s} {r['fused_ms']:9.3f} {r['unfused_ms']:10.3f} {r['speedup']:8.2f} {r['fused_GBps']:7.0f}", flush=True)
    res["steps"] = []
    for fp8 in (False, True):
        try:
            res["steps"].append(bench_step(fp8, args.layers, args.seq_len, args.micro_batch, args.steps))
        except Exception as e:  # report, do not hide: the table shows which recipe failed and why
            res["steps"].append({"recipe": "fp8" if fp8 else "bf16", "error": repr(e)[:500]})
        print(res["steps"][-1], flush=True)
    ok = [r for r in res["steps"] if "error" not in r]
    print(f"{'recipe':6s} {'layers':>6s} {'step ms':>9s} {'tok/s':>9s} {'MFU(989T)':>9s} {'mem GiB':>8s}")
    for r in ok:
        print(f"{r['recipe']:6s} {r['layers']:6d} {r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} {r['mfu_vs_989T']:9.1%} {r['peak_mem_GiB']:8.1f}")
    if len(ok) == 2:
        res["fp8_speedup"] = ok[0]["step_ms"] / ok[1]["step_ms"]
        print(f"FP8 / BF16 step throughput: {res['fp8_speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
