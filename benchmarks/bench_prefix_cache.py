"""Prefix caching and forked groups: Ring-mini-linear-2.0 shape, random bf16 weights (built as bench_serving builds
them), one engine whose prefix cache is either on or detached ("off": what enable_prefix_caching=False does, on
the same KV pool). Greedy or seeded random tokens, ignore_eos, so every run computes the same number of tokens.

- ttft: time to first token of a request of a `--prefix`-token prefix + `--suffix` new tokens, its prefix cached
  (a request of that prefix ran before) vs fresh (miss; with the cache on, and once with it off); goal >= 20x;
- chat: `--chat-convs` conversations of `--chat-turns` turns, each turn resending the whole history (a
  `--chat-system`-token start, `--chat-user` new tokens per turn, `--chat-reply`-token replies); tokens/s = (prompt
  + generated tokens) / wall time, cache on vs off; goal >= 3x at 8 turns;
- rl: one rollout step of `--rl-prompts` prompts x groups of `--rl-group` (`--rl-prompt-len`-token prompts,
  `--rl-max-tokens` sampled tokens): one request with n = group (the prompt computed once, then forked: what
  `RolloutWorker.rollout` does) vs the group's members as separate requests, cache off (every member prefills, as
  before) and on; goal >= 2x.

    python benchmarks/bench_prefix_cache.py --json out.json     (CUDA; < 5 minutes on an H200)
    python benchmarks/bench_prefix_cache.py --quick             (CPU smoke run, tiny preset)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_serving import random_model  # noqa: E402 - the benchmarks folder is on sys.path when run as a script

from ringlinear.config import preset
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.engine.sequence import SamplingParams


class Workload:
    """Random token ids from one seeded generator: the on and off runs see the same prompts."""

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def tokens(self, n: int) -> list[int]:
        return torch.randint(1, self.vocab, (n,), generator=self.gen).tolist()


def set_prefix_caching(engine: LLMEngine, prefix, on: bool) -> None:
    """Attach the engine's prefix cache (emptied) or detach it: detached, the scheduler neither looks prefixes up
    nor keeps snapshots, as with enable_prefix_caching=False."""
    if prefix is not None:
        prefix.reset()
    engine.scheduler.prefix = engine.scheduler.cache.prefix = prefix if on else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]], device) -> dict:
    """Add `requests` at once, step until all finish. Returns outputs, per-request time to first token, wall time."""
    sync(device)
    t0 = time.perf_counter()
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    first, done = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first and any(c.token_ids for c in out.outputs):
                first[out.request_id] = time.perf_counter() - t0
            if out.finished:
                done[out.request_id] = out
    sync(device)
    return {"outputs": done, "ttft": first, "wall": time.perf_counter() - t0}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def bench_ttft(engine, prefix, args, work: Workload, device) -> dict:
    P, S = args.prefix, args.suffix
    res = {"prefix": P, "suffix": S}
    set_prefix_caching(engine, prefix, False)
    run(engine, [("shapes", work.tokens(P + S), greedy(1))], device)  # kernels autotuned at this prompt's shapes
    res["uncached_off_s"] = statistics.median(
        run(engine, [(f"off{r}", work.tokens(P + S), greedy(1))], device)["ttft"][f"off{r}"]
        for r in range(args.reps))
    set_prefix_caching(engine, prefix, True)
    res["uncached_s"] = statistics.median(
        run(engine, [(f"miss{r}", work.tokens(P + S), greedy(1))], device)["ttft"][f"miss{r}"]
        for r in range(args.reps))
    shared = work.tokens(P)
    run(engine, [("warm", shared, greedy(1))], device)  # its end-of-sequence snapshot covers the P tokens
    hits, times = [], []
    for r in range(args.reps):
        out = run(engine, [(f"hit{r}", shared + work.tokens(S), greedy(1))], device)
        times.append(out["ttft"][f"hit{r}"])
        hits.append(out["outputs"][f"hit{r}"].num_cached_tokens)
    res["cached_s"] = statistics.median(times)
    res["cached_tokens"] = hits
    res["speedup"] = res["uncached_s"] / res["cached_s"]
    return res


def bench_chat(engine, prefix, args, work_seed: int, device) -> dict:
    res = {"convs": args.chat_convs, "turns": args.chat_turns, "system": args.chat_system, "user": args.chat_user,
           "reply": args.chat_reply}
    for mode in ("off", "on"):
        set_prefix_caching(engine, prefix, mode == "on")
        work = Workload(engine.config.vocab_size, work_seed)  # the same conversations in both modes
        history = [work.tokens(args.chat_system) for _ in range(args.chat_convs)]
        prompt_tokens = gen_tokens = cached = 0
        wall = 0.0
        for t in range(args.chat_turns):
            reqs = [(f"{mode}-c{c}-t{t}", history[c] + work.tokens(args.chat_user), greedy(args.chat_reply))
                    for c in range(args.chat_convs)]
            out = run(engine, reqs, device)
            wall += out["wall"]
            for c, (rid, prompt, _) in enumerate(reqs):
                o = out["outputs"][rid]
                history[c] = prompt + o.outputs[0].token_ids
                prompt_tokens += len(prompt)
                gen_tokens += len(o.outputs[0].token_ids)
                cached += o.num_cached_tokens
        res[mode] = {"wall_s": wall, "prompt_tokens": prompt_tokens, "generated_tokens": gen_tokens,
                     "cached_tokens": cached, "tokens_per_s": (prompt_tokens + gen_tokens) / wall}
    res["speedup"] = res["on"]["tokens_per_s"] / res["off"]["tokens_per_s"]
    return res


def bench_rl(engine, prefix, args, work: Workload, device) -> dict:
    G, N = args.rl_group, args.rl_prompts
    res = {"prompts": N, "group": G, "prompt_len": args.rl_prompt_len, "max_tokens": args.rl_max_tokens}
    prompts = [work.tokens(args.rl_prompt_len) for _ in range(N)]

    def params(n: int, seed: int) -> SamplingParams:  # as RolloutWorker.rollout samples
        return SamplingParams(n=n, temperature=1.0, max_tokens=args.rl_max_tokens, ignore_eos=True, logprobs=0,
                              seed=seed)

    modes = {
        "separate_off": (False, [(f"s{k}-{j}", p, params(1, k * G + j)) for k, p in enumerate(prompts)
                                 for j in range(G)]),
        "forked_on": (True, [(f"f{k}", p, params(G, k * G)) for k, p in enumerate(prompts)]),
        "separate_on": (True, [(f"c{k}-{j}", p, params(1, k * G + j)) for k, p in enumerate(prompts)
                               for j in range(G)]),
    }
    for name, (on, reqs) in modes.items():
        set_prefix_caching(engine, prefix, on)
        out = run(engine, reqs, device)
        res[name] = {"step_s": out["wall"], "cached_tokens": sum(o.num_cached_tokens for o in out["outputs"].values()),
                     "sequences": sum(len(o.outputs) for o in out["outputs"].values())}
    res["speedup"] = res["separate_off"]["step_s"] / res["forked_on"]["step_s"]
    return res


def report(r: dict) -> None:
    t, c, rl = r.get("ttft"), r.get("chat"), r.get("rl")
    print("\nfigure | cache off / before | cache on | ratio | goal")
    if t:
        print(f"time to first token, {t['prefix']}-token prefix + {t['suffix']} new (s) | "
              f"{t['uncached_s']:.3f} uncached ({t['uncached_off_s']:.3f} with the cache off) | {t['cached_s']:.4f} "
              f"cached ({min(t['cached_tokens'])} tokens hit) | {t['speedup']:.1f}x | >= 20x")
    if c:
        print(f"chat, {c['convs']} conversations x {c['turns']} turns ({c['system']} + {c['user']}/turn, "
              f"{c['reply']}-token replies), tokens/s | {c['off']['tokens_per_s']:.0f} | {c['on']['tokens_per_s']:.0f} "
              f"({c['on']['cached_tokens'] / c['on']['prompt_tokens']:.0%} of prompt tokens hit) | "
              f"{c['speedup']:.2f}x | >= 3x")
    if rl:
        print(f"RL rollout step, {rl['prompts']} prompts x groups of {rl['group']}, {rl['prompt_len']}-token prompts, "
              f"{rl['max_tokens']} tokens (s) | {rl['separate_off']['step_s']:.2f} separate requests | "
              f"{rl['forked_on']['step_s']:.2f} n={rl['group']} forked ({rl['separate_on']['step_s']:.2f} separate, "
              f"cache on: {rl['separate_on']['cached_tokens']} tokens hit) | {rl['speedup']:.2f}x | >= 2x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=32768)
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chat-convs", type=int, default=8)
    ap.add_argument("--chat-turns", type=int, default=8)
    ap.add_argument("--chat-system", type=int, default=4096)
    ap.add_argument("--chat-user", type=int, default=1024)
    ap.add_argument("--chat-reply", type=int, default=32)
    ap.add_argument("--rl-prompts", type=int, default=16)
    ap.add_argument("--rl-group", type=int, default=8)
    ap.add_argument("--rl-prompt-len", type=int, default=2048)
    ap.add_argument("--rl-max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--interval", type=int, default=8192, help="prefix_state_interval")
    ap.add_argument("--mem", type=float, default=0.9, help="gpu_memory_utilization")
    ap.add_argument("--figures", default="ttft,chat,rl")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small sizes (CPU smoke run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = preset("ring-mini-linear-2.0")
    if args.quick:
        config = preset("tiny")
        args.prefix, args.suffix, args.reps = 512, 16, 2
        args.chat_convs, args.chat_turns, args.chat_system, args.chat_user, args.chat_reply = 2, 3, 128, 32, 8
        args.rl_prompts, args.rl_group, args.rl_prompt_len, args.rl_max_tokens = 2, 4, 64, 8
        args.max_num_seqs, args.chunk, args.interval = 8, 256, 256
    t_start = time.perf_counter()
    print(f"== {'tiny' if args.quick else 'ring-mini-linear-2.0'}: building random weights on {device}", flush=True)
    model = random_model(config, device, dtype)
    engine = LLMEngine(EngineConfig(device=str(device), max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.chunk, prefix_state_interval=args.interval,
                                    gpu_memory_utilization=args.mem, cpu_cache_gib=0.5, verbose=True), model=model)
    prefix = engine.scheduler.prefix
    work = Workload(config.vocab_size, 0)
    set_prefix_caching(engine, prefix, False)
    run(engine, [("compile", work.tokens(min(4096, args.prefix)), greedy(4))], device)  # kernels, autotuning
    results = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "args": vars(args),
                        "snapshots": engine.scheduler.cache.layout.num_snapshots}}
    figures = args.figures.split(",")
    for name, fn in (("ttft", lambda: bench_ttft(engine, prefix, args, work, device)),
                     ("chat", lambda: bench_chat(engine, prefix, args, 1, device)),
                     ("rl", lambda: bench_rl(engine, prefix, args, work, device))):
        if name not in figures:
            continue
        t0 = time.perf_counter()
        results[name] = fn()
        results[name]["bench_s"] = time.perf_counter() - t0
        print(name, json.dumps(results[name]), flush=True)
        if args.json:  # after every figure, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    report(results)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
