"""The fused inference norms (`ringlinear.ops.fused_norms`) against the PyTorch compositions the layers run today,
at Ring-mini shapes (hidden 2048, H 16, Hkv 4, D 128, rotary 64, group norm 4, bf16): per op and token count, the
kernels one call launches (torch.profiler), the time per call eager and replayed from a CUDA graph, and the bytes
it must move (read + written) over that time as a fraction of the device's copy bandwidth. A correctness check
(fused vs reference) runs first. Prints a table; --json PATH writes every number.

    python benchmarks/bench_fused_norms.py --json out.json [--tokens 8,64,16384] [--reps 20]
    python benchmarks/bench_fused_norms.py --check-only [--device cpu]   # the check alone (TRITON_INTERPRET=1 on a CPU)

Ops: `qk_softmax` (the softmax layer's qkv [T, 24*128] -> q, k, v), `qk_linear` (the linear layer's [T, 48*128]),
`norm_gate` (group RMSNorm of o [T, 2048] times sigmoid(gate)), `add_norm` (residual add + RMSNorm of [T, 2048]).
"layer" is today's composition (its norms through `ops.rmsnorm`, the Triton RMSNorm on CUDA), "naive" the pure
PyTorch reference. Each timed call runs `--reps` times over distinct buffers (as `--reps` layers of one step
would; fewer for large T, up to ~1 GB of inputs) and is reported per call.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
from common import bench, copy_bandwidth, graph_of

from ringlinear.ops.backend import use_backend
from ringlinear.ops.fused_norms import naive_add_rmsnorm, naive_group_rmsnorm_gate, naive_qk_norm_rope, naive_rope
from ringlinear.ops.fused_norms.fused import fused_add_rmsnorm, fused_group_rmsnorm_gate, fused_qk_norm_rope
from ringlinear.ops.rmsnorm import rmsnorm

MINI = dict(hidden=2048, H=16, Hkv=4, D=128, rot=64, groups=4, eps=1e-6, theta=1e6)
DT = torch.bfloat16


DEV = "cuda"


def _randn(T, W, g):
    return torch.randn(T, W, device=DEV, generator=g).to(DT)


def _weight(n, g):
    return (torch.rand(n, device=DEV, generator=g) + 0.5).to(DT)


def _qk_inputs(T, heads_kv, g):
    m = MINI
    width = (m["H"] + 2 * heads_kv) * m["D"]
    exps = torch.arange(0, m["rot"], 2, dtype=torch.float64) / m["rot"]
    return dict(qkv=_randn(T, width, g), qw=_weight(m["D"], g), kw=_weight(m["D"], g),
                pos=torch.randint(0, 500_000, (T,), device=DEV, generator=g),
                inv_freq=(1.0 / m["theta"] ** exps).float().to(DEV))


# ---- today's layer compositions (layers/softmax_attention.py, linear_attention.py, model.py) ----

def layer_qk_softmax(a):
    T = a["qkv"].shape[0]
    m = MINI
    qkv = a["qkv"].view(T, m["H"] + 2 * m["Hkv"], m["D"])
    q, k, v = qkv.split([m["H"], m["Hkv"], m["Hkv"]], dim=1)
    q, k = rmsnorm(q.float(), a["qw"], m["eps"]), rmsnorm(k.float(), a["kw"], m["eps"])
    q = naive_rope(q, a["pos"], a["inv_freq"], m["rot"]).to(DT)
    k = naive_rope(k, a["pos"], a["inv_freq"], m["rot"]).to(DT)
    return q, k, v.contiguous()


def layer_qk_linear(a, silu=False):
    T = a["qkv"].shape[0]
    m = MINI
    qkv = a["qkv"].float().view(T, 3 * m["H"], m["D"])
    if silu:
        qkv = torch.nn.functional.silu(qkv)
    q, k, v = qkv.split(m["H"], dim=1)
    q, k = rmsnorm(q, a["qw"], m["eps"]), rmsnorm(k, a["kw"], m["eps"])
    q, k = naive_rope(q, a["pos"], a["inv_freq"], m["rot"]), naive_rope(k, a["pos"], a["inv_freq"], m["rot"])
    return q.to(DT), k.to(DT), v.to(DT)


def layer_norm_gate(a):
    return rmsnorm(a["o"], a["w"], MINI["eps"], MINI["groups"]) * torch.sigmoid(a["gate"])


def layer_add_norm(a):
    h = a["r"] + a["x"]
    return rmsnorm(h, a["w"], MINI["eps"]), h


def _qk_args(a, heads_kv):
    m = MINI
    return (a["qkv"], m["H"], heads_kv, m["D"], a["qw"], a["kw"], m["eps"], a["pos"], a["inv_freq"], m["rot"])


OPS = {  # name: (make inputs(T, g), layer, naive, fused, bytes moved per call)
    "qk_softmax": (lambda T, g: _qk_inputs(T, MINI["Hkv"], g), layer_qk_softmax,
                   lambda a: naive_qk_norm_rope(*_qk_args(a, MINI["Hkv"])),
                   lambda a: fused_qk_norm_rope(*_qk_args(a, MINI["Hkv"])),
                   lambda T: 2 * T * (MINI["H"] + 2 * MINI["Hkv"]) * MINI["D"] * 2),
    "qk_linear": (lambda T, g: _qk_inputs(T, MINI["H"], g), layer_qk_linear,
                  lambda a: naive_qk_norm_rope(*_qk_args(a, MINI["H"])),
                  lambda a: fused_qk_norm_rope(*_qk_args(a, MINI["H"])),
                  lambda T: 2 * T * 3 * MINI["H"] * MINI["D"] * 2),
    "norm_gate": (lambda T, g: dict(o=_randn(T, MINI["hidden"], g), gate=_randn(T, MINI["hidden"], g),
                                    w=_weight(MINI["hidden"], g)),
                  layer_norm_gate,
                  lambda a: naive_group_rmsnorm_gate(a["o"], a["w"], MINI["groups"], MINI["eps"], a["gate"]),
                  lambda a: fused_group_rmsnorm_gate(a["o"], a["w"], MINI["groups"], MINI["eps"], a["gate"]),
                  lambda T: 3 * T * MINI["hidden"] * 2),
    "add_norm": (lambda T, g: dict(x=_randn(T, MINI["hidden"], g), r=_randn(T, MINI["hidden"], g),
                                   w=_weight(MINI["hidden"], g)),
                 layer_add_norm,
                 lambda a: naive_add_rmsnorm(a["x"], a["r"], a["w"], MINI["eps"]),
                 lambda a: fused_add_rmsnorm(a["x"], a["r"], a["w"], MINI["eps"]),
                 lambda T: 4 * T * MINI["hidden"] * 2),
}

def _outs(x):
    return x if isinstance(x, tuple) else (x,)


def correctness(name: str, T: int) -> dict:
    make, layer, naive, fused, _ = OPS[name]
    g = torch.Generator(device=DEV).manual_seed(T)
    a = make(T, g)
    with torch.no_grad():
        ref, out, lay = _outs(naive(a)), _outs(fused(a)), _outs(layer(a))
    res = {"op": name, "T": T, "rel_vs_naive": 0.0, "bits_equal": 1.0, "within_1ulp": 1.0, "layer_rel_vs_naive": 0.0}
    for o, r, la in zip(out, ref, lay):
        if not torch.isfinite(o).all():
            res["rel_vs_naive"] = float("nan")
            continue
        rn = r.float().norm().clamp_min(1e-30)
        res["rel_vs_naive"] = max(res["rel_vs_naive"], ((o.float() - r.float()).norm() / rn).item())
        res["layer_rel_vs_naive"] = max(res["layer_rel_vs_naive"], ((la.float() - r.float()).norm() / rn).item())
        res["bits_equal"] = min(res["bits_equal"], (o == r).float().mean().item())
        _, e = torch.frexp(r.float())
        ulps = (o.float() - r.float()).abs() / torch.ldexp(torch.ones_like(r, dtype=torch.float32), e - 8)
        res["within_1ulp"] = min(res["within_1ulp"], (ulps <= 1).float().mean().item())
    res["ok"] = res["rel_vs_naive"] < 1e-2 and res["within_1ulp"] >= 0.99
    return res








def kernels_per_call(fn) -> int:
    """Device operations (kernels, copies, memsets) one call launches, counted by torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def run_reps(fn, inputs):
    for a in inputs:
        fn(a)


def rows_for(name: str, T: int, reps: int, bw: float) -> dict:
    make, layer, naive, fused, nbytes = OPS[name]
    g = torch.Generator(device=DEV).manual_seed(T + 1)
    reps = max(1, min(reps, (1 << 30) // max(1, nbytes(T))))
    inputs = [make(T, g) for _ in range(reps)]
    row = {"op": name, "T": T, "reps": reps, "MB": nbytes(T) / 1e6}
    for key, fn in (("layer", layer), ("naive", naive), ("fused", fused)):
        row[f"{key}_kernels"] = kernels_per_call(partial(fn, inputs[0]))
        step = partial(run_reps, fn, inputs)
        row[f"{key}_us"] = bench(step) * 1e3 / reps
        graph = graph_of(step)
        row[f"{key}_graph_us"] = bench(graph.replay) * 1e3 / reps if graph is not None else float("nan")
        del graph
        for mode in ("", "_graph"):
            row[f"{key}{mode}_frac"] = nbytes(T) / (row[f"{key}{mode}_us"] * 1e-6) / bw
    print(f"  {name:10s} T={T:6d} {row['MB']:8.2f} MB | kernels {row['layer_kernels']:2d} / {row['naive_kernels']:2d} "
          f"/ {row['fused_kernels']:2d} | eager {row['layer_us']:8.1f} / {row['naive_us']:8.1f} / "
          f"{row['fused_us']:8.1f} us | graph {row['layer_graph_us']:8.1f} / {row['naive_graph_us']:8.1f} / "
          f"{row['fused_graph_us']:8.1f} us | fused graph {row['fused_graph_frac']:.2f} of copy bw, "
          f"{row['layer_graph_us'] / row['fused_graph_us']:.1f}x the layer", flush=True)
    return row


def main() -> None:
    global DEV
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8,64,16384")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--reps", type=int, default=20, help="calls per timed step, each on its own buffers")
    ap.add_argument("--check-only", action="store_true", help="run the correctness check alone")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_fused_norms.py needs CUDA (or --check-only --device cpu under TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    ops = args.ops.split(",")
    result = {"shapes": MINI, "dtype": str(DT), "checks": [], "rows": []}
    with torch.no_grad(), use_backend("triton"):
        for name in ops:
            for T in (tokens if not args.check_only or DEV == "cuda" else [1, 8]):
                c = correctness(name, T)
                result["checks"].append(c)
                print(f"  check {name} T={T}: {'ok' if c['ok'] else 'FAILED'} {c}", flush=True)
        if not args.check_only:
            bw = copy_bandwidth()
            result.update(device=torch.cuda.get_device_name(), copy_TBps=bw / 1e12)
            print(f"{result['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); per call: "
                  "kernels layer / naive / fused, time layer / naive / fused")
            for name in ops:
                for T in tokens:
                    result["rows"].append(rows_for(name, T, args.reps, bw))
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
