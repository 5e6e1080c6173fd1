"""Sampler vs trainer alignment (issue 24), device H200, `small` preset (trained briefly on this repository's
text, or `--model CHECKPOINT`), bf16.

For each setting of the alignment switches, turned on cumulatively (off, +unfused, +rope, +gemm, +moe,
+softmax_attn, +linear_attn = all), and each batch size (1, 8, 64): the engine samples `--gen-len` tokens per
sequence (temperature 1, CUDA graphs unless --eager), then the trainer's forward (the RL policy's packed forward
under the same switches) scores the same tokens. Reported: mean, p99 and max |dlogp|, mean |dp|, the fraction of
tokens with |dlogp| > 0.1, and decode tok/s (generated tokens over the generate call's wall time) with its cost
against "off". Second table: the Lightning state kept in fp32 (the engine's) vs bf16, relative error of the
outputs against an fp64 recurrence as the sequence grows to `--state-len` (32K).

    python benchmarks/bench_align.py --json benchmarks/results/bench_align_h200.json
    python benchmarks/bench_align.py --quick          # < 4 min on one H200; also runs on the CPU (tiny model)
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import json
import math
import os
import tempfile
import time

import torch

SETTINGS = ["off", "unfused", "unfused,rope", "unfused,rope,gemm", "unfused,rope,gemm,moe",
            "unfused,rope,gemm,moe,softmax_attn", "all"]
NAMES = ["off", "+unfused", "+rope", "+gemm", "+moe", "+softmax_attn", "+linear_attn (all)"]


def trained_model(preset: str, steps: int, device: str):
    """`preset` trained `steps` steps on the repository's own text (bf16 on CUDA); returns (model, token stream)."""
    from ringlinear.train.trainer import TrainConfig, Trainer

    files = sorted(glob.glob("ringlinear/**/*.py", recursive=True)) + ["README.md"]
    text = "\n\n\n".join(open(p).read() for p in files)
    d = tempfile.mkdtemp()
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(text)
    cfg = TrainConfig.from_dict({"model": preset, "data": [corpus], "seq_len": 256 if device == "cpu" else 512,
                                 "micro_batch": 4, "steps": steps, "lr": 2e-3, "warmup_steps": max(1, steps // 10),
                                 "progress": False, "plot": False, "tensorboard": False})
    tr = Trainer(cfg)
    tr.fit()
    os.remove(corpus)
    return tr.model.eval(), text


def prompts_from(text: str, tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(text[:200_000]).ids
    starts = torch.randint(0, len(ids) - length, (n,), generator=g).tolist()
    return [ids[s : s + length] for s in starts]


def gap_stats(train: torch.Tensor, samp: torch.Tensor) -> dict[str, float]:
    d = (train.double() - samp.double()).abs()
    return {"mean_abs_dlogp": float(d.mean()), "p99_abs_dlogp": float(torch.quantile(d.float(), 0.99)),
            "max_abs_dlogp": float(d.max()), "mean_abs_dp": float((train.double().exp() - samp.double().exp()).abs().mean()),
            "frac_dlogp_gt_0.1": float((d > 0.1).double().mean()), "bitwise_equal_frac": float((d == 0).double().mean())}


def measure(model, tokenizer, prompts, spec: str, batches: list[int], gen_len: int, eager: bool, device: str,
            pack: int) -> dict:
    from ringlinear.engine.llm import LLM
    from ringlinear.engine.sequence import SamplingParams
    from ringlinear.ops.batch_invariant import aligned_numerics
    from ringlinear.rl.scoring import completion_logprobs, pack_completions

    llm = LLM(live_model=copy.deepcopy(model), tokenizer=tokenizer, device=device, max_num_seqs=max(batches),
              max_num_batched_tokens=2048, gpu_memory_utilization=0.5, cpu_cache_gib=0.5, verbose=False,
              enforce_eager=eager, aligned_numerics=spec, max_model_len=len(prompts[0]) + gen_len + 16)
    out = {"graphs": llm.engine.runner.graphs is not None}
    for B in batches:
        params = [SamplingParams(temperature=1.0, max_tokens=gen_len, logprobs=0, seed=i, ignore_eos=True)
                  for i in range(B)]
        llm.generate(prompts[:B], [SamplingParams(max_tokens=4, ignore_eos=True)] * B)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = llm.generate(prompts[:B], params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        comps = [r.outputs[0].token_ids for r in res]
        samp = torch.cat([torch.tensor([lp[t].logprob for t, lp in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)])
                          for r in res])
        train = []
        with aligned_numerics(spec), torch.no_grad():
            for s in range(0, B, pack):
                idx = range(s, min(B, s + pack))
                pc = pack_completions([prompts[i] for i in idx], [comps[i] for i in idx], device)
                train.append(completion_logprobs(model, pc).float().cpu())
        out[B] = {"decode_tok_s": sum(map(len, comps)) / dt, **gap_stats(torch.cat(train), samp)}
        print(f"  {spec:<38} B={B:<3} {out[B]['decode_tok_s']:9.0f} tok/s  max|dlogp| {out[B]['max_abs_dlogp']:.2e}  "
              f"mean {out[B]['mean_abs_dlogp']:.2e}", flush=True)
    del llm
    gc.collect()  # the engine's cache goes before the next setting sizes its own
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def state_precision(lengths: list[int], device: str, H: int = 4, D: int = 64) -> list[dict]:
    """Lightning outputs with the state in fp32 (the engine's recurrent kernel, the decode arithmetic) and in bf16
    (the same recurrence, the state rounded to bf16 after every token) against an fp64 recurrence; unit-RMS
    inputs as after QK-norm, the decay of a mid-depth Ring layer."""
    from ringlinear.ops.batch_invariant import recurrent_lightning
    from ringlinear.ops.lightning import decay_slopes

    T = max(lengths)
    g = decay_slopes(H, 4, 8, True).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=gen).to(device) for _ in range(3))
    scale = D**-0.5
    q32, k32, v32 = q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()
    o32 = recurrent_lightning(q32, k32, v32, g, scale, torch.zeros(1, H, D, D, device=device),
                              torch.zeros(1, dtype=torch.long, device=device),
                              torch.tensor([0, T], dtype=torch.int32, device=device), [0, T]).double()
    S64 = torch.zeros(H, D, D, dtype=torch.float64, device=device)
    S16 = torch.zeros(H, D, D, dtype=torch.bfloat16, device=device)
    d64, d16 = torch.exp(g.double())[:, None, None], torch.exp(g.float())[:, None, None]
    o64 = torch.empty(T, H, D, dtype=torch.float64, device=device)
    o16 = torch.empty(T, H, D, dtype=torch.float64, device=device)
    for t in range(T):
        kv64 = k32[t].double()[:, :, None] * v32[t].double()[:, None, :]
        S64 = d64 * S64 + kv64
        o64[t] = torch.einsum("hd,hde->he", q32[t].double(), S64) * scale
        S16 = (d16 * S16.float() + k32[t][:, :, None] * v32[t][:, None, :]).bfloat16()
        o16[t] = torch.einsum("hd,hde->he", q32[t], S16.float()).double() * scale
    rows = []
    for n in lengths:
        w = slice(max(0, n - 256), n)  # the last 256 positions up to n
        ref = o64[w]
        rows.append({"len": n, "fp32_rel_err": float((o32[w] - ref).norm() / ref.norm()),
                     "bf16_rel_err": float((o16[w] - ref).norm() / ref.norm())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (HF layout) instead of training the preset")
    ap.add_argument("--preset", default=None, help="preset to train (default small; tiny with --quick on the CPU)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--gen-len", type=int, default=None, help="tokens generated per sequence (default 2048)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,64)")
    ap.add_argument("--settings", default=None, help="comma list of indices into the cumulative settings")
    ap.add_argument("--state-len", type=int, default=None, help="longest sequence of the state table (default 32768)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="short run: < 4 min on one H200")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    q = args.quick
    preset = args.preset or ("tiny" if cpu else "small")
    steps = args.train_steps if args.train_steps is not None else (20 if cpu else 60 if q else 300)
    gen_len = args.gen_len or (16 if cpu else 256 if q else 2048)
    batches = [int(b) for b in (args.batches or ("1,4" if cpu else "1,8" if q else "1,8,64")).split(",")]
    sel = [int(i) for i in args.settings.split(",")] if args.settings else list(range(len(SETTINGS)))
    state_len = args.state_len or (512 if cpu else 4096 if q else 32768)
    from ringlinear.tokenizer import byte_level_tokenizer

    t0 = time.perf_counter()
    tokenizer = byte_level_tokenizer()
    if args.model:
        from ringlinear.pretrained import load_pretrained

        loaded = load_pretrained(args.model, device=device, dtype="bfloat16" if not cpu else "float32")
        model, tokenizer = loaded.model.eval(), loaded.tokenizer
        text = open("README.md").read() * 4
    else:
        model, text = trained_model(preset, steps, device)
    print(f"model ready in {time.perf_counter() - t0:.0f}s ({next(model.parameters()).dtype}, {device})", flush=True)
    prompts = prompts_from(text, tokenizer, max(batches), args.prompt_len)
    results = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "preset": args.model or preset,
               "train_steps": None if args.model else steps, "gen_len": gen_len, "batches": batches,
               "graphs": not args.eager, "settings": {}}
    for i in sel:
        results["settings"][NAMES[i]] = {"spec": SETTINGS[i], **measure(model, tokenizer, prompts, SETTINGS[i], batches,
                                                                         gen_len, args.eager, device, 8)}
    lengths = [n for n in (512, 1024, 4096, 8192, 16384, 32768) if n <= state_len] or [state_len]
    results["state_precision"] = state_precision(lengths, device)
    results["wall_s"] = time.perf_counter() - t0
    base = results["settings"].get("off")
    print(f"\n{'setting':<22}{'B':>4}{'tok/s':>10}{'cost':>7}{'mean|dlogp|':>13}{'p99':>10}{'max':>10}"
          f"{'mean|dp|':>10}{'>0.1':>8}{'bitwise':>9}")
    for name, r in results["settings"].items():
        for B in batches:
            x = r[B]
            cost = base[B]["decode_tok_s"] / x["decode_tok_s"] if base else math.nan
            print(f"{name:<22}{B:>4}{x['decode_tok_s']:>10.0f}{cost:>6.2f}x{x['mean_abs_dlogp']:>13.2e}"
                  f"{x['p99_abs_dlogp']:>10.2e}{x['max_abs_dlogp']:>10.2e}{x['mean_abs_dp']:>10.2e}"
                  f"{x['frac_dlogp_gt_0.1']:>8.4f}{x['bitwise_equal_frac']:>9.4f}")
    print(f"\n{'len':>7}{'fp32 state rel err':>20}{'bf16 state rel err':>20}")
    for r in results["state_precision"]:
        print(f"{r['len']:>7}{r['fp32_rel_err']:>20.2e}{r['bf16_rel_err']:>20.2e}")
    print(f"\nwall {results['wall_s']:.0f}s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({k: ({n: {str(b): v for b, v in s.items()} for n, s in v.items()} if k == "settings" else v)
                       for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
