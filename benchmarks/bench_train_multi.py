"""Training on two GPUs (issue 28): Ring-mini-linear-2.0 at full width under FSDP2 x expert parallel
(`parallelism={"dp_shard": 2, "ep": 2}`), the trainer's own step (AdamW on fp32 sharded masters, bf16 compute).

    big      as many layers as fit two GPUs: tokens/s and MFU (per GPU, against `ringlinear.device.peak_flops`)
    scaling  a slice that fits one GPU, the same micro batch per GPU: 2 GPUs (FSDP2 x EP2) vs 1 GPU (one process);
             goal: 2-GPU tokens/s >= 1.8x the 1-GPU tokens/s
    curve    the same global batch over 2 ranks with ep=2 vs ep=1 for a few steps on learnable synthetic rows:
             the loss curves and their largest relative difference (EP must not change the mathematics)

One command runs it all: this script (no torchrun around it) starts one plain process for the 1-GPU baseline, then
`torchrun --nproc-per-node 2` on itself for the 2-GPU parts (scaling, curves, big: the one that may not fit last),
merges their JSON (written after every part: a run cut short keeps what it measured) and prints the table.

    python benchmarks/bench_train_multi.py --json train_multi.json             (2 GPUs)
    python benchmarks/bench_train_multi.py --quick --json train_multi.json     (2 GPUs, fewer steps: the 9-minute call)
    python benchmarks/bench_train_multi.py --smoke                             (CPU: gloo, 2 processes, tiny)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

RING_MINI = "ring-mini-linear-2.0"
# bytes a parameter costs: one process (bf16 weight, fp32 master, fp32 gradient, AdamW's two fp32 moments); under
# FSDP2 the fp32 parameter is the master, and parameter, gradient and moments are sharded over the ranks
BYTES_ONE_GPU = 2 + 4 + 4 + 8
BYTES_FSDP = 4 + 4 + 8
ACT_TENSORS = 60  # ~hidden-sized bf16 tensors a layer saves for backward (as bench_train_stack.auto_layers)


def fit_layers(preset: str, world: int, seq_len: int, micro_batch: int, cap: int, share: float = 0.75) -> int:
    """The most layers (first dense + MoE) whose training state and activations fit `share` of one GPU, with the
    state sharded over `world` ranks (one rank: no sharding, bf16 weights beside fp32 masters)."""
    from ringlinear.accounting import model_stats
    from ringlinear.config import preset as make

    budget = share * torch.cuda.get_device_properties(0).total_memory
    cfg = make(preset)
    act = seq_len * micro_batch * cfg.hidden_size * 2 * ACT_TENSORS
    per_param = BYTES_ONE_GPU if world == 1 else BYTES_FSDP / world
    best = 2
    for n in range(2, min(cap, cfg.num_hidden_layers) + 1):
        if model_stats(make(preset, num_hidden_layers=n)).total_params * per_param + n * act > budget:
            break
        best = n
    return best


def learnable_rows(rows: int, seq_len: int, vocab: int, seed: int = 0):
    """Rows of arithmetic progressions modulo a small alphabet (a + b i mod 997): next-token loss falls within a few
    steps, so the curves compared have a slope, unlike uniform random tokens."""
    from ringlinear.train.data import PackedDataset

    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 997, (rows, 1), generator=g)
    b = torch.randint(1, 17, (rows, 1), generator=g)
    tokens = (a + b * torch.arange(seq_len)) % min(997, vocab)
    return PackedDataset(tokens, [[seq_len]] * rows)


def run_trainer(args, layers: int, parallelism: dict, steps: int, lr: float = 1e-4, warmup: int = 2) -> dict:
    """`warmup` untimed + `steps` timed trainer steps; tokens/s (median), MFU per GPU, losses, peak memory."""
    from ringlinear.accounting import model_stats
    from ringlinear.config import preset as make
    from ringlinear.train.trainer import TrainConfig, Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig.from_dict({
        "model": args.preset, "model_overrides": {"num_hidden_layers": layers}, "data": ["<synthetic>"],
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": 100_000, "lr": lr, "warmup_steps": 1,
        "min_lr_ratio": 1.0, "init_device": "device", "progress": False, "plot": False, "export": False, "tensorboard": False,
        "parallelism": parallelism if world > 1 else {}})
    rows = 4 * args.micro_batch * world * (warmup + steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr = Trainer(cfg, dataset=learnable_rows(rows, args.seq_len, make(args.preset).vocab_size))
    setup_s = time.perf_counter() - t0
    try:
        recs = [tr.train_step() for _ in range(warmup + steps)]
        tok_s = statistics.median(r["tokens_per_s"] for r in recs[warmup:])
        out = {"layers": layers, "world": world, "parallelism": parallelism if world > 1 else {},
               "tokens_per_step": args.seq_len * args.micro_batch * world, "setup_s": setup_s,
               "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / world,
               "step_ms": args.seq_len * args.micro_batch * world / tok_s * 1e3,
               "losses": [r["loss"] for r in recs]}
        if tr.peak:
            out["mfu"] = tr.flops_per_token * tok_s / (tr.peak * world)
        if torch.cuda.is_available():
            out["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        out["params"] = model_stats(tr.model_config).total_params
    finally:
        tr.close()
        del tr
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# ---- the worker processes -----------------------------------------------------------------------------------------
def worker(args) -> None:
    """One rank of the 2-process part (torchrun), or the 1-process baseline; rank 0 writes `args.out`."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # a short timeout: a rank that fails (out of memory) must not leave the other waiting for NCCL's 10 minutes
        backend = "gloo" if args.smoke else "nccl"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.collective_timeout))
    rank = dist.get_rank() if world > 1 else 0
    result: dict = {}

    def save():
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    def part(name, fn):
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - the part is reported failed; the others still run
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        result[name]["wall_s"] = time.perf_counter() - t0
        if rank == 0:
            print(f"[bench rank 0] {name}: {json.dumps(result[name])[:600]}", flush=True)
        save()

    ep = {"dp_shard": 2, "ep": 2}
    if world == 1:
        part("scaling_1gpu", lambda: run_trainer(args, args.slice_layers, {}, args.steps))
        return
    part("scaling_2gpu", lambda: run_trainer(args, args.slice_layers, ep, args.steps))
    part("curve_ep1", lambda: run_trainer(args, args.curve_layers, {"dp_shard": 2, "ep": 1}, args.curve_steps,
                                          lr=args.curve_lr, warmup=0))
    part("curve_ep2", lambda: run_trainer(args, args.curve_layers, ep, args.curve_steps, lr=args.curve_lr, warmup=0))
    part("big", lambda: run_trainer(args, args.big_layers, ep, args.steps))  # last: the one that may not fit
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the launcher -------------------------------------------------------------------------------------------------
def launch(args, nproc: int, out: str) -> float:
    """Run this script's worker in `nproc` processes (torchrun when 2); the seconds it took."""
    me = os.path.abspath(__file__)
    flags = ["--worker", "--out", out, "--preset", args.preset, "--seq-len", str(args.seq_len),
             "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--slice-layers",
             str(args.slice_layers), "--big-layers", str(args.big_layers), "--curve-layers", str(args.curve_layers),
             "--curve-steps", str(args.curve_steps), "--curve-lr", str(args.curve_lr),
             "--collective-timeout", str(args.collective_timeout)] + (["--smoke"] if args.smoke else [])
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", me]
           if nproc > 1 else [sys.executable, me]) + flags
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation at the memory edge
    # torchrun sets one thread per process otherwise (the weights are drawn on the GPUs: `init_device`)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(nproc, 1))))
    if nproc == 1 and not args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print("[bench]", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, timeout=args.part_timeout)
        if r.returncode:
            print(f"[bench] exit code {r.returncode} (what it measured before is kept)", flush=True)
    except subprocess.TimeoutExpired:
        print(f"[bench] stopped after {args.part_timeout} s (what it measured before is kept)", flush=True)
    return time.perf_counter() - t0


def report(res: dict) -> None:
    two, one = res.get("scaling_2gpu", {}), res.get("scaling_1gpu", {})
    if "tokens_per_s" in two and "tokens_per_s" in one:
        res["scaling"] = {"tokens_per_s_ratio": two["tokens_per_s"] / one["tokens_per_s"], "goal": 1.8}
    e1, e2 = res.get("curve_ep1", {}).get("losses"), res.get("curve_ep2", {}).get("losses")
    if e1 and e2:
        rel = [abs(a - b) / abs(a) for a, b in zip(e1, e2)]
        res["curve"] = {"ep1": e1, "ep2": e2, "max_rel_diff": max(rel), "first_loss": e1[0], "last_loss": e1[-1]}
    print(f"\n{res['device']} x {res['ranks']}, {res['preset']} width, seq {res['seq_len']} x micro batch "
          f"{res['micro_batch']} per GPU, peak {res['peak_TFLOPs']:.0f} TFLOP/s per GPU")
    print(f"{'run':14s} {'layers':>6s} {'params B':>8s} {'GPUs':>4s} {'tok/s':>9s} {'tok/s/GPU':>9s} {'step ms':>8s} "
          f"{'MFU':>6s} {'mem GiB':>7s}")
    for name in ("big", "scaling_2gpu", "scaling_1gpu", "curve_ep1", "curve_ep2"):
        r = res.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"{name:14s} error: {r['error'][:200]}")
            continue
        print(f"{name:14s} {r['layers']:6d} {r['params'] / 1e9:8.2f} {r['world']:4d} {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s_per_gpu']:9.0f} {r['step_ms']:8.1f} {r.get('mfu', float('nan')):6.1%} "
              f"{r.get('peak_mem_GiB', 0):7.1f}")
    if "scaling" in res:
        print(f"2 GPUs / 1 GPU tokens/s on the {one['layers']}-layer slice: {res['scaling']['tokens_per_s_ratio']:.2f}x "
              "(goal >= 1.8x)")
    if "curve" in res:
        c = res["curve"]
        print(f"loss ep=1: {' '.join(f'{x:.4f}' for x in c['ep1'])}")
        print(f"loss ep=2: {' '.join(f'{x:.4f}' for x in c['ep2'])}")
        print(f"max relative difference ep=2 vs ep=1: {c['max_rel_diff']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=RING_MINI)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per GPU per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 untimed)")
    ap.add_argument("--slice-layers", type=int, default=0, help="the scaling slice (0: as many as fit one GPU, <= 5)")
    ap.add_argument("--big-layers", type=int, default=0, help="the 2-GPU run (0: as many as fit two GPUs)")
    ap.add_argument("--curve-layers", type=int, default=2)
    ap.add_argument("--curve-steps", type=int, default=8)
    ap.add_argument("--curve-lr", type=float, default=1e-3)
    ap.add_argument("--collective-timeout", type=int, default=120,
                    help="seconds a rank waits on a collective (a rank out of memory ends the part that soon)")
    ap.add_argument("--part-timeout", type=int, default=1800, help="seconds each launched part may run")
    ap.add_argument("--quick", action="store_true", help="fewer steps and layers (the 9-minute 2-GPU call)")
    ap.add_argument("--smoke", action="store_true", help="CPU: gloo, 2 processes, tiny preset")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.preset, args.seq_len, args.micro_batch, args.steps = "tiny", 128, 2, 2
        args.slice_layers, args.big_layers, args.curve_layers, args.curve_steps = 2, 3, 2, 4
    else:
        if torch.cuda.device_count() < 2:
            raise SystemExit("bench_train_multi needs 2 GPUs (--smoke: the CPU run)")
        if args.quick:
            args.steps, args.curve_steps = min(args.steps, 3), min(args.curve_steps, 5)
        cap = 4 if args.quick else 5  # the slice is for scaling, not size: a few layers time it
        args.slice_layers = args.slice_layers or fit_layers(args.preset, 1, args.seq_len, args.micro_batch, cap)
        args.big_layers = args.big_layers or fit_layers(args.preset, 2, args.seq_len, args.micro_batch, 1000)
    from ringlinear.device import peak_flops

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "ranks": 2, "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
           "steps": args.steps, "torch": torch.__version__, "peak_TFLOPs": (peak_flops(dev) or 0) / 1e12}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):  # the baseline first: a run cut short still has the scaling pair once the slice ran
            out = os.path.join(tmp, f"{nproc}.json")
            res[f"wall_{nproc}proc_s"] = launch(args, nproc, out)
            if os.path.exists(out):
                with open(out) as f:
                    res.update(json.load(f))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
    res["wall_s"] = time.perf_counter() - t_start
    report(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
