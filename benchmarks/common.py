"""Timing helpers every device benchmark shares: median kernel time (`triton.testing.do_bench`), a function captured
in a CUDA graph, the device-to-device copy bandwidth (bytes read + written), and a profiler's kernel times."""

from __future__ import annotations

import torch


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` (events, warm-up and repetitions in milliseconds)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_of(fn, warmups: int = 2):
    """`fn` captured in a CUDA graph after `warmups` runs on a side stream; None when capture fails (the path
    syncs or allocates on the host), after saying why."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph
    except Exception as e:  # noqa: BLE001 - report and time the eager path only
        print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.synchronize()
        return None


def graph_ms(fn) -> float:
    """Median milliseconds of one replay of `fn` captured in a CUDA graph (eager when capture fails)."""
    graph = graph_of(fn)
    return bench(graph.replay if graph is not None else fn)


def copy_bandwidth(device="cuda") -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    n = 1 << 28
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * n * 4 / (bench(lambda: dst.copy_(src)) * 1e-3)


def kernel_times(fn, iters: int, key_len: int = 60) -> dict[str, float]:
    """Kernel name -> milliseconds per call of `fn`, from the profiler over `iters` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            out[e.key[:key_len]] = us / iters / 1000
    return out


# ---- collectives between ranks, timed in processes of their own ---------------------------------------------------
def _repeat(fn, n: int) -> None:
    for _ in range(n):
        fn()


def _time_collectives(rank: int, world: int, port: int, backend: str, ops: list, reps: int, iters: int,
                      out: str) -> None:
    import json
    import os
    import time
    from functools import partial

    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    import datetime

    # a rank that fails must not leave the others waiting for ever
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device if cuda else None, timeout=datetime.timedelta(seconds=60))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    result = {}
    for op, numel, dtype_name in ops:
        x = torch.ones(numel, dtype=getattr(torch, dtype_name), device=device)
        y = x.new_empty(world * numel)
        one = partial(dist.all_reduce, x) if op == "all_reduce" else partial(gather, y, x)
        for _ in range(3):
            one()
        how = "eager"
        run = None
        if cuda:  # the engine decodes under CUDA graphs: time the collectives the same way
            g = torch.cuda.CUDAGraph()
            try:  # thread_local: NCCL's watchdog thread queries events while this thread captures (as the engine)
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    for _ in range(reps):
                        one()
                ok = 1
            except Exception:  # noqa: BLE001 - eager timing below, recorded as such
                torch.cuda.synchronize()
                ok = 0
            # every rank replays graphs or every rank runs eagerly: mixed, their collectives would not pair up
            flag = torch.tensor([ok], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item():
                run, how = g.replay, "graph"
        if run is None:
            run = partial(_repeat, one, reps)
        run()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        if cuda:
            torch.cuda.synchronize()
        result[f"{op} {numel} {dtype_name}"] = {"ms": (time.perf_counter() - t0) / (iters * reps) * 1e3, "how": how}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def collective_ms(ops: list[tuple[str, int, str]], world: int = 2, backend: str = "nccl", reps: int = 10,
                  iters: int = 20) -> dict[str, dict]:
    """Milliseconds of each collective `(op, elements per rank, dtype name)` (op: all_reduce or all_gather), timed
    over `world` fresh processes (one GPU each under NCCL, captured `reps` at a time in a CUDA graph; gloo on the
    CPU): `{"op elements dtype": {"ms": ..., "how": "graph" | "eager"}}`. Fresh processes: the caller's own
    (an engine's) process group is left alone."""
    import json
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        mp.start_processes(_time_collectives, args=(world, port, backend, list(ops), reps, iters, out),
                           nprocs=world, start_method="spawn")
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)
