"""Host work of one speculative-decoding step on the CPU, and how it scales with the batch (docs/architecture.md,
"Speculative decoding"; benchmarks/NOTES_spec_decode.md). For B greedy sequences all decoding (every one holding a
draft), per engine step: wall time, aten ops dispatched (a TorchDispatchMode), Python function calls (cProfile),
calls of lightning_commit / lightning_verify / mtp_forward, and device->host reads (.item / .tolist / .cpu /
int() of a tensor). k = 0 is plain decoding. With `--graph`, verify-only steps take the CUDA-graph verify path's
static buffers, run eagerly (`VerifyGraphs(capture=False)`), as on the GPU.

    OMP_NUM_THREADS=1 python benchmarks/profile_spec_step.py --preset tiny --batches 1 8 32 --ks 0 1 3

`--triton` runs the GPU code path (RINGLINEAR_BACKEND=triton under TRITON_INTERPRET=1: slow, launches only count)
and reports Triton launches per step and the compile keys (constexprs + Triton's integer specialisations: == 1,
% 16 == 0) first seen during the measured steps, i.e. kernels a GPU would compile mid-run.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import sys
import time

if "--triton" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["RINGLINEAR_BACKEND"] = "triton"

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ringlinear.config import preset
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.engine.sequence import SamplingParams
from ringlinear.model import init_model

SYNC_OPS = ("_local_scalar_dense",)  # .item(), int(t), float(t); .tolist() and .cpu() are counted as calls


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class LaunchCounter:
    """Counts Triton launches (interpreter) and the compile keys seen: kernel name, constexpr kwargs, and for each
    positional int argument the specialisation Triton keys its cache on (1, divisible by 16, other)."""

    def __init__(self):
        self.launches: collections.Counter = collections.Counter()
        self.keys: set = set()
        self.new_keys: list = []
        self.recording = False

    def install(self):
        from triton.runtime.interpreter import InterpretedFunction

        orig = InterpretedFunction.run
        me = self

        def run(fn, *args, grid, warmup, **kwargs):
            name = getattr(fn.fn, "__name__", "?")
            spec = tuple("1" if a == 1 else "16" if a % 16 == 0 else "i" for a in args
                         if isinstance(a, int) and not isinstance(a, bool))
            key = (name, spec, tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, str, bool)))))
            if me.recording:
                me.launches[name] += 1
                if key not in me.keys:
                    me.new_keys.append(key)
            me.keys.add(key)
            return orig(fn, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self


LAUNCHES = LaunchCounter().install() if "--triton" in sys.argv else None


def make_engine(model, k: int, max_seqs: int, graph: bool) -> LLMEngine:
    eng = LLMEngine(EngineConfig(device="cpu", max_num_seqs=max_seqs, max_num_batched_tokens=max(256, 8 * max_seqs),
                                 block_size=16, cpu_cache_gib=0.25, enable_prefix_caching=False,
                                 num_speculative_tokens=k, verbose=False), model=model)
    if graph and k:
        from ringlinear.engine.cuda_graphs import VerifyGraphs

        r = eng.runner
        r.verify_graphs = VerifyGraphs(r.model, r.cache, max_seqs, k + 1, capture=False)
    return eng


def warm(eng: LLMEngine, B: int, prompt_len: int, vocab: int, max_tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(B):
        eng.add_request(f"p{i}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), sp)
    while any(s.num_outputs == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(2):
        eng.step()


def measure(eng: LLMEngine, steps: int) -> dict:
    """Per-step means over `steps` steps: wall ms, aten ops, Python calls, named calls."""
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    wall = (time.perf_counter() - t0) / steps
    if LAUNCHES is not None:
        LAUNCHES.launches.clear()
        LAUNCHES.new_keys.clear()
        LAUNCHES.recording = True
    counter = OpCounter()
    prof = cProfile.Profile()
    with counter:
        prof.enable()
        for _ in range(steps):
            eng.step()
        prof.disable()
    if LAUNCHES is not None:
        LAUNCHES.recording = False
    st = pstats.Stats(prof)
    calls = collections.Counter()
    total_calls = 0
    for (_file, _, name), (_, ncalls, *_rest) in st.stats.items():
        total_calls += ncalls
        calls[name] += ncalls
    named = {n: calls.get(n, 0) / steps for n in ("lightning_commit", "lightning_verify", "lightning_decode",
                                                   "mtp_forward", "execute_verify", "execute", "run",
                                                   "<method 'tolist' of 'torch._C.TensorBase' objects>",
                                                   "<method 'item' of 'torch._C.TensorBase' objects>",
                                                   "<method 'cpu' of 'torch._C.TensorBase' objects>")}
    named = {k.replace("<method '", "").replace("' of 'torch._C.TensorBase' objects>", "()"): v
             for k, v in named.items()}
    return {"wall_ms": wall * 1e3, "aten_ops": sum(counter.ops.values()) / steps,
            "syncs": sum(counter.ops[o] for o in SYNC_OPS) / steps, "py_calls": total_calls / steps,
            "calls": named, "top_ops": counter.ops.most_common(8),
            "triton_launches": sum(LAUNCHES.launches.values()) / steps if LAUNCHES else None,
            "new_compile_keys": [f"{k[0]}{k[1]}" for k in LAUNCHES.new_keys] if LAUNCHES else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--graph", action="store_true", help="verify-only steps through VerifyGraphs(capture=False)")
    ap.add_argument("--checkpoint", default=None, help="a saved model (with an MTP layer) instead of random weights")
    ap.add_argument("--triton", action="store_true", help="the GPU code path under the Triton interpreter")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:  # e.g. a model whose drafts are accepted only sometimes (random weights: almost never)
        from ringlinear.pretrained import load_pretrained

        model = load_pretrained(args.checkpoint, tokenizer=None, require_tokenizer=False).model.eval()
    else:
        model = init_model(preset(args.preset, num_nextn_predict_layers=1), seed=0).eval()
    rows = []
    for k in args.ks:
        for B in args.batches:
            eng = make_engine(model, k, max(args.batches), args.graph)
            warm(eng, B, args.prompt_len, model.config.vocab_size, max_tokens=400)
            r = measure(eng, args.steps)
            r.update(k=k, B=B)
            rows.append(r)
            c = r["calls"]
            print(f"k={k} B={B:3d}: {r['wall_ms']:8.2f} ms/step  aten {r['aten_ops']:7.0f}  py calls "
                  f"{r['py_calls']:8.0f}  syncs(item) {r['syncs']:4.0f}  tolist {c['tolist()']:4.0f}  "
                  f"cpu {c['cpu()']:4.0f}  commit {c['lightning_commit']:4.0f}  verify {c['lightning_verify']:4.0f}  "
                  f"mtp_fwd {c['mtp_forward']:3.0f}  graph.run {c['run']:3.0f}", flush=True)
            if args.triton:
                print(f"      triton launches/step {r['triton_launches']:.0f}; compile keys first seen while measured: "
                      f"{r['new_compile_keys']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
