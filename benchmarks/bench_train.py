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

    from ringlinear.ops.fp8 import (
        naive_quantize_transpose,
        naive_rmsnorm_quantize,
        naive_swiglu_quantize,
        quantize_128x128,
        quantize_rowwise,
    )
    from ringlinear.ops.fp8.kernels import (
        quantize_blocks,
        quantize_rows,
        quantize_transpose,
        rmsnorm_quantize,
        swiglu_quantize,
        swiglu_quantize_rows,
    )

    def swiglu_rows_ref(gu):
        gf, uf = gu.float().chunk(2, dim=1)
        return quantize_rowwise(gf * torch.sigmoid(gf) * uf)

    M = 16384
    x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
    g, u = torch.randn(2, M, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda")
    we = torch.randn(256 * 512, 2048, device="cuda", dtype=torch.bfloat16)  # one expert projection of 256
    gu = torch.randn(65536, 1024, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16)
    cases = [
        ("quantize+transpose [16384,2048]", lambda: quantize_transpose(x), lambda: naive_quantize_transpose(x), x.numel() * 4),
        ("quantize 1x128 [16384,2048]", lambda: quantize_transpose(x, False), lambda: naive_quantize_transpose(x)[:2], x.numel() * 3),
        ("swiglu+quantize [16384,5120]", lambda: swiglu_quantize(g, u), lambda: naive_swiglu_quantize(g, u), g.numel() * 5),
        ("rmsnorm+quantize [16384,2048]", lambda: rmsnorm_quantize(x, w, 1e-6), lambda: naive_rmsnorm_quantize(x, w, 1e-6), x.numel() * 3),
        ("rowwise quantize experts [131072,2048]", lambda: quantize_rows(we), lambda: quantize_rowwise(we), we.numel() * 3),
        ("swiglu+rowwise quantize [65536,2x512]", lambda: swiglu_quantize_rows(gu), lambda: swiglu_rows_ref(gu), gu.numel() * 3 // 2),
        ("128x128 quantize+transpose [5120,2048]", lambda: quantize_blocks(wd, True),
         lambda: (lambda q: (q, q[0].t().contiguous()))(quantize_128x128(wd)), wd.numel() * 4),
    ]
    rows = []
    for name, fused, ref, nbytes in cases:
        tf = do_bench(fused, warmup=25, rep=100, return_mode="median")
        tr = do_bench(ref, warmup=25, rep=100, return_mode="median")
        rows.append({"kernel": name, "fused_ms": tf, "unfused_ms": tr, "speedup": tr / tf, "fused_GBps": nbytes / tf / 1e6})
    # forward + backward through autograd: replayed as CUDA graphs, so the GPU time is timed, not the Python
    # launch cost of a few small calls (in a training step that is hidden behind the GPU's queue)
    for name, fused, ref, nbytes in _shared_cases():
        try:
            tf, tr, how = _graph_bench(fused), _graph_bench(ref), "cuda graph"
        except RuntimeError as e:  # a capture failure: say so and time eagerly
            print(f"{name}: CUDA graph capture failed ({str(e)[:120]}); timed eagerly", flush=True)
            tf, tr, how = do_bench(fused, return_mode="median"), do_bench(ref, return_mode="median"), "eager"
        rows.append({"kernel": name, "fused_ms": tf, "unfused_ms": tr, "speedup": tr / tf, "fused_GBps": nbytes / tf / 1e6,
                     "timing": how})
    return rows


def _graph_bench(fn) -> float:
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def _shared_cases() -> list[tuple]:
    """Fused kernels both recipes run (forward + backward, at the step's shapes: 8192 tokens, hidden 2048, top-8)
    vs the PyTorch sequences they replace."""
    from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert
    from ringlinear.ops.moe.naive import naive_moe_combine, naive_moe_dispatch
    from ringlinear.ops.rmsnorm import naive_rmsnorm, rmsnorm
    from ringlinear.ops.swiglu import naive_swiglu, swiglu

    def fwd_bwd(fn, *inputs):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        dy = torch.randn_like(out)
        return lambda: torch.autograd.grad(fn(*leaves), [t for t in leaves if t.requires_grad], dy)

    T, k, H, E = 8192, 8, 2048, 256
    cases = []
    for name, shape, dtype, groups in (("rmsnorm fwd+bwd [8192,2048]", (T, H), torch.bfloat16, 1),
                                       ("qk-norm fwd+bwd [8192x16,128] fp32", (T * 16, 128), torch.float32, 1),
                                       ("group rmsnorm fwd+bwd [8192,2048]/4", (T, H), torch.bfloat16, 4)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w = torch.rand(shape[-1], device="cuda", dtype=dtype)
        cases.append((name, fwd_bwd(lambda a, b, g=groups: rmsnorm(a, b, 1e-6, g), x, w),
                      fwd_bwd(lambda a, b, g=groups: naive_rmsnorm(a, b, 1e-6, g), x, w), x.numel() * x.element_size() * 5))
    idx = torch.rand(T, E, device="cuda").topk(k, dim=1).indices
    order, inv = sort_by_expert(idx)
    ys = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
    wt = torch.rand(T, k, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    cases.append(("moe combine fwd+bwd [8192x8,2048]", fwd_bwd(lambda a, b: moe_combine(a, order, inv, b), ys, wt),
                  fwd_bwd(lambda a, b: naive_moe_combine(a, order, b), ys, wt), ys.numel() * 2 * 3 + x.numel() * 2 * 9))
    for name, M, n_i in (("swiglu fwd+bwd [8192,5120] (dense MLP)", T, 5120), ("swiglu fwd+bwd [65536,512] (experts)", T * k, 512)):
        g, u = torch.randn(2, M, n_i, device="cuda", dtype=torch.bfloat16)
        cases.append((name, fwd_bwd(swiglu, g, u), fwd_bwd(naive_swiglu, g, u), g.numel() * 2 * 7))
    cases.append(("moe dispatch fwd+bwd [8192,2048] x8", fwd_bwd(lambda a: moe_dispatch(a, order, inv, k), x),
                  fwd_bwd(lambda a: naive_moe_dispatch(a, order, k), x), ys.numel() * 2 * 2 + x.numel() * 2 * 2))
    return cases


class _unfused:
    """Within: norms, SwiGLU and the MoE dispatch/combine run the PyTorch references instead of our fused
    kernels, the lm_head's weight gradient is summed over chunks by separate adds instead of in the GEMM, and
    gradient clipping is its own pass instead of the fused AdamW's grad_scale (the `-unfused` recipes: the same
    run's baseline for what these save per step)."""

    def __enter__(self):
        import ringlinear.layers.moe as moe
        import ringlinear.layers.norms as norms
        import ringlinear.ops.cross_entropy.chunked as chunked
        import ringlinear.ops.fp8.linear as fp8_linear
        import ringlinear.ops.moe.experts as experts
        import ringlinear.train.fp8_recipe as recipe
        import ringlinear.train.trainer as trainer
        from ringlinear.ops.moe import combine
        from ringlinear.ops.rmsnorm import naive_rmsnorm
        from ringlinear.ops.swiglu import naive_swiglu, naive_swiglu_backward_into

        def clip_then_step(opt, params, max_norm):
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            opt.step()
            return gnorm

        self.saved = [(norms, "rmsnorm", naive_rmsnorm), (moe, "swiglu", naive_swiglu), (experts, "swiglu", naive_swiglu),
                      (fp8_linear, "swiglu_backward", naive_swiglu_backward_into), (chunked, "_addmm_f32_ok", lambda d: False),
                      (trainer, "clip_and_step", clip_then_step)]
        for mod in (experts, recipe):
            self.saved += [(mod, "moe_dispatch", lambda x, order, inv, k: combine.naive_moe_dispatch(x, order, k)),
                           (mod, "moe_combine", lambda ys, order, inv, w, dt=None: combine.naive_moe_combine(ys, order, w, dt))]
        self.saved = [(m, n, getattr(m, n), new) for m, n, new in self.saved]
        for m, n, _, new in self.saved:
            setattr(m, n, new)

    def __exit__(self, *exc):
        for m, n, old, _ in self.saved:
            setattr(m, n, old)


def bench_grouped() -> list[dict]:
    """Expert GEMMs of one Ring-mini MoE layer (256 experts, 8192 tokens x top-8, tokens spread evenly):
    torch's BF16 grouped GEMM vs its FP8 rowwise-scaled grouped GEMM (what the `fp8` recipe's experts run)."""
    from triton.testing import do_bench

    from ringlinear.ops.fp8.grouped import fused_fp8_grouped_gemm

    E, T, H, inter = 256, 65536, 2048, 512
    offs = torch.arange(T // E, T + 1, T // E, device="cuda", dtype=torch.int32)
    rows = []
    for name, N, K in (("gate+up", 2 * inter, H), ("down", H, inter)):
        a = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(T, device="cuda"), torch.ones(E, N, device="cuda")
        tb = do_bench(lambda a=a, w=w: torch._grouped_mm(a, w.transpose(1, 2), offs=offs), return_mode="median")
        t8 = do_bench(lambda a8=a8, w8=w8, sa=sa, sb=sb: torch._scaled_grouped_mm(
            a8, w8.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16), return_mode="median")
        tt = do_bench(lambda a8=a8, w8=w8, sa=sa, sb=sb: fused_fp8_grouped_gemm(a8, sa, w8, sb, offs),
                      return_mode="median")
        flop = 2 * T * N * K
        rows.append({"gemm": name, "bf16_us": tb * 1e3, "fp8_us": t8 * 1e3, "triton_fp8_us": tt * 1e3,
                     "bf16_TFLOPs": flop / tb / 1e9, "fp8_TFLOPs": flop / t8 / 1e9, "triton_fp8_TFLOPs": flop / tt / 1e9,
                     "fp8_speedup": tb / t8, "triton_fp8_speedup": tb / tt})
    return rows


def _synthetic(rows: int, seq_len: int, vocab: int, seed: int = 0):
    from ringlinear.train.data import PackedDataset

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=g)
    segs = [[seq_len // 2, seq_len - seq_len // 2]] * rows  # two documents per row (varlen path)
    return PackedDataset(tokens, segs, seed=seed)


def bench_step(recipe: str, layers: int, seq_len: int, micro_batch: int, steps: int, accums: list[int],
               profile_dir: str | None = None, label: str | None = None) -> list[dict]:
    """Step time of one trainer (built once per recipe) at each gradient-accumulation count in `accums`: a
    step = `accum` forward+backward micro-batches + one optimizer step, so larger counts weigh the optimizer
    (an fp32 AdamW over every weight of the slice, which data parallelism would shard) as real runs do."""
    if recipe.endswith("-unfused"):
        with _unfused():
            return bench_step(recipe.removesuffix("-unfused"), layers, seq_len, micro_batch, steps, accums,
                              profile_dir, label=recipe)
    from ringlinear.train.trainer import TrainConfig, Trainer

    dense = min(layers - 1, 3)  # the slice: `dense` dense-MLP layers, the rest MoE (256 experts)
    over = {"num_hidden_layers": layers, "first_k_dense_replace": dense}
    cfg = TrainConfig.from_dict({"model": "ring-mini-linear-2.0", "model_overrides": over, "data": ["<synthetic>"],
                                 "seq_len": seq_len, "micro_batch": micro_batch, "steps": 10_000, "fp8": recipe != "bf16",
                                 "fp8_experts": recipe in ("fp8", "fp8-tg"),
                                 "fp8_grouped_gemm": "triton" if recipe == "fp8-tg" else "torch",
                                 "progress": False, "lr": 1e-4, "warmup_steps": 2})
    tr = Trainer(cfg, dataset=_synthetic(256, seq_len, 157184))
    out = []
    for accum in accums:
        tr.cfg.grad_accum = accum
        for _ in range(2):
            tr.train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            rec = tr.train_step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        tokens = seq_len * micro_batch * accum
        out.append({"recipe": label or recipe, "layers": layers, "moe_layers": layers - dense,
                    "grad_accum": accum, "tokens_per_step": tokens, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
                    "mfu_vs_989T": tr.flops_per_token * tokens / dt / 989e12, "loss": rec["loss"],
                    "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30})
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        tr.cfg.grad_accum = 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tr.train_step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        ka = prof.key_averages()
        # kernels only (ops and annotations would count them again); CUPTI's "Command Buffer Full" is no kernel
        kernel_ms = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA
                        and "Command Buffer Full" not in e.key) / 1e3
        with open(os.path.join(profile_dir, f"profile_{label or recipe}.txt"), "w") as f:
            f.write(f"one step, accum 1: wall {wall:.1f} ms (profiled), GPU kernel time {kernel_ms:.1f} ms\n\n")
            f.write(ka.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=80))
            f.write("\n\nops by total device time (children included)\n")
            f.write(ka.table(sort_by="device_time_total", row_limit=45, max_name_column_width=80))
    del tr
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def loss_curves(steps: int, out_dir: str, recipes: list[str]) -> dict:
    """Loss of the `small` preset under each recipe (same seed, data order and init; `bf16-seedN` is BF16 from
    seed N, the gap two BF16 runs show); the gap is the relative difference of the mean loss over the last
    tenth of the steps."""
    from ringlinear.train.trainer import TrainConfig, Trainer, plot_losses

    files = sorted(glob.glob("ringlinear/**/*.py", recursive=True)) + ["README.md"]
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        for p in files:
            f.write(open(p).read() + "\n\n\n")
    hist = {}
    for recipe in ["bf16"] + [r for r in recipes if r != "bf16"]:
        base, _, seed = recipe.partition("-seed")  # "bf16-seed1": the noise floor, BF16 from another seed
        cfg = TrainConfig.from_dict({"model": "small", "data": [corpus], "seq_len": 512, "micro_batch": 4,
                                     "steps": steps, "fp8": base != "bf16", "fp8_experts": base == "fp8",
                                     "lr": 2e-3, "warmup_steps": 30, "progress": False, "seed": int(seed or 0)})
        hist[recipe] = Trainer(cfg).fit()
    os.remove(corpus)
    plot_losses(hist, os.path.join(out_dir, "loss_fp8_vs_bf16.png"), "small preset: FP8 recipes vs BF16")
    tail = max(10, steps // 10)
    mean = {k: sum(h["loss"] for h in v[-tail:]) / tail for k, v in hist.items()}
    return {"steps": steps, "tail_steps": tail, "tail_loss": mean,
            "rel_diff": {k: abs(m - mean["bf16"]) / mean["bf16"] for k, m in mean.items() if k != "bf16"},
            "curves": {k: [h["loss"] for h in v] for k, v in hist.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grad-accum", default="1,4", help="comma-separated gradient-accumulation counts to time")
    ap.add_argument("--recipes", default="bf16,fp8,fp8-dense",
                    help="bf16; fp8 (dense projections + experts, torch's FP8 grouped GEMM); fp8-dense (experts stay "
                         "BF16); fp8-tg (fp8 with our Triton FP8 grouped GEMM for the experts, the trainer's default); "
                         "RECIPE-unfused: RECIPE without this project's step fusions (PyTorch norms, SwiGLU, MoE dispatch/combine; "
                         "separate lm_head-gradient adds and clip pass)")
    ap.add_argument("--profile", action="store_true", help="write a kernel profile of one step per recipe to --out")
    ap.add_argument("--curve-steps", type=int, default=0, help="also run the FP8-vs-BF16 loss curves")
    ap.add_argument("--parts", default="steps,kernels,grouped,curve", help="which parts to run, in this order")
    ap.add_argument("--curve-recipes", default="bf16,fp8,fp8-dense,bf16-seed1",
                    help="recipes of the loss curves; bf16-seedN: BF16 from seed N (the run-to-run noise floor)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--json")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name()}

    def dump() -> None:  # after each part, so a cut-off run keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    for part in args.parts.split(","):
        if part == "steps":
            res["steps"], res["speedup_vs_bf16"] = run_steps(args)
        elif part == "kernels":
            res["kernels"] = bench_kernels()
            print(f"{'kernel':40s} {'fused ms':>9s} {'unfused ms':>10s} {'speedup':>8s} {'GB/s':>7s}")
            for r in res["kernels"]:
                print(f"{r['kernel']:40s} {r['fused_ms']:9.3f} {r['unfused_ms']:10.3f} {r['speedup']:8.2f} "
                      f"{r['fused_GBps']:7.0f}", flush=True)
        elif part == "grouped":
            res["grouped_gemm"] = bench_grouped()
            for r in res["grouped_gemm"]:
                print(f"experts {r['gemm']:8s} bf16 {r['bf16_us']:7.1f} us ({r['bf16_TFLOPs']:4.0f} TFLOP/s)  torch fp8 "
                      f"{r['fp8_us']:7.1f} us ({r['fp8_speedup']:.2f}x)  triton fp8 {r['triton_fp8_us']:7.1f} us "
                      f"({r['triton_fp8_speedup']:.2f}x of bf16 speed)", flush=True)
        elif part == "curve":
            if not args.curve_steps:
                continue
            res["curve"] = c = loss_curves(args.curve_steps, args.out, args.curve_recipes.split(","))
            for k, d in c["rel_diff"].items():
                print(f"loss curve ({c['steps']} steps, mean of last {c['tail_steps']}): bf16 "
                      f"{c['tail_loss']['bf16']:.4f} {k} {c['tail_loss'][k]:.4f} rel diff {d:.4%}", flush=True)
        else:
            raise SystemExit(f"--parts: unknown part {part!r} (allowed: steps, kernels, grouped, curve)")
        dump()


def run_steps(args) -> tuple[list[dict], dict]:
    steps = []
    accums = [int(a) for a in args.grad_accum.split(",")]
    for recipe in args.recipes.split(","):
        try:
            steps += bench_step(recipe, args.layers, args.seq_len, args.micro_batch, args.steps, accums,
                                args.out if args.profile else None)
        except Exception as e:  # report, do not hide: the table shows which recipe failed and why
            steps.append({"recipe": recipe, "error": repr(e)[:500]})
        print(steps[-1], flush=True)
    ok = [r for r in steps if "error" not in r]
    print(f"{'recipe':9s} {'layers':>6s} {'accum':>5s} {'tok/step':>8s} {'step ms':>9s} {'tok/s':>9s} {'MFU(989T)':>9s} "
          f"{'mem GiB':>8s}")
    for r in ok:
        print(f"{r['recipe']:9s} {r['layers']:6d} {r['grad_accum']:5d} {r['tokens_per_step']:8d} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:9.0f} {r['mfu_vs_989T']:9.1%} {r['peak_mem_GiB']:8.1f}")
    speedup = {}
    for a in accums:
        by = {r["recipe"]: r for r in ok if r["grad_accum"] == a}
        for rec in by:
            if rec != "bf16" and "bf16" in by:
                speedup[f"{rec}@accum{a}"] = x = by["bf16"]["step_ms"] / by[rec]["step_ms"]
                print(f"{rec} / bf16 throughput, grad_accum {a}: {x:.2f}x", flush=True)
    return steps, speedup


if __name__ == "__main__":
    main()
