"""Serving throughput of the engine at long context: Ring-mini-linear-2.0 (hybrid, random bf16 weights) against
(a) its all-softmax twin (same model, every layer softmax: what Ring-mini-2.0 costs) and (b) a dense model of
32B shape (Qwen2.5-32B-like widths; only `--dense-layers` of its 64 layers fit beside the KV cache, and its
times are scaled by 64 / dense-layers, said in the table). One run, same engine, same GPU.

- prefill: one request of C prompt tokens through the engine (chunked prefill of `--chunk` tokens), tokens/s;
- decode: B sequences already holding C tokens each (their cache filled with random KV / states rather than by
  a prefill: the work of a decode step is the same), tokens/s over `--decode-steps` engine steps; B = 8 for
  every model, and the largest batch the cache admits (capped at 64);
- floor: bytes one decode step must read (activated weights, with the experts B tokens touch; KV; state read
  + write) over the copy bandwidth measured in this run, against the measured step time, at B = 8 and B = 64;
- host: a decode step's host work (scheduling, building and launching the batch, turning sampled tokens into
  outputs; `LLMEngine.last_step_host_s`), beside the replayed graph's GPU time;
- prefill MFU: (2 x activated non-embedding parameters + attention FLOPs) per token x tok/s over the bf16 GEMM
  rate measured in this run;
- --profile: a kernel-time table of eager decode steps (top kernels per step) for the hybrid at B = 8.

    python benchmarks/bench_serving.py --json out.json            (CUDA)
    python benchmarks/bench_serving.py --quick                     (CPU smoke run, tiny preset)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from ringlinear.accounting import cache_bytes
from ringlinear.config import preset
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.engine.sequence import Request, SamplingParams, Sequence, SequenceStatus
from ringlinear.layers.moe import MoE, Router
from ringlinear.layers.norms import GroupRMSNorm, RMSNorm
from ringlinear.model import build_model


def dense_32b():
    return preset("ring-mini-linear-2.0").replace(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        intermediate_size=27648, num_experts=0, first_k_dense_replace=64, layer_group_size=1,
        num_nextn_predict_layers=0, vocab_size=152064, tie_word_embeddings=False)


@torch.no_grad()
def random_model(config, device, dtype):
    """Build on meta, materialise on the device, fill there (no CPU init of 16B floats): N(0, 0.02) matrices,
    zero biases and expert biases, unit norms, derived buffers recomputed."""
    model = build_model(config, "meta", dtype).to_empty(device=device)
    for p in model.parameters():
        p.normal_(0, 0.02) if p.dim() >= 2 else p.zero_()
    for mod in model.modules():
        if isinstance(mod, (RMSNorm, GroupRMSNorm)):
            mod.reset_parameters()
        elif isinstance(mod, Router) and mod.expert_bias is not None:
            mod.expert_bias.zero_()
    model.reset_buffers()
    return model.eval()


def copy_bandwidth(device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 1 << 28
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * n * 4 * 20 / (time.perf_counter() - t0)


def gemm_rate(device) -> float:
    """Measured dense bf16 GEMM rate, FLOP/s (8192^3, random data)."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0)


def prefill_flops_per_token(config, C: int) -> float:
    """Forward FLOPs per prompt token of a C-token prefill: 2 x activated non-embedding parameters, plus per
    softmax layer QK^T and PV over C/2 keys on average (4 H D C/2), per linear layer the chunked form (state
    update and readout 4 H D^2, intra-chunk 4 H D x 64/2)."""
    from ringlinear.accounting import model_stats

    s = model_stats(config)
    H, D = config.num_attention_heads, config.head_dim
    n_soft, n_lin = config.layer_types.count("softmax"), config.layer_types.count("linear")
    return 2 * s.active_params + n_soft * 4 * H * D * C / 2 + n_lin * (4 * H * D * D + 4 * H * D * 32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill_tps(engine: LLMEngine, C: int, device) -> float:
    ids = torch.randint(0, engine.config.vocab_size, (C,)).tolist()
    engine.add_request("prefill", ids, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    sync(device)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    return C / (time.perf_counter() - t0)


def fill_running(engine: LLMEngine, B: int, C: int) -> list[Sequence]:
    """B running sequences with C tokens already in the cache (random KV and states)."""
    sched, cache = engine.scheduler, engine.scheduler.cache
    seqs = []
    for b in range(B):
        seq = Sequence(f"dec{b}", [1] * C, SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True))
        seq.token_ids.append(2)  # one sampled token not yet in the cache: the next step decodes it
        cache.grow(seq, C)
        seq.num_computed = C
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
        engine._requests[seq.request_id] = Request(seq.request_id, None, seq.prompt_token_ids, seq.params, [seq])
        seqs.append(seq)
    for kv in cache.kv.values():
        kv.normal_()
    for st in cache.states.values():
        st.normal_(0, 0.01)
    return seqs


def decode_step_s(engine: LLMEngine, B: int, C: int, steps: int, device) -> tuple[float, float | None]:
    """(seconds per decode step of B sequences at context C, GPU seconds of the step's graph replay or None)."""
    seqs = fill_running(engine, B, C)
    engine.step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    host = 0.0
    for _ in range(steps):
        engine.step()
        host += engine.last_step_host_s
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    engine.bench_host_s = host / steps
    gpu = None
    graphs = engine.runner.graphs
    if graphs is not None and B <= graphs.max_batch:
        g = graphs.graphs[next(s for s in graphs.sizes if s >= B)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        start.record()
        for _ in range(steps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / 1e3 / steps
    for s in seqs:
        engine.abort_request(s.request_id)
    engine.step()
    return dt, gpu


def profile_prefill(engine: LLMEngine, C: int, top: int = 20) -> list[dict]:
    """Kernel time of one C-token prefill (after a warm-up prefill of the same length), the `top` kernels."""
    from torch.profiler import ProfilerActivity, profile

    prefill_tps(engine, C, engine.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        prefill_tps(engine, C, engine.device)
    wall = time.perf_counter() - t0
    return _kernel_table(prof, 1, f"one {C}-token prefill (wall {wall * 1e3:.1f} ms under the profiler)", top)


def profile_decode(engine: LLMEngine, B: int, C: int, steps: int, top: int = 25) -> list[dict]:
    """Kernel time per eager decode step (graphs off), the `top` kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    graphs, engine.runner.graphs = engine.runner.graphs, None
    seqs = fill_running(engine, B, C)
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    for s in seqs:
        engine.abort_request(s.request_id)
    engine.step()
    engine.runner.graphs = graphs
    return _kernel_table(prof, steps, f"eager decode step, B={B}, context {C}", top)


def _kernel_table(prof, steps: int, what: str, top: int) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith("ProfilerStep"):
            rows.append({"kernel": e.key[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps})
    rows = [r for r in rows if not r["kernel"].startswith(("aten::", "cuda", "Memcpy", "Memset")) or "Memcpy" in r["kernel"]]
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    print(f"\nkernel time per {what}: {total:.2f} ms in {sum(r['calls_per_step'] for r in rows):.0f} kernels")
    for r in rows[:top]:
        print(f"  {r['ms_per_step']:8.3f} ms  {r['calls_per_step']:6.1f} x  {r['kernel']}")
    return [{"total_ms_per_step": total}] + rows[:top]


def max_batch(engine: LLMEngine, C: int, cap: int) -> int:
    cache = engine.scheduler.cache
    per_seq = cache.blocks_for(C + 64) if cache.kv else 0
    by_kv = cache.layout.num_blocks // per_seq if per_seq else cap
    return max(1, min(cap, by_kv, cache.layout.num_slots))


def decode_floor_bytes(config, B: int, C: int, dtype_bytes: int = 2) -> float:
    """Bytes a decode step of B tokens at context C must read: weights (experts the B tokens touch, expected
    under uniform routing), KV of every softmax layer, linear states (read + write)."""
    model = build_model(config, "meta")
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    emb = model.model.word_embeddings.weight.numel()
    routed = sum(sum(p.numel() for p in (m.gate_proj, m.up_proj, m.down_proj)) for m in model.modules()
                 if isinstance(m, MoE))
    E, k = max(config.num_experts, 1), config.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** B) / E if config.num_experts else 0.0
    weights = (total - mtp - emb - routed + routed * touched) * dtype_bytes + B * config.hidden_size * dtype_bytes
    kv, state = cache_bytes(config, torch.bfloat16)
    return weights + B * (C * kv + 2 * state)


def run_model(name, config, contexts, args, device, dtype, bw, layer_scale=1.0, flops_rate=float("nan"),
              profiles=None) -> list[dict]:
    print(f"\n== {name}: {config.num_hidden_layers} layers, building random weights on {device}", flush=True)
    model = random_model(config, device, dtype)
    engine = LLMEngine(EngineConfig(device=str(device), max_num_seqs=args.max_batch,
                                    max_num_batched_tokens=args.chunk, gpu_memory_utilization=args.mem,
                                    cpu_cache_gib=args.cpu_cache_gib, enforce_eager=args.eager, verbose=True),
                       model=model)
    prefill_tps(engine, min(4096, engine.max_model_len - 1), device)  # warm-up: kernel compilation, autotuning
    rows = []
    for C in contexts:
        row = {"model": name, "context": C, "layer_scale": layer_scale}
        if C + 64 > engine.max_model_len:
            row["skipped"] = f"cache holds {engine.max_model_len} tokens"
            rows.append(row)
            print(row, flush=True)
            continue
        row["prefill_tok_s"] = prefill_tps(engine, C, device) / layer_scale
        row["prefill_mfu"] = row["prefill_tok_s"] * prefill_flops_per_token(config, C) / flops_rate
        mb = max_batch(engine, C, args.max_batch)
        for tag, B in (("b8", min(8, mb)), ("b64", min(64, mb)), ("max", mb)):
            if tag == "b64" and B <= 8:
                continue
            dt, gpu = decode_step_s(engine, B, C, args.decode_steps, device)
            dt *= layer_scale
            row[f"decode_{tag}_batch"] = B
            row[f"decode_{tag}_tok_s"] = B / dt
            row[f"decode_{tag}_step_ms"] = dt * 1e3
            row[f"decode_{tag}_host_ms"] = engine.bench_host_s * 1e3  # scheduling, launch, outputs
            if gpu is not None:
                row[f"decode_{tag}_gpu_ms"] = gpu * layer_scale * 1e3
            if tag == "b8" and engine.runner.graphs is not None and not args.skip_eager:  # same step without graphs
                graphs, engine.runner.graphs = engine.runner.graphs, None
                row["decode_b8_step_ms_eager"] = decode_step_s(engine, B, C, args.decode_steps, device)[0] \
                    * layer_scale * 1e3
                engine.runner.graphs = graphs
            if tag in ("b8", "b64"):
                floor = decode_floor_bytes(config, B, C) * layer_scale / bw
                row[f"decode_{tag}_floor_ms"] = floor * 1e3
                row[f"decode_{tag}_floor_ratio"] = dt / floor
        if profiles is not None and device.type == "cuda" and C == contexts[0]:
            profiles[name] = profile_decode(engine, min(8, mb), C, 3)
            profiles[name + "-prefill"] = profile_prefill(engine, C)
        rows.append(row)
        print(row, flush=True)
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], bw: float, rate: float = float("nan")) -> None:
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    by = {(r["model"], r["context"]): r for r in rows}
    ctxs = sorted({r["context"] for r in rows})
    hdr = ("context | hybrid prefill tok/s | twin | dense32B* | hybrid/twin | hybrid/dense | decode B=8 tok/s hybrid | "
           "twin | hybrid/twin | decode max-batch tok/s hybrid (B) | twin (B) | hybrid/twin | hybrid step / floor | "
           "hybrid B=8 step ms graphs / eager")
    print(hdr)

    def g(m, c, k):
        return by.get((m, c), {}).get(k, float("nan"))

    for c in ctxs:
        h, t, d = "hybrid", "softmax-twin", "dense-32B"
        print(f"{c} | {g(h, c, 'prefill_tok_s'):.0f} | {g(t, c, 'prefill_tok_s'):.0f} | {g(d, c, 'prefill_tok_s'):.0f} | "
              f"{g(h, c, 'prefill_tok_s') / g(t, c, 'prefill_tok_s'):.2f}x | "
              f"{g(h, c, 'prefill_tok_s') / g(d, c, 'prefill_tok_s'):.2f}x | "
              f"{g(h, c, 'decode_b8_tok_s'):.0f} | {g(t, c, 'decode_b8_tok_s'):.0f} | "
              f"{g(h, c, 'decode_b8_tok_s') / g(t, c, 'decode_b8_tok_s'):.2f}x | "
              f"{g(h, c, 'decode_max_tok_s'):.0f} ({g(h, c, 'decode_max_batch'):.0f}) | "
              f"{g(t, c, 'decode_max_tok_s'):.0f} ({g(t, c, 'decode_max_batch'):.0f}) | "
              f"{g(h, c, 'decode_max_tok_s') / g(t, c, 'decode_max_tok_s'):.2f}x | "
              f"{g(h, c, 'decode_b8_floor_ratio'):.2f}x | "
              f"{g(h, c, 'decode_b8_step_ms'):.1f} / {g(h, c, 'decode_b8_step_ms_eager'):.1f}")
    print("* dense 32B shape: a projection, measured with a slice of its layers, times scaled to 64 layers")
    print("\ncontext | hybrid prefill MFU | twin | B=8 step/floor | B=64 step/floor | host ms/step B=8 | B=64 | max B")
    for c in ctxs:
        h, t = "hybrid", "softmax-twin"
        print(f"{c} | {g(h, c, 'prefill_mfu'):.1%} | {g(t, c, 'prefill_mfu'):.1%} | {g(h, c, 'decode_b8_floor_ratio'):.2f}x | "
              f"{g(h, c, 'decode_b64_floor_ratio'):.2f}x | {g(h, c, 'decode_b8_host_ms'):.2f} | "
              f"{g(h, c, 'decode_b64_host_ms'):.2f} | {g(h, c, 'decode_max_host_ms'):.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="4096,16384,32768,65536,130048")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--dense-layers", type=int, default=16)
    ap.add_argument("--mem", type=float, default=0.92, help="gpu_memory_utilization")
    ap.add_argument("--models", default="hybrid,softmax-twin,dense-32B")
    ap.add_argument("--cpu-cache-gib", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="tiny preset, short contexts (CPU smoke run)")
    ap.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--skip-eager", action="store_true", help="no eager (graphs off) B=8 comparison")
    ap.add_argument("--profile", action="store_true", help="kernel-time table of eager decode steps (first context)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]
    base = preset("ring-mini-linear-2.0")
    dense, dense_layers = dense_32b(), args.dense_layers
    if args.quick:
        base = preset("tiny").replace(max_position_embeddings=4096)
        dense = base.replace(hidden_size=128, num_experts=0, first_k_dense_replace=base.num_hidden_layers,
                             layer_group_size=1, intermediate_size=256, num_nextn_predict_layers=0)
        dense_layers = base.num_hidden_layers // 2
        contexts = [256, 1024]
        args.decode_steps, args.chunk, args.max_batch = 3, 256, 8
    bw = copy_bandwidth(device)
    rate = gemm_rate(device)
    profiles = {} if args.profile else None
    models = {
        "hybrid": (base, 1.0),
        "softmax-twin": (base.replace(layer_group_size=1), 1.0),
        "dense-32B": (dense.replace(num_hidden_layers=dense_layers, first_k_dense_replace=dense_layers),
                      dense.num_hidden_layers / dense_layers),
    }
    rows = []
    for name in args.models.split(","):
        cfg, scale = models[name]
        try:
            rows += run_model(name, cfg, contexts, args, device, dtype, bw, scale, rate, profiles)
        except Exception as e:  # noqa: BLE001 - report what ran; the failure is printed and recorded
            import traceback

            traceback.print_exc()
            rows.append({"model": name, "context": 0, "error": repr(e)[:300]})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.json:  # after every model, so a run cut short keeps what it measured
            meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "copy_Bps": bw, "bf16_gemm_flops": rate, "args": vars(args)}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows, "profiles": profiles}, f, indent=2)
    report(rows, bw, rate)


if __name__ == "__main__":
    main()
