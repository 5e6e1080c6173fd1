"""Decode MoE layer on the device: today's path (router GEMM + `grouped_topk`, then `routed_experts`' grouped GEMMs)
against the fused router + `fused_moe`, eager and replayed from a CUDA graph, as a fraction of the copy bandwidth
(bytes read + written) for the expert bytes a step touches (distinct experts x 3 x I x H x 2 B). Prints tables;
--json PATH writes every number; --sweep times fused_moe tilings at decode sizes and prints the best config.

    python benchmarks/bench_moe.py --json out.json [--models mini,flash] [--tokens 1,8,32,64,256] [--sweep]

Each timed step runs `--layers` MoE layers with their own weights and routers (as a decode step does), so experts
are not served from L2 by the previous call; times and bytes are per layer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from common import bench, copy_bandwidth, graph_ms, graph_of, kernel_times

from ringlinear.ops.moe import grouped_topk, routed_experts
from ringlinear.ops.moe.fused_moe import FusedMoEConfig, fused_moe
from ringlinear.ops.moe.fused_routing import fused_router_topk, router_counters
from ringlinear.ops.moe.naive import naive_moe, naive_router_topk

DEV = "cuda"
MODELS = {  # Ring-mini-linear-2.0 and Ring-flash-linear-2.0 MoE layers (routing as in their config.json)
    "mini": dict(H=2048, I=512, E=256, k=8, n_group=8, topk_group=4, scale=2.5),
    "flash": dict(H=4096, I=1024, E=256, k=8, n_group=8, topk_group=4, scale=2.5),
}


@dataclass
class Layer:
    router: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32
    w_gate: torch.Tensor  # [E, I, H] bf16
    w_up: torch.Tensor
    w_down: torch.Tensor  # [E, H, I]


def make_layers(m: dict, n: int, seed: int = 0) -> list[Layer]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    H, ff, E = m["H"], m["I"], m["E"]

    def rnd(*shape, scale):
        return (torch.randn(*shape, device=DEV, generator=g) * scale).to(torch.bfloat16)

    return [Layer(torch.randn(E, H, device=DEV, generator=g) / H**0.5,
                  0.05 * torch.randn(E, device=DEV, generator=g),
                  rnd(E, ff, H, scale=H**-0.5), rnd(E, ff, H, scale=H**-0.5), rnd(E, H, ff, scale=ff**-0.5))
            for _ in range(n)]










def baseline_route(layer: Layer, x, m):
    return grouped_topk(F.linear(x.float(), layer.router), layer.bias, m["k"], m["n_group"], m["topk_group"], True,
                        m["scale"])


def fused_route(layer: Layer, x, m, counters):
    return fused_router_topk(x, layer.router, layer.bias, m["k"], m["n_group"], m["topk_group"], True, m["scale"],
                             counters=counters)


def base_step(layers, m, x):
    for la in layers:
        idx, w = baseline_route(la, x, m)
        routed_experts(x, idx, w, la.w_gate, la.w_up, la.w_down)


def fused_step(layers, m, x, counters, config):
    for la in layers:
        idx, w = fused_route(la, x, m, counters)
        fused_moe(x, idx, w, la.w_gate, la.w_up, la.w_down, config=config)


def moe_step(layers, x, routes, config):
    for la, (idx, w) in zip(layers, routes):
        fused_moe(x, idx, w, la.w_gate, la.w_up, la.w_down, config=config)


def route_step(route, layers, m, x, *extra):
    for la in layers:
        route(la, x, m, *extra)


def correctness(m: dict, layer: Layer, T: int) -> dict:
    x = torch.randn(T, m["H"], device=DEV).to(torch.bfloat16)
    idx, w = fused_route(layer, x, m, None)
    ridx, rw = naive_router_topk(x, layer.router, layer.bias, m["k"], m["n_group"], m["topk_group"], True, m["scale"])
    out = fused_moe(x, idx, w, layer.w_gate, layer.w_up, layer.w_down)
    ref = naive_moe(x, idx, w, layer.w_gate, layer.w_up, layer.w_down)
    base = routed_experts(x, idx, w, layer.w_gate, layer.w_up, layer.w_down)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item() if torch.isfinite(a).all() else float("nan")

    res = {"T": T, "route_idx_equal": bool(torch.equal(idx, ridx)), "route_w_maxdiff": (w - rw).abs().max().item(),
           "moe_rel_vs_naive": rel(out, ref), "grouped_mm_rel_vs_naive": rel(base, ref)}
    res["ok"] = res["route_idx_equal"] and res["route_w_maxdiff"] < 1e-5 and res["moe_rel_vs_naive"] < 1e-2
    return res


def touched_bytes(m: dict, layers: list[Layer], x) -> float:
    """Expert bytes per layer: distinct experts chosen x 3 matrices x I x H x 2 B, averaged over the layers."""
    n = sum(fused_route(la, x, m, None)[0].unique().numel() for la in layers)
    return n / len(layers) * 3 * m["I"] * m["H"] * 2


def rows_for(name: str, m: dict, layers: list[Layer], tokens: list[int], bw: float, config: FusedMoEConfig) -> list:
    rows = []
    L = len(layers)
    for T in tokens:
        x = torch.randn(T, m["H"], device=DEV).to(torch.bfloat16)
        counters = router_counters(T, DEV)
        routes = [fused_route(la, x, m, counters) for la in layers]

        nbytes = touched_bytes(m, layers, x)
        row = {"model": name, "T": T, "expert_MB": nbytes / 1e6}
        fns = {"base": partial(base_step, layers, m, x), "fused": partial(fused_step, layers, m, x, counters, config),
               "fused_moe_only": partial(moe_step, layers, x, routes, config),
               "base_route": partial(route_step, baseline_route, layers, m, x),
               "fused_route": partial(route_step, fused_route, layers, m, x, counters)}
        for key, fn in fns.items():
            row[f"{key}_us"] = bench(fn) * 1e3 / L
            graph = graph_of(fn)
            row[f"{key}_graph_us"] = bench(graph.replay) * 1e3 / L if graph is not None else float("nan")
            del graph
        for key in ("base", "fused", "fused_moe_only"):
            for mode in ("", "_graph"):
                row[f"{key}{mode}_frac"] = nbytes / (row[f"{key}{mode}_us"] * 1e-6) / bw
        rows.append(row)
        print(f"  {name:5s} T={T:4d} {row['expert_MB']:8.1f} MB | base {row['base_us']:8.1f} / "
              f"{row['base_graph_us']:8.1f} us ({row['base_graph_frac']:.2f}) | fused {row['fused_us']:8.1f} / "
              f"{row['fused_graph_us']:8.1f} us ({row['fused_graph_frac']:.2f}) | fused_moe "
              f"{row['fused_moe_only_us']:8.1f} / {row['fused_moe_only_graph_us']:8.1f} us ({row['fused_moe_only_graph_frac']:.2f}) | route "
              f"{row['base_route_graph_us']:6.1f} -> {row['fused_route_graph_us']:6.1f} us", flush=True)
    return rows


def breakdown(m: dict, layers: list[Layer], T: int, config: FusedMoEConfig) -> dict:
    """Device time per kernel of the fused path (router + fused_moe), us per layer."""
    x = torch.randn(T, m["H"], device=DEV).to(torch.bfloat16)
    counters = router_counters(T, DEV)
    times = kernel_times(partial(fused_step, layers, m, x, counters, config), 10)
    return {k: ms * 1e3 / len(layers) for k, ms in times.items()}


def _candidates(stage: str, base: FusedMoEConfig) -> list[FusedMoEConfig]:
    if stage == "gate_up":
        grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4))
        return [replace(base, gate_up_block_n=n, gate_up_block_k=k, gate_up_warps=w, gate_up_stages=s)
                for n, k, w, s in grid]
    if stage == "down":
        grid = itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4))
        return [replace(base, down_block_n=n, down_block_k=k, down_warps=w, down_stages=s) for n, k, w, s in grid]
    return [replace(base, block_m=bm) for bm in (16, 32, 64)]


def sweep(name: str, m: dict, layers: list[Layer], tokens: list[int], bw: float) -> dict:
    """Coordinate search: gate/up tiles, then down tiles, then block_m; each config scored by the smallest fraction
    of copy bandwidth over `tokens` (fused_moe alone, eager, routing precomputed)."""
    cases = []
    for T in tokens:
        x = torch.randn(T, m["H"], device=DEV).to(torch.bfloat16)
        cases.append((T, x, [fused_route(la, x, m, None) for la in layers], touched_bytes(m, layers, x)))

    def score(cfg):
        fracs = {}
        for T, x, routes, nbytes in cases:
            fracs[T] = nbytes / (bench(partial(moe_step, layers, x, routes, cfg), rep=50) * 1e-3 / len(layers)) / bw
        return min(fracs.values()), fracs

    best = FusedMoEConfig()
    best_score, best_fracs = score(best)
    log = [{"stage": "default", "config": asdict(best), "fracs": best_fracs}]
    for stage in ("gate_up", "down", "block_m"):
        results = []
        for cfg in _candidates(stage, best):
            try:
                s, fracs = score(cfg)
            except Exception as e:  # noqa: BLE001 - a tiling that does not fit (shared memory, registers) is skipped
                print(f"    skip {cfg}: {type(e).__name__}")
                continue
            results.append((s, cfg, fracs))
            log.append({"stage": stage, "config": asdict(cfg), "fracs": fracs})
        results.sort(key=lambda r: -r[0])
        print(f"  {name} {stage}: top configs (min fraction over T={tokens})")
        for s, cfg, fracs in results[:5]:
            print(f"    {s:.3f} {' '.join(f'T{t}={f:.3f}' for t, f in fracs.items())}  {cfg}")
        if results and results[0][0] > best_score:
            best_score, best, best_fracs = results[0][0], results[0][1], results[0][2]
    print(f"  {name} best: {best}  ({' '.join(f'T{t}={f:.3f}' for t, f in best_fracs.items())})", flush=True)
    return {"best": asdict(best), "best_fracs": best_fracs, "log": log}


def router_sweep(name: str, m: dict, layers: list[Layer], tokens: list[int]) -> list[dict]:
    """Router time per layer (CUDA graph of `layers` routers) over RouterConfig variants, fused and gemm logits."""
    from ringlinear.ops.moe.fused_routing import RouterConfig

    variants = [RouterConfig(), RouterConfig(logits="gemm")]
    variants += [RouterConfig(logits="split", block_e=be, split_h=sh) for be in (16, 32, 64) for sh in (128, 256, 512)]
    out = []
    for T in tokens:
        x = torch.randn(T, m["H"], device=DEV, dtype=torch.bfloat16)
        base = 1e3 * graph_ms(lambda x=x: [baseline_route(la, x, m) for la in layers]) / len(layers)
        print(f"  {name} router T={T}: today's path {base:.1f} us/layer", flush=True)
        for cfg in variants:
            def run(x=x, cfg=cfg):
                return [fused_router_topk(x, la.router, la.bias, m["k"], m["n_group"], m["topk_group"], True,
                                          m["scale"], config=cfg) for la in layers]
            t = 1e3 * graph_ms(run) / len(layers)
            out.append({"T": T, "config": asdict(cfg), "us_per_layer": t, "today_us_per_layer": base})
            print(f"    {t:7.1f} us/layer  {cfg}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mini,flash")
    ap.add_argument("--tokens", default="1,8,32,64,256")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers per timed step (own weights each)")
    ap.add_argument("--sweep", action="store_true", help="search fused_moe tilings first and time with the best")
    ap.add_argument("--sweep-tokens", default="8,64")
    ap.add_argument("--router-sweep", action="store_true", help="time router configs (fused / gemm logits) only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs CUDA")
    torch.manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "copy_TBps": bw / 1e12, "layers": args.layers,
              "checks": {}, "rows": [], "sweep": {}, "breakdown": {}}
    print(f"{result['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    for name in args.models.split(","):
        m = MODELS[name]
        layers = make_layers(m, args.layers)
        if args.router_sweep:
            result["router_sweep"] = router_sweep(name, m, layers, tokens)
            continue
        checks = [correctness(m, layers[0], T) for T in (1, 64)]
        result["checks"][name] = checks
        for c in checks:
            print(f"  check {name} T={c['T']}: {'ok' if c['ok'] else 'FAILED'} {c}")
        config = FusedMoEConfig()
        if args.sweep:
            result["sweep"][name] = sweep(name, m, layers, [int(t) for t in args.sweep_tokens.split(",")], bw)
            config = FusedMoEConfig(**result["sweep"][name]["best"])
        result["config_" + name] = asdict(config)
        print(f"  {name}: time per layer, eager / CUDA graph (fraction of copy bandwidth for the expert bytes)")
        result["rows"] += rows_for(name, m, layers, tokens, bw, config)
        for T in (8, 64):
            result["breakdown"][f"{name}_T{T}"] = breakdown(m, layers, T, config)
            print(f"  {name} T={T} kernels (us/layer): "
                  + ", ".join(f"{k}={v:.1f}" for k, v in result["breakdown"][f"{name}_T{T}"].items()))
        del layers
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
