"""Lightning attention kernels on the device: our Triton prefill (fwd, fwd+bwd) and decode against
flash-linear-attention 0.6 `chunk_simple_gla`, the PyTorch reference, SDPA causal, and the measured copy
bandwidth / bf16 matmul rate of the same run. Prints tables; --json PATH writes every number.

    python benchmarks/bench_lightning.py --json out.json     (needs CUDA; fla optional, from carried wheels)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial

import torch
from common import kernel_times
from triton.testing import do_bench

from ringlinear.ops.lightning import chunk as chunk_mod
from ringlinear.ops.lightning import decay_slopes, naive_chunk_lightning_attn, naive_lightning_decode
from ringlinear.ops.lightning import fused_recurrent as decode_mod
from ringlinear.ops.lightning.chunk import chunk_lightning_attn
from ringlinear.ops.lightning.fused_recurrent import fused_recurrent_lightning_decode

H, D = 16, 128
SIZES = [(1, 32768), (4, 8192), (1, 131072), (4, 32768)]


def bench(fn, rep=200, warmup=50) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_slow(fn, n=3) -> float:
    """Median of n event-timed runs after one warm-up, for functions that take 100s of ms."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def rel(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ceilings() -> dict:
    n = 1 << 28  # 1 GiB of fp32: far past L2
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    t = bench(partial(dst.copy_, src))
    copy_tbs = 2 * n * 4 / t / 1e9
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = bench(lambda: a @ b)
    mm = 2 * 8192**3 / t / 1e9
    return {"copy_TBps": copy_tbs, "bf16_matmul_TFLOPs": mm}


def make(B, T, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # QK-normed q, k have unit-RMS rows in the model; random normal rows are the same scale.
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype) for _ in range(3))
    g = decay_slopes(H, 1, 20).cuda()
    return q, k, v, g


def fla_fns():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - report why the peer is missing, keep benchmarking ours
        print(f"fla not importable: {e!r}")
        return None
    return chunk_simple_gla


def flops(B, T) -> float:
    # Dense work of the chunked form (chunk 64): QK^T and A V per chunk, q S and k^T v per token.
    return B * T * H * (2 * 64 * (D + D) + 4 * D * D)


def correctness(fla) -> dict:
    B, T = 2, 8192 + 33
    q, k, v, g = make(B, T, seed=1)
    s0 = torch.randn(B, H, D, D, device="cuda")
    out = {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    rleaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o, s = chunk_lightning_attn(*leaves[:3], g, initial_state=leaves[3], output_final_state=True)
    ro, rs = naive_chunk_lightning_attn(*rleaves[:3], g, initial_state=rleaves[3], output_final_state=True)
    do, ds = torch.randn_like(ro), torch.randn_like(rs)
    torch.autograd.backward([o, s], [do, ds])
    torch.autograd.backward([ro, rs], [do, ds])
    out["ours_o"], out["ours_state"] = rel(o, ro), rel(s, rs)
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), leaves, rleaves):
        out[f"ours_{name}"] = rel(a.grad, b.grad)
    if fla is not None:
        gt = g[None, None].expand(B, T, H).contiguous()
        fo, fs = fla(q, k, v, g=gt, initial_state=s0, output_final_state=True)
        out["fla_g_o"], out["fla_g_state"] = rel(fo, ro), rel(fs, rs)
        fo, fs = fla(q, k, v, g_gamma=g, initial_state=s0, output_final_state=True)
        out["fla_gamma_o"], out["fla_gamma_state"] = rel(fo, ro), rel(fs, rs)
    return out


def seg_sweep() -> list[dict]:
    rows = []
    for B, T in [(1, 32768), (1, 131072)]:
        q, k, v, g = make(B, T)
        default = chunk_mod._default_seg_chunks(B * T, H, True)
        for sc in (4, 8, 16, 32, 64):
            t = bench(partial(chunk_lightning_attn, q, k, v, g, seg_chunks=sc))
            rows.append({"B": B, "T": T, "seg_chunks": sc, "default": sc == default, "fwd_ms": t})
    return rows


def breakdown(B=1, T=32768) -> dict:
    q, k, v, g = make(B, T)
    return kernel_times(partial(chunk_lightning_attn, q, k, v, g), 20)


def forward_table(fla) -> list[dict]:
    rows = []
    for B, T in SIZES:
        q, k, v, g = make(B, T)
        row = {"B": B, "T": T, "ours_ms": bench(partial(chunk_lightning_attn, q, k, v, g))}
        if fla is not None:
            gt = g[None, None].expand(B, T, H).contiguous()
            row["fla_g_ms"] = bench(partial(fla, q, k, v, g=gt))
            row["fla_gamma_ms"] = bench(partial(fla, q, k, v, g_gamma=g))
            row["fla_g_over_ours"] = row["fla_g_ms"] / row["ours_ms"]
            row["fla_gamma_over_ours"] = row["fla_gamma_ms"] / row["ours_ms"]
        qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
        sdpa = partial(torch.nn.functional.scaled_dot_product_attention, qs, ks, vs, is_causal=True)
        row["sdpa_ms"] = bench(sdpa, rep=100, warmup=20) if T <= 32768 else bench_slow(sdpa, n=3)
        row["sdpa_over_ours"] = row["sdpa_ms"] / row["ours_ms"]
        row["ours_TFLOPs"] = flops(B, T) / row["ours_ms"] / 1e9
        rows.append(row)
        print(row, flush=True)
    return rows


def _step(fn, leaves, decay, do, **kw):
    """One forward + backward to q, k, v (no .grad accumulation). decay=None: the decay is in kw (fla)."""
    o = (fn(*leaves, decay, **kw) if decay is not None else fn(*leaves, **kw))[0]
    return torch.autograd.grad(o, leaves, do)


def fwd_bwd_table(fla) -> list[dict]:
    rows = []
    for B, T in SIZES:
        q, k, v, g = make(B, T)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        do = torch.randn(B, T, H, D, device="cuda", dtype=q.dtype)
        row = {"B": B, "T": T, "ours_ms": bench(partial(_step, chunk_lightning_attn, leaves, g, do))}
        row["ref_ms"] = bench_slow(partial(_step, naive_chunk_lightning_attn, leaves, g, do), n=3 if T <= 32768 else 1)
        row["ref_over_ours"] = row["ref_ms"] / row["ours_ms"]
        if fla is not None:
            for name, kw in (("fla_gamma", {"g_gamma": g}), ("fla_g", {"g": g[None, None].expand(B, T, H).contiguous()})):
                try:
                    row[f"{name}_ms"] = bench(partial(_step, fla, leaves, None, do, **kw))
                    row[f"{name}_over_ours"] = row[f"{name}_ms"] / row["ours_ms"]
                except Exception as e:  # noqa: BLE001 - fla's gated backward refuses this Triton on Hopper
                    row[f"{name}_error"] = repr(e)[:160]
        rows.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    return rows


def decode_tables(copy_tbs: float) -> tuple[list[dict], list[dict]]:
    g = decay_slopes(H, 1, 20).cuda()

    def setup(N):
        pool = torch.randn(N + 8, H, D, D, device="cuda") * 0.1
        slots = torch.randperm(N + 8, device="cuda")[:N]
        q, k, v = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        return q, k, v, pool, slots

    sweep = []
    q, k, v, pool, slots = setup(256)
    nbytes = 256 * H * D * D * 4 * 2
    base = dict(decode_mod.DECODE_CONFIG)
    for bv in (16, 32, 64, 128):
        for w in (1, 2, 4, 8):
            if bv * D // (32 * w) > 128 or bv * D // (32 * w) < 8:  # > 128 fp32 per thread spills; < 8 idles lanes
                continue
            decode_mod.DECODE_CONFIG.update(BV=bv, num_warps=w)
            t = bench(partial(fused_recurrent_lightning_decode, q, k, v, g, pool, slots))
            sweep.append({"BV": bv, "num_warps": w, "ms": t, "TBps": nbytes / t / 1e9})
    decode_mod.DECODE_CONFIG.update(base)
    rows = []
    for N in (1, 64, 256):
        q, k, v, pool, slots = setup(N)
        nbytes = N * H * D * D * 4 * 2
        fn = partial(fused_recurrent_lightning_decode, q, k, v, g, pool, slots)
        t = bench(fn)
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        tg = bench(graph.replay)
        tr = bench(partial(naive_lightning_decode, q, k, v, g, pool, slots))
        rows.append({"N": N, "ours_ms": t, "ours_graph_ms": tg, "torch_ms": tr, "ours_TBps": nbytes / t / 1e9,
                     "ours_graph_TBps": nbytes / tg / 1e9, "graph_pct_of_copy": 100 * nbytes / tg / 1e9 / copy_tbs})
        print(rows[-1], flush=True)
    return sweep, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: sweep,breakdown,fwd,bwd,decode")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    fla = fla_fns()
    res["ceilings"] = ceilings()
    print("ceilings", res["ceilings"], flush=True)
    res["correctness"] = correctness(fla)
    print("correctness (rel err vs naive_chunk_lightning_attn, B=2 T=8225 bf16)", res["correctness"], flush=True)
    if "sweep" not in skip:
        res["seg_sweep"] = seg_sweep()
        print("seg_sweep", res["seg_sweep"], flush=True)
    if "breakdown" not in skip:
        res["breakdown_32k"] = breakdown()
        print("breakdown", res["breakdown_32k"], flush=True)
    if "fwd" not in skip:
        res["forward"] = forward_table(fla)
    if "bwd" not in skip:
        res["fwd_bwd"] = fwd_bwd_table(fla)
    if "decode" not in skip:
        res["decode_sweep"], res["decode"] = decode_tables(res["ceilings"]["copy_TBps"])
    res["autotuned"] = {
        name: {str(k): str(v) for k, v in getattr(fn, "cache", {}).items()}
        for name, fn in (("segment_state", chunk_mod._state_tuned), ("segment_output", chunk_mod._output_tuned))
    }
    res["wall_s"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    report(res)


def _fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(res: dict) -> None:
    c = res["ceilings"]
    print(f"\n# {res['device']}  torch {res['torch']}  triton {res['triton']}  "
          f"copy {c['copy_TBps']:.2f} TB/s  bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print("correctness:", {k: f"{v:.1e}" for k, v in res["correctness"].items()})
    if "forward" in res:
        print("\nforward, H=16 D=128 bf16 | ours ms | fla(g) ms | fla(g)/ours | fla(gamma) ms | fla(gamma)/ours | SDPA ms | SDPA/ours | TFLOP/s | % matmul")
        for r in res["forward"]:
            print(f"B={r['B']} T={r['T']} | {_fmt(r['ours_ms'])} | {_fmt(r.get('fla_g_ms'))} | {_fmt(r.get('fla_g_over_ours'), '.2f')} | "
                  f"{_fmt(r.get('fla_gamma_ms'))} | {_fmt(r.get('fla_gamma_over_ours'), '.2f')} | {_fmt(r['sdpa_ms'], '.2f')} | "
                  f"{_fmt(r['sdpa_over_ours'], '.1f')} | {r['ours_TFLOPs']:.0f} | {100 * r['ours_TFLOPs'] / c['bf16_matmul_TFLOPs']:.1f}")
    if "fwd_bwd" in res:
        print("\nfwd+bwd | ours ms | torch ref ms | ref/ours | fla(gamma) ms | fla(gamma)/ours | fla(g)")
        for r in res["fwd_bwd"]:
            print(f"B={r['B']} T={r['T']} | {_fmt(r['ours_ms'])} | {_fmt(r['ref_ms'], '.1f')} | {_fmt(r['ref_over_ours'], '.0f')} | "
                  f"{_fmt(r.get('fla_gamma_ms'))} | {_fmt(r.get('fla_gamma_over_ours'), '.2f')} | "
                  f"{'raises' if 'fla_g_error' in r else _fmt(r.get('fla_g_ms'))}")
    if "decode" in res:
        print("\ndecode (H=16 D=128, fp32 state) | ours ms | graph ms | torch ms | graph TB/s | % of copy")
        for r in res["decode"]:
            print(f"N={r['N']} | {r['ours_ms']:.4f} | {r['ours_graph_ms']:.4f} | {r['torch_ms']:.4f} | "
                  f"{r['ours_graph_TBps']:.2f} | {r['graph_pct_of_copy']:.0f}")
    print(f"\nwall {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
