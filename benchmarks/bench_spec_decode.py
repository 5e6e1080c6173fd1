"""Speculative decoding with the MTP module (docs/architecture.md, "Speculative decoding").

(a) The `small` preset with one MTP layer, trained for `--train-seconds` on text available offline (this
    repository's sources and docs, as bench_train's loss curves), exported and served: for k = 0 (plain decoding,
    CUDA graphs), 1, 2, 3, the acceptance rate, tokens per verify step and decode tokens/s of B greedy sequences whose
    prompts are C-token windows of held-out text (C = 4K and 32K; B = 1, 8, 32), and the speed-up over k = 0.
    Decode rate: generated tokens after every sequence's first token / the time they took (prefill excluded).
    Goals: >= 1.6x at B = 1 and >= 1.3x at B = 8 for the best k.
(b) Ring-mini-linear-2.0's shape with one MTP layer (random bf16 weights, built on the device as bench_serving
    does), B = 8 sequences of `--mini-context` tokens: the time of a k = 1 step (MTP catch-up + verify of 2 positions
    per sequence, eager) over a plain decode step (CUDA graphs). Goal <= 1.3x.

    python benchmarks/bench_spec_decode.py --json out.json        (CUDA; ~25 min with the default --train-seconds)
    python benchmarks/bench_spec_decode.py --quick --json q.json   (CUDA, < 4 min)
    python benchmarks/bench_spec_decode.py --smoke                 (CPU smoke run, tiny preset)
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import tempfile
import time

import torch

from ringlinear.config import preset
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.engine.sequence import SamplingParams


def corpus_text() -> str:
    """This repository's Python sources and Markdown docs, concatenated (offline text)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "ringlinear/**/*.py"), recursive=True))
    files += sorted(glob.glob(os.path.join(root, "**/*.md"), recursive=True))
    return "\n\n\n".join(open(p, encoding="utf-8").read() for p in files)


def train(model: str, seconds: float, out_dir: str, seq_len: int, micro_batch: int, max_len: int) -> dict:
    """Train `model` (with its MTP layer) on the held-in 90% of the corpus for `seconds`; export to out_dir/final.
    Returns the steps taken and the last losses."""
    from ringlinear.train.trainer import TrainConfig, Trainer

    text = corpus_text()
    cut = int(len(text) * 0.9)
    path = os.path.join(out_dir, "train.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:cut])
    cfg = TrainConfig.from_dict({"model": model, "data": [path], "seq_len": seq_len, "micro_batch": micro_batch,
                                 "steps": 1_000_000, "lr": 2e-3, "warmup_steps": 30, "progress": False,
                                 "model_overrides": {"num_nextn_predict_layers": 1, "max_position_embeddings": max_len}})
    tr = Trainer(cfg)
    t0, hist = time.perf_counter(), []
    try:
        while time.perf_counter() - t0 < seconds:
            hist.append(tr.train_step())
        tr.export(os.path.join(out_dir, "final"))
    finally:
        tr.close()
    last = hist[-10:]
    return {"steps": len(hist), "seconds": time.perf_counter() - t0,
            "loss": sum(h["loss"] for h in last) / len(last),
            "mtp_loss": sum(h.get("mtp_loss", float("nan")) for h in last) / len(last), "held_out": text[cut:]}


def decode_rate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy generation of `max_tokens` for every prompt at once; decode tokens/s after the last first token."""
    before = dict(engine.spec_stats.as_dict())
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp)
    got: dict[str, int] = {}
    t_first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = len(out.outputs[0].token_ids)
        if t_first is None and len(got) == len(prompts) and all(n >= 1 for n in got.values()):
            t_first, n_first = time.perf_counter(), sum(got.values())
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_first
    after = engine.spec_stats.as_dict()
    drafted = after["draft_tokens"] - before["draft_tokens"]
    steps = after["verify_steps"] - before["verify_steps"]
    return {"tok_s": (sum(got.values()) - n_first) / dt,
            "acceptance": (after["accepted_tokens"] - before["accepted_tokens"]) / drafted if drafted else None,
            "tokens_per_step": (after["emitted_tokens"] - before["emitted_tokens"]) / steps if steps else None}


def part_a(args, device: str, out_dir: str) -> dict:
    model_name = "tiny" if args.smoke else "small"
    max_ctx = max(args.contexts)
    max_len = max_ctx + args.gen_tokens + 64
    print(f"(a) training {model_name} + MTP for {args.train_seconds:.0f} s on this repository's text ...", flush=True)
    tr = train(model_name, args.train_seconds, out_dir, args.train_seq_len, args.train_micro_batch, max_len)
    held_out = tr.pop("held_out")
    print(f"    {tr['steps']} steps, loss {tr['loss']:.3f}, MTP loss {tr['mtp_loss']:.3f}", flush=True)
    ckpt = os.path.join(out_dir, "final")
    rows = []
    for k in args.ks:
        eng = LLMEngine(EngineConfig(model=ckpt, device=device, max_num_seqs=max(args.batches),
                                     max_num_batched_tokens=args.chunk, enable_prefix_caching=False,
                                     num_speculative_tokens=k, max_model_len=max_len, verbose=False,
                                     gpu_memory_utilization=0.6, cpu_cache_gib=1.0))
        ids = eng.encode(held_out)
        for B in args.batches:  # warm-up at every batch size: kernel compilation, allocator (NOTES_spec_decode.md)
            decode_rate(eng, [ids[i * 64 : (i + 1) * 64] for i in range(B)], 8)
        for ctx in args.contexts:
            for B in args.batches:
                stride = max(1, (len(ids) - ctx) // max(1, B))
                prompts = [(ids * (2 + ctx // max(1, len(ids))))[i * stride : i * stride + ctx] for i in range(B)]
                r = decode_rate(eng, prompts, args.gen_tokens)
                rows.append({"k": k, "context": ctx, "batch": B, **r})
                print(f"    k={k} C={ctx} B={B}: {r['tok_s']:.1f} tok/s, acceptance "
                      f"{r['acceptance'] if r['acceptance'] is None else round(r['acceptance'], 3)}", flush=True)
        del eng
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {(r["context"], r["batch"]): r["tok_s"] for r in rows if r["k"] == 0}
    for r in rows:
        r["speedup"] = r["tok_s"] / base[(r["context"], r["batch"])] if (r["context"], r["batch"]) in base else None
    return {"train": tr, "rows": rows}


@torch.no_grad()
def step_times(engine: LLMEngine, B: int, context: int, steps: int, vocab: int) -> float:
    """Mean seconds of an engine step once B sequences of `context` prompt tokens are all decoding."""
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_tokens=steps * 4 + 16, ignore_eos=True)
    for i in range(B):
        engine.add_request(f"m{i}", torch.randint(0, vocab, (context,), generator=gen).tolist(), sp)
    while any(s.num_outputs == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):  # warm-up (drafts in flight, allocator)
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    for i in range(B):
        engine.abort_request(f"m{i}")
    return dt


def part_b(args, device: str) -> dict:
    from bench_serving import random_model  # the benchmarks folder is on sys.path when run as a script

    name = "tiny" if args.smoke else "ring-mini-linear-2.0"
    cfg = preset(name, num_nextn_predict_layers=1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"(b) {name} + MTP, random weights: step time k=1 / k=0 at B=8, context {args.mini_context}", flush=True)
    model = random_model(cfg, torch.device(device), dtype)
    out = {}
    for k in (0, 1):
        eng = LLMEngine(EngineConfig(device=device, max_num_seqs=8, max_num_batched_tokens=args.chunk,
                                     enable_prefix_caching=False, num_speculative_tokens=k,
                                     max_model_len=args.mini_context + 512, verbose=False,
                                     gpu_memory_utilization=0.85, cpu_cache_gib=1.0), model=model)
        out[f"k{k}_step_ms"] = 1e3 * step_times(eng, 8, args.mini_context, args.mini_steps, cfg.vocab_size)
        del eng
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out["ratio"] = out["k1_step_ms"] / out["k0_step_ms"]
    print(f"    plain step {out['k0_step_ms']:.2f} ms, k=1 step {out['k1_step_ms']:.2f} ms: {out['ratio']:.2f}x "
          "(goal <= 1.3x)", flush=True)
    return out


def table(a: dict) -> str:
    lines = ["| k | context | B | decode tok/s | speed-up vs k=0 | acceptance | tokens / verify step |",
             "|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        tps = "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        lines.append(f"| {r['k']} | {r['context']} | {r['batch']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {acc} "
                     f"| {tps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CUDA run in under 4 minutes (60 s of training, 4K context, B = 1 and 8, k = 0, 1, 3)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run of the tiny preset")
    ap.add_argument("--train-seconds", type=float, default=None, help="training time of part (a) (default 900; "
                    "--quick 60)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device: use --smoke for the CPU smoke run")
    if args.smoke:
        defaults = dict(train_seconds=15, contexts=[128], batches=[1, 4], ks=[0, 1, 2], gen_tokens=12, chunk=256,
                        train_seq_len=128, train_micro_batch=4, mini_context=64, mini_steps=3)
    elif args.quick:
        defaults = dict(train_seconds=60, contexts=[4096], batches=[1, 8], ks=[0, 1, 3], gen_tokens=48,
                        chunk=8192, train_seq_len=1024, train_micro_batch=16, mini_context=2048, mini_steps=10)
    else:
        defaults = dict(train_seconds=900, contexts=[4096, 32768], batches=[1, 8, 32], ks=[0, 1, 2, 3],
                        gen_tokens=256, chunk=8192, train_seq_len=1024, train_micro_batch=16, mini_context=4096,
                        mini_steps=30)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "quick": args.quick,
              "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as out_dir:
        if not args.skip_a:
            result["a"] = part_a(args, device, out_dir)
            print("\n" + table(result["a"]))
    if not args.skip_b:
        result["b"] = part_b(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
