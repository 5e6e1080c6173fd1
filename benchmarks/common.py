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
