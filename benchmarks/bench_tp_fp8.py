"""Serving Ring-flash-linear-2.0 and Ring-mini-linear-2.0 with FP8 weights and over several GPUs (issue 21).
Random weights are made on each GPU by the engine itself (`load_format="dummy"`, no checkpoint, no CPU init).

    --mode flash-fp8   Ring-flash shape, FP8 weights, one GPU (98 GiB of weights: fits an H200): prefill tok/s,
                       decode tok/s at B=8 and at the largest batch the cache admits, contexts 4K/32K/64K, and
                       decode step / byte floor (the FP8 bytes a step must read over the copy bandwidth; goal <= 1.6x)
    --mode mini-fp8    Ring-mini, bf16 vs FP8 weights on one GPU: decode step time at B=8 and B=64 (goal: bf16 /
                       FP8 >= 1.5x), and prefill tok/s of each
    --mode logprob     log-probability difference FP8 vs bf16 on a trained checkpoint (--checkpoint DIR, or the
                       `small` preset trained here for ~2 minutes with `ringlinear train` on the pydoc corpus)
    --mode tp2         two GPUs (issue 28): Ring-flash bf16 over TP=2 at 4K/32K/64K (prefill tok/s, decode tok/s at
                       B=8 and at the largest batch, decode step / floor where the floor is one rank's bytes over the
                       copy bandwidth plus the step's all-reduces and logits gather, each timed at its size on the
                       two GPUs; goal <= 1.6x); Ring-mini TP=1 vs TP=2 at B=64, context 32K (goal >= 1.6x) and
                       whether both give the same greedy tokens (dummy weights are the same model on any TP degree)
    --mode gemm        the decode GEMMs alone at Ring-flash / Ring-mini shapes, M = 1, 8, 64: bf16 F.linear vs the
                       W8A8 Triton GEMM (+ its activation quantize) under a CUDA graph, weight GB/s, and a sweep of
                       the W8A8 tiles (set the best as W8A8Config's defaults); the FP8 fused MoE vs bf16
    --quick            a short GPU run (fewer decode steps, fewer greedy tokens)
    --smoke            a CPU smoke run of every mode on the tiny preset (TP over 2 gloo processes)

    python benchmarks/bench_tp_fp8.py --mode flash-fp8 --json flash_fp8.json      (one H200)
    python benchmarks/bench_tp_fp8.py --mode tp2 --mode flash-fp8 --json tp2.json (2 GPUs; FP8 one-GPU figures beside)

Each mode prints a table and, with --json, writes its rows (after every measurement, so a cut-short run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import copy_bandwidth, fill_running, max_batch, prefill_tps, sync  # noqa: E402

from ringlinear.engine.llm import EngineConfig, LLMEngine  # noqa: E402
from ringlinear.layers.moe import MoE  # noqa: E402


def engine(model: str, args, **kw) -> LLMEngine:
    cfg = dict(model=model, load_format="dummy", max_num_seqs=args.max_batch, max_num_batched_tokens=args.chunk,
               gpu_memory_utilization=args.mem, cpu_cache_gib=args.cpu_cache_gib, verbose=True)
    if args.smoke:
        cfg.update(device="cpu", max_model_len=2048)
    cfg.update(kw)
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(**cfg))
    print(f"[bench] engine up in {time.perf_counter() - t0:.1f} s", flush=True)
    return eng


def close(eng: LLMEngine) -> None:
    eng.shutdown()
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def floor_bytes(eng: LLMEngine, B: int, C: int) -> float:
    """Bytes one rank reads in a decode step of B tokens at context C: its weights as stored (FP8 bytes and block
    scales where FP8), of its experts the share B tokens touch under uniform routing, B embedding rows, its KV of every
    softmax layer and its linear states (read + write). Ranks read in parallel: this over the bandwidth is the floor."""
    model, config = eng.model, eng.config
    expert = emb = 0
    for m in model.modules():
        if isinstance(m, MoE):
            for name, p in list(m.named_parameters(recurse=False)):
                if "_proj" in name:
                    expert += p.numel() * p.element_size()
    w = model.model.word_embeddings.weight
    emb = w.numel() * w.element_size()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    E, k = max(config.num_experts, 1), config.num_experts_per_tok
    touched = 1 - (1 - k / E) ** B if config.num_experts else 0.0
    cache = eng.scheduler.cache
    layout = cache.layout
    return (total - expert - emb + expert * touched + B * w.shape[1] * w.element_size()
            + B * (C * layout.kv_bytes_per_token + 2 * layout.state_bytes_per_slot))


def decode_step(eng: LLMEngine, B: int, C: int, steps: int) -> float:
    """Seconds per decode step of B running sequences holding C tokens (their cache filled at random)."""
    seqs = fill_running(eng, B, C)
    eng.step()  # warm-up
    sync(eng.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(eng.device)
    dt = (time.perf_counter() - t0) / steps
    for s in seqs:
        eng.abort_request(s.request_id)
    eng.step()
    return dt


def measure(name: str, eng: LLMEngine, contexts, batches, args, bw: float, rows: list, prefill: bool = True,
            comm=None) -> None:
    """Prefill tok/s and decode at each context; `comm(B)`: seconds of the collectives of a decode step of B
    tokens (tensor parallel), added to the byte floor."""
    C0 = min(contexts[0], eng.max_model_len - 64)
    prefill_tps(eng, min(C0, args.chunk), eng.device)  # warm-up: compilation, autotuning
    for C in contexts:
        row = {"model": name, "context": C}
        if C + 64 > eng.max_model_len:
            row["skipped"] = f"the cache holds {eng.max_model_len} tokens"
            rows.append(row)
            print(row, flush=True)
            continue
        if prefill:
            row["prefill_tok_s"] = prefill_tps(eng, C, eng.device)
        mb = max_batch(eng, C, args.max_batch)
        for tag in batches:
            B = mb if tag == "max" else min(int(tag), mb)
            dt = decode_step(eng, B, C, args.decode_steps)
            row[f"decode_b{tag}_batch"] = B
            row[f"decode_b{tag}_step_ms"] = dt * 1e3
            row[f"decode_b{tag}_tok_s"] = B / dt
            if bw == bw or comm is not None:  # a GPU (or the smoke run's gloo collectives): the floor
                floor = floor_bytes(eng, B, C) / bw if bw == bw else 0.0
                row[f"decode_b{tag}_bytes_floor_ms"] = floor * 1e3
                if comm is not None:
                    row[f"decode_b{tag}_collectives_ms"] = comm(B) * 1e3
                    floor += comm(B)
                row[f"decode_b{tag}_floor_ms"] = floor * 1e3
                row[f"decode_b{tag}_floor_ratio"] = dt / floor if floor else float("nan")
        rows.append(row)
        print(row, flush=True)
        dump(args, rows)


def step_collectives(model_name: str, n: int, B: int) -> list[tuple[str, int, str]]:
    """The collectives of one decode step of B tokens on rank 0 of n (one entry per call, elements per rank):
    the all-reduce of every row-parallel linear that reduces (attention output, dense MLP down), of every MoE block
    (routed + shared partial sums), of the vocabulary-parallel embedding, and the gather of the fp32 logits."""
    from ringlinear.config import preset
    from ringlinear.distributed.tensor_parallel import (
        ParallelMoE,
        RowParallelLinear,
        ShardGroup,
        VocabParallelEmbedding,
        shard_model,
    )
    from ringlinear.model import build_model

    model = shard_model(build_model(preset(model_name), "meta", torch.bfloat16), ShardGroup(0, n))
    ops = []
    for m in model.modules():
        if isinstance(m, RowParallelLinear) and m.reduce:
            ops.append(("all_reduce", B * m.out_features, "bfloat16"))
        elif isinstance(m, VocabParallelEmbedding):
            ops.append(("all_reduce", B * m.weight.shape[1], "bfloat16"))
        elif isinstance(m, ParallelMoE) and m.shard_group is not None:
            ops.append(("all_reduce", B * model.config.hidden_size, "bfloat16"))
    ops.append(("all_gather", B * model.lm_head_weight.shape[0], "float32"))
    return ops


def collectives_model(model_name: str, n: int, cap: int, backend: str, rows: list, args):
    """B -> seconds of the collectives of a decode step of B tokens: each distinct collective timed on n ranks at
    B = 1, 2, 4, ..., cap (and cap), linear in B between them. None (and an error row) when the timing failed: the
    floor is then the bytes alone."""
    try:
        return _collectives_model(model_name, n, cap, backend, rows, args)
    except Exception as e:  # noqa: BLE001 - the decode figures are still worth measuring
        import traceback

        traceback.print_exc()
        rows.append({"model": f"collectives {model_name} tp{n}", "context": 0, "error": repr(e)[:300]})
        return None


def _collectives_model(model_name: str, n: int, cap: int, backend: str, rows: list, args):
    from common import collective_ms

    batches = sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)})
    per_b = {B: step_collectives(model_name, n, B) for B in batches}
    distinct = sorted({op for ops in per_b.values() for op in ops})
    t0 = time.perf_counter()
    times = collective_ms(distinct, n, backend, iters=5 if args.smoke else 20)
    step_s = {}
    for B, ops in per_b.items():
        step_s[B] = sum(times[f"{op} {numel} {dt}"]["ms"] for op, numel, dt in ops) / 1e3
    row = {"model": f"collectives {model_name} tp{n}", "context": 0, "backend": backend,
           "calls_per_step": len(per_b[batches[0]]),
           "step_collectives_ms": {str(B): v * 1e3 for B, v in step_s.items()},
           "each_ms": {k: v["ms"] for k, v in times.items()}, "timed_as": sorted({v["how"] for v in times.values()})}
    rows.append(row)
    print(f"[bench] {model_name} TP={n}: {row['calls_per_step']} collectives a decode step, timed in "
          f"{time.perf_counter() - t0:.0f} s ({'/'.join(row['timed_as'])}): "
          + ", ".join(f"B={B} {v * 1e3:.3f} ms" for B, v in step_s.items()), flush=True)
    dump(args, rows)

    def comm(B: int) -> float:
        lo = max(b for b in batches if b <= B)
        hi = min((b for b in batches if b >= B), default=lo)
        if hi == lo:
            return step_s[lo]
        return step_s[lo] + (step_s[hi] - step_s[lo]) * (B - lo) / (hi - lo)

    return comm


def greedy_tokens(eng: LLMEngine, prompts: list[list[int]], n: int) -> list[dict]:
    """Greedy continuations of `prompts` (n tokens each) with each step's top-2 log-probabilities."""
    from ringlinear.engine.sequence import SamplingParams

    for i, p in enumerate(prompts):
        eng.add_request(f"greedy{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    outs = []
    for i in range(len(prompts)):
        c = done[f"greedy{i}"]
        margins = [sorted((lp.logprob for lp in d.values()), reverse=True) for d in c.logprobs]
        outs.append({"tokens": list(c.token_ids), "margin": [m[0] - m[1] if len(m) > 1 else float("inf")
                                                              for m in margins]})
    return outs


def compare_greedy(a: list[dict], b: list[dict], near_tie: float = 0.02) -> dict:
    """Token agreement of two greedy runs: equal tokens; at a first divergence, whether the reference's top-2
    log-probabilities were within `near_tie` there (a bf16 rounding flip, not a wrong model)."""
    total = equal = 0
    divergences = []
    for i, (x, y) in enumerate(zip(a, b)):
        n = len(x["tokens"])
        total += n
        first = next((j for j in range(n) if x["tokens"][j] != y["tokens"][j]), n)
        equal += first
        if first < n:
            divergences.append({"prompt": i, "at": first, "tp1_top2_margin": x["margin"][first]})
    return {"greedy_tokens": total, "greedy_equal_prefix_tokens": equal, "greedy_identical": not divergences,
            "greedy_divergences": divergences,
            "greedy_divergences_at_near_ties": all(d["tp1_top2_margin"] < near_tie for d in divergences)}


def dump(args, rows) -> None:
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "gpus": torch.cuda.device_count(), "torch": torch.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(["model", "context"] + keys))
    for r in rows:
        vals = []
        for k in keys:
            v = r.get(k, float("nan"))
            vals.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print(" | ".join([r["model"], str(r["context"])] + vals))


# ---- the modes ---------------------------------------------------------------------------------------------------
def mode_flash_fp8(args, bw, rows):
    name = "tiny" if args.smoke else "ring-flash-linear-2.0"
    eng = engine(name, args, quantization="fp8")
    measure("flash-fp8", eng, args.contexts, ["8", "max"], args, bw, rows)
    close(eng)
    table([r for r in rows if r["model"] == "flash-fp8"],
          ["prefill_tok_s", "decode_b8_tok_s", "decode_b8_floor_ratio", "decode_bmax_batch", "decode_bmax_tok_s",
           "decode_bmax_floor_ratio"])
    print("goal: decode step / byte floor <= 1.6x")


def mode_mini_fp8(args, bw, rows):
    name = "tiny" if args.smoke else "ring-mini-linear-2.0"
    for q in (None, "fp8"):
        eng = engine(name, args, quantization=q)
        measure(f"mini-{q or 'bf16'}", eng, args.contexts[:1], ["8", "64"], args, bw, rows)
        close(eng)
    by = {r["model"]: r for r in rows if r["model"].startswith("mini-")}
    b, f = by.get("mini-bf16", {}), by.get("mini-fp8", {})
    table([b, f], ["prefill_tok_s", "decode_b8_step_ms", "decode_b64_step_ms", "decode_b8_floor_ratio",
                   "decode_b64_floor_ratio"])
    for tag in ("8", "64"):
        ratio = b.get(f"decode_b{tag}_step_ms", float("nan")) / f.get(f"decode_b{tag}_step_ms", float("nan"))
        print(f"decode step bf16 / FP8 at B={tag}: {ratio:.2f}x (goal >= 1.5x)")
        rows.append({"model": "mini-ratio", "context": args.contexts[0], f"b{tag}_bf16_over_fp8": ratio})
    dump(args, rows)


def train_small(out: str, quick: bool) -> str:
    """The `small` preset trained for a few minutes on the pydoc corpus with `ringlinear train`; its HF export."""
    from ringlinear.demo import default_corpus

    corpus = default_corpus(os.path.join(out, "corpus.txt"))
    steps, batch, seq = (20, 2, 64) if quick else (1000, 32, 512)
    cmd = [sys.executable, "-m", "ringlinear.cli", "train", "--model", "tiny" if quick else "small", "--data", corpus,
           "--steps", str(steps), "--micro-batch", str(batch), "--seq-len", str(seq), "--lr", "2e-3",
           "--warmup-steps", "50", "--save-dir", out, "--no-plot", "--no-progress"]
    print("[bench]", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"[bench] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return os.path.join(out, "final")


@torch.no_grad()
def mode_logprob(args, bw, rows):
    from ringlinear.loading.sharded import load_for_inference
    from ringlinear.tokenizer import load_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench_fp8_")
    ckpt = args.checkpoint or train_small(tmp, args.smoke)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tok = load_tokenizer(ckpt)
    from ringlinear.demo import default_corpus

    text = open(default_corpus(os.path.join(tmp, "eval.txt")), encoding="utf-8").read()
    ids = tok.encode(text[-200_000:]).ids  # the corpus's last documents
    n, L = (4, 128) if args.smoke else (32, 1024)
    step = max(1, (len(ids) - L - 1) // n)
    windows = torch.tensor([ids[i * step : i * step + L + 1] for i in range(n)], device=device)
    out = {}
    for q in (None, "fp8"):
        model = load_for_inference(ckpt, device, dtype, quantization=q)
        logp = torch.cat([torch.log_softmax(model(w[None, :-1])[0].float(), -1) for w in windows])  # [n L, V]
        out[q] = logp
        del model
    tgt = windows[:, 1:].reshape(-1)
    lb, lf = out[None].gather(1, tgt[:, None])[:, 0], out["fp8"].gather(1, tgt[:, None])[:, 0]
    d = (lf - lb).abs()
    kl = (out[None].exp() * (out[None] - out["fp8"])).sum(-1)
    row = {"model": "logprob", "context": L, "checkpoint": ckpt, "tokens": int(tgt.numel()),
           "nll_bf16": float(-lb.mean()), "nll_fp8": float(-lf.mean()), "mean_abs_dlogprob": float(d.mean()),
           "p99_abs_dlogprob": float(d.quantile(0.99)), "max_abs_dlogprob": float(d.max()),
           "mean_kl_bf16_fp8": float(kl.mean()),
           "argmax_agreement": float((out[None].argmax(-1) == out["fp8"].argmax(-1)).float().mean())}
    rows.append(row)
    print(json.dumps(row, indent=1))
    dump(args, rows)


def mode_tp2(args, bw, rows):
    if not args.smoke and torch.cuda.device_count() < 2:
        raise SystemExit("--mode tp2 needs 2 GPUs")
    ctx = [512] if args.smoke else [32768]
    flash = "tiny" if args.smoke else "ring-flash-linear-2.0"
    mini = "tiny" if args.smoke else "ring-mini-linear-2.0"
    backend = "gloo" if args.smoke else "nccl"
    comm = collectives_model(flash, 2, args.max_batch, backend, rows, args)
    eng = engine(flash, args, tensor_parallel_size=2)
    measure("flash-bf16-tp2", eng, args.contexts, ["8", "max"], args, bw, rows, comm=comm)
    close(eng)
    comm = collectives_model(mini, 2, 64, backend, rows, args)
    g = torch.Generator().manual_seed(0)
    from ringlinear.config import preset

    vocab = preset(mini).vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (17, 100, 333, 1000)]
    greedy = {}
    for tp in (1, 2):
        eng = engine(mini, args, tensor_parallel_size=tp)
        greedy[tp] = greedy_tokens(eng, prompts, 8 if args.smoke else (32 if args.quick else 64))
        measure(f"mini-bf16-tp{tp}", eng, ctx, ["8", "64"], args, bw, rows, comm=comm if tp == 2 else None)
        close(eng)
    by = {r["model"]: r for r in rows}
    t1 = by.get("mini-bf16-tp1", {}).get("decode_b64_tok_s", float("nan"))
    t2 = by.get("mini-bf16-tp2", {}).get("decode_b64_tok_s", float("nan"))
    B = by.get("mini-bf16-tp2", {}).get("decode_b64_batch", 64)
    cmp = compare_greedy(greedy[1], greedy[2])
    rows.append({"model": "mini-tp2-over-tp1", "context": ctx[0], "batch": B, "decode_tok_s_ratio": t2 / t1, **cmp})
    dump(args, rows)
    table([r for r in rows if r["model"].startswith(("flash-bf16-tp2", "mini-bf16-tp"))],
          ["prefill_tok_s", "decode_b8_tok_s", "decode_b8_collectives_ms", "decode_b8_floor_ratio",
           "decode_b64_tok_s", "decode_bmax_batch", "decode_bmax_tok_s", "decode_bmax_floor_ratio"])
    print("goal: Ring-flash TP=2 decode step / floor <= 1.6x")
    print(f"Ring-mini decode at B={B}, {ctx[0]} tokens: TP=1 {t1:.0f} tok/s, TP=2 {t2:.0f} tok/s "
          f"({t2 / t1:.2f}x, goal >= 1.6x); greedy tokens TP=1 vs TP=2: {cmp['greedy_equal_prefix_tokens']} of "
          f"{cmp['greedy_tokens']} equal before any divergence"
          + ("" if cmp["greedy_identical"] else f", divergences {cmp['greedy_divergences']} (all at near ties: "
                                                 f"{cmp['greedy_divergences_at_near_ties']})"))


def side_by_side(rows: list[dict]) -> None:
    """Ring-flash bf16 over TP=2 beside FP8 on one GPU, context by context (when both modes ran)."""
    tp2 = {r["context"]: r for r in rows if r["model"] == "flash-bf16-tp2"}
    fp8 = {r["context"]: r for r in rows if r["model"] == "flash-fp8"}
    if not tp2 or not fp8:
        return
    keys = ["prefill_tok_s", "decode_b8_tok_s", "decode_b8_floor_ratio", "decode_bmax_batch", "decode_bmax_tok_s",
            "decode_bmax_floor_ratio"]
    print("\nRing-flash: bf16 TP=2 (2 GPUs) | FP8 (1 GPU)")
    print(" | ".join(["context"] + keys))
    for C in sorted(set(tp2) | set(fp8)):
        a, b = tp2.get(C, {}), fp8.get(C, {})
        cell = lambda r, k: f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-"))  # noqa: E731
        print(" | ".join([str(C)] + [f"{cell(a, k)} | {cell(b, k)}" for k in keys]))


def mode_gemm(args, bw, rows):
    from common import graph_ms

    from ringlinear.config import preset
    from ringlinear.ops.fp8.inference import quantize_weight, w8a8_linear
    from ringlinear.ops.fp8.w8a8 import W8A8Config, quantize_groups, w8a8_gemm
    from ringlinear.ops.moe.fused_moe import fused_moe

    if args.smoke:
        print("--mode gemm times kernels on a GPU; nothing to do on the CPU")
        return
    dev = torch.device("cuda")
    sweep = [W8A8Config(block_n=bn, block_n_large=bn, warps=w, stages=st)
             for bn in (16, 32, 64, 128) for w in (4, 8) for st in (3, 4, 5)]
    for model in ("ring-flash-linear-2.0", "ring-mini-linear-2.0"):
        c = preset(model)
        H, D, nh = c.hidden_size, c.head_dim, c.num_attention_heads
        shapes = {"linear qkv": (3 * nh * D, H), "g_proj": (nh * D, H), "dense": (H, nh * D),
                  "mlp gate": (c.intermediate_size, H), "mlp down": (H, c.intermediate_size),
                  "shared gate": (c.shared_expert_intermediate_size, H)}
        for name, (N, K) in shapes.items():
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            w8, s = quantize_weight(w)
            for M in (1, 8, 64):
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                t_bf16 = graph_ms(partial(torch.nn.functional.linear, x, w))
                t_fp8 = graph_ms(partial(w8a8_linear, x, w8, s))
                x8, sx = quantize_groups(x)
                best = min(((graph_ms(partial(w8a8_gemm, x8, sx, w8, s, config=cfg)), cfg) for cfg in sweep),
                           key=lambda r: r[0])
                row = {"model": f"gemm {model} {name}", "context": M, "N": N, "K": K, "bf16_ms": t_bf16,
                       "fp8_ms": t_fp8, "bf16_over_fp8": t_bf16 / t_fp8, "fp8_weight_GBps": N * K / t_fp8 / 1e6,
                       "best_gemm_ms": best[0], "best_config": str(best[1])}
                rows.append(row)
                print(f"{model:24s} {name:12s} M={M:3d} N={N:6d} K={K:6d}: bf16 {t_bf16 * 1e3:7.1f} us, fp8 "
                      f"{t_fp8 * 1e3:7.1f} us ({t_bf16 / t_fp8:.2f}x, {N * K / t_fp8 / 1e6:.0f} GB/s), best GEMM "
                      f"{best[0] * 1e3:.1f} us at {best[1]}", flush=True)
        # the routed experts of one MoE layer at decode batches
        E, ff, k = c.num_experts, c.moe_intermediate_size, c.num_experts_per_tok
        ws = [torch.randn(E, ff, H, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        ws.append(torch.randn(E, H, ff, device=dev, dtype=torch.bfloat16) * 0.02)
        qs = [quantize_weight(t) for t in ws]
        for T in (1, 8, 64):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)]).sort(-1).values
            wt = torch.rand(T, k, device=dev)
            t_bf16 = graph_ms(partial(fused_moe, x, idx, wt, *ws))
            t_fp8 = graph_ms(partial(fused_moe, x, idx, wt, *(q for q, _ in qs), w_scales=tuple(s for _, s in qs)))
            rows.append({"model": f"fused_moe {model}", "context": T, "bf16_ms": t_bf16, "fp8_ms": t_fp8,
                         "bf16_over_fp8": t_bf16 / t_fp8})
            print(f"{model:24s} fused MoE T={T:3d}: bf16 {t_bf16 * 1e3:7.1f} us, fp8 {t_fp8 * 1e3:7.1f} us "
                  f"({t_bf16 / t_fp8:.2f}x)", flush=True)
        dump(args, rows)


MODES = {"flash-fp8": mode_flash_fp8, "mini-fp8": mode_mini_fp8, "logprob": mode_logprob, "tp2": mode_tp2,
         "gemm": mode_gemm}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), action="append", help="repeatable; default: all one-GPU modes")
    ap.add_argument("--contexts", default="4096,32768,65536")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--mem", type=float, default=0.92, help="gpu_memory_utilization")
    ap.add_argument("--cpu-cache-gib", type=float, default=0.5)
    ap.add_argument("--checkpoint", help="--mode logprob: a trained checkpoint (default: train `small` here)")
    ap.add_argument("--quick", action="store_true", help="a short GPU run: fewer decode steps and greedy tokens")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run on the tiny preset (TP over gloo)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.smoke:
        args.contexts, args.chunk, args.max_batch, args.decode_steps = [256, 1024], 256, 8, 2
    elif args.quick:
        args.decode_steps = min(args.decode_steps, 8)
    modes = args.mode or ["flash-fp8", "mini-fp8", "logprob"]
    bw = copy_bandwidth(torch.device("cuda")) if torch.cuda.is_available() and not args.smoke else float("nan")
    if bw == bw:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    for m in modes:
        t0 = time.perf_counter()
        try:
            MODES[m](args, bw, rows)
        except Exception as e:  # noqa: BLE001 - report what ran; the failure is printed and recorded
            import traceback

            traceback.print_exc()
            rows.append({"model": m, "context": 0, "error": repr(e)[:300]})
            dump(args, rows)
        print(f"[bench] mode {m}: {time.perf_counter() - t0:.0f} s", flush=True)
    side_by_side(rows)


if __name__ == "__main__":
    main()
