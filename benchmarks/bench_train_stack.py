"""Training-stack benchmark for one GPU (issue 25's figures): step time of BF16, our blockwise FP8 recipe and
torchao's float8 (rowwise dense layers + its grouped-GEMM MoE path, when torchao is importable) on a stack at full
Ring-mini-linear-2.0 width with as many layers as fit the GPU, timed two ways: the trainer's whole step (embeddings,
the stack, lm_head + cross entropy, AdamW on fp32 masters) and the stack alone (forward + backward of the decoder
layers, no lm_head, no optimizer); MFU against the GPU's own peak (`ringlinear.device.peak_flops`); and the
checkpoint save time, DCP synchronous vs asynchronous, with the step-time hiccup while an async save is written.
Prints a table; --json PATH writes every number. Runs in a few minutes on an H200.

    python benchmarks/bench_train_stack.py --json benchmarks/results/bench_train_stack_h200.json
    python benchmarks/bench_train_stack.py --preset tiny --layers 3 --seq-len 256 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch

RING_MINI = "ring-mini-linear-2.0"
BYTES_PER_PARAM = 2 + 4 + 4 + 8  # bf16 weight, fp32 master, fp32 gradient, AdamW's two fp32 moments


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def auto_layers(preset: str, device: torch.device, seq_len: int, micro_batch: int) -> int:
    """The most layers (1 dense + MoE) whose trainer state fits in 80% of the GPU with room for activations."""
    from ringlinear.accounting import model_stats
    from ringlinear.config import preset as make

    if device.type != "cuda":
        return 3
    budget = 0.8 * torch.cuda.get_device_properties(device).total_memory
    cfg = make(preset)
    act_per_layer = seq_len * micro_batch * cfg.hidden_size * 2 * 60  # ~60 saved hidden-sized bf16 tensors a layer
    best = 2
    for n in range(2, cfg.num_hidden_layers + 1):
        params = model_stats(make(preset, num_hidden_layers=n)).total_params
        if params * BYTES_PER_PARAM + n * act_per_layer > budget:
            break
        best = n
    return best


def _synthetic(rows: int, seq_len: int, vocab: int):
    from ringlinear.train.data import PackedDataset

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=g)
    return PackedDataset(tokens, [[seq_len // 2, seq_len - seq_len // 2]] * rows)


def make_trainer(preset: str, layers: int, seq_len: int, micro_batch: int, fp8: bool, save_dir: str | None = None,
                 async_save: bool = True):
    from ringlinear.config import preset as make
    from ringlinear.train.trainer import TrainConfig, Trainer

    vocab = make(preset).vocab_size
    cfg = TrainConfig.from_dict({
        "model": preset, "model_overrides": {"num_hidden_layers": layers}, "data": ["<synthetic>"],
        "seq_len": seq_len, "micro_batch": micro_batch, "steps": 100_000, "lr": 1e-4, "warmup_steps": 2,
        "fp8": fp8, "progress": False, "plot": False, "export": False, "tensorboard": False,
        "save_dir": save_dir, "async_save": async_save, "keep_checkpoints": 1})
    return Trainer(cfg, dataset=_synthetic(64, seq_len, vocab))


def apply_torchao(tr) -> str:
    """torchao float8 training on the trainer's model: rowwise-scaled Float8Linear for the dense projections and
    its scaled grouped GEMM for the routed experts; then fresh masters / AdamW over the (possibly new)
    parameters. Returns what was converted.

    No float8 all-gather (`enable_fsdp_float8_all_gather`, issue 25): it does not apply here. This benchmark runs
    one process, where the trainer applies no FSDP and nothing is all-gathered; torchao 0.18 allows it only with
    tensorwise weight scaling (its Float8LinearConfig asserts that; this recipe is rowwise); and its weight wrapper
    must be in place before `fully_shard`, while the trainer shards the model inside its constructor."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from ringlinear.train.optim import MasterWeights, make_adamw

    model = tr.model

    def dense(mod, fqn):
        ok = isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
        return ok and not fqn.endswith("mlp.gate")

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"), module_filter_fn=dense)
    what = "dense: Float8Linear rowwise"
    try:
        from ringlinear.layers.moe import MoE

        n = _torchao_experts(model, MoE)
        what += f"; experts: torchao scaled grouped GEMM (rowwise FP8, {n} MoE layers)"
    except Exception as e:  # noqa: BLE001 - the prototype's API moves between releases: say what happened
        what += f"; experts: BF16 (torchao MoE path unavailable: {type(e).__name__}: {str(e)[:120]})"
    tr.master = MasterWeights(list(model.parameters()))
    tr.optimizer = make_adamw(tr.master, tr.cfg.lr, tr.cfg.betas, tr.cfg.weight_decay, tr.device, False)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
    return what


def _torchao_experts(model, moe_cls) -> int:
    """The routed experts' stacked weights wrapped in torchao's training tensor, whose `torch._grouped_mm` (our
    BF16 expert path) runs rowwise FP8 (torchao 0.18: `moe_training.config.Float8TrainingOpConfig`; before it:
    `MoETrainingConfig` through `quantize_`). Only the three expert tensors: quantize_ would wrap every parameter
    under the MoE, the fp32 router and the shared experts included."""
    try:
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig, Float8TrainingRecipe
        from torchao.prototype.moe_training.tensor import Float8TrainingWeightWrapperTensor
    except ImportError:
        from torchao.prototype.moe_training.conversion_utils import MoETrainingConfig
        from torchao.quantization.quant_api import quantize_

        quantize_(model, MoETrainingConfig(), filter_fn=lambda mod, fqn: isinstance(mod, moe_cls))
        return sum(isinstance(m, moe_cls) for m in model.modules())
    cfg = Float8TrainingOpConfig.from_recipe(Float8TrainingRecipe.FP8_ROWWISE)
    n = 0
    for mod in model.modules():
        if isinstance(mod, moe_cls):
            for name in ("gate_proj", "up_proj", "down_proj"):
                p = getattr(mod, name)
                setattr(mod, name, torch.nn.Parameter(Float8TrainingWeightWrapperTensor(p.data, cfg),
                                                      requires_grad=p.requires_grad))
            n += 1
    return n


def stack_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of the decoder layers alone (no lm_head, no MTP)."""
    from ringlinear.accounting import train_flops_per_token

    c = config.replace(num_nextn_predict_layers=0)
    return train_flops_per_token(c, seq_len) - 6 * c.hidden_size * c.vocab_size


def time_recipe(tr, name: str, steps: int, peak: float | None, note: str = "") -> dict:
    """The trainer's whole step, then the stack's forward + backward alone."""
    from ringlinear.layers.attention_context import PackedContext
    from ringlinear.train.optim import invalidate_fp8_weights

    dev, cfg = tr.device, tr.cfg
    tokens = cfg.seq_len * cfg.micro_batch
    for _ in range(2):
        tr.train_step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        rec = tr.train_step()
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    # the stack alone: embeddings + decoder layers forward, a cheap scalar of the output, backward
    ids, cu = tr.data.next_rows(cfg.micro_batch)
    ids = ids.to(dev)
    ctx = PackedContext.from_lens((cu[1:] - cu[:-1]).tolist(), dev)
    probe = torch.randn(ids.numel(), tr.model_config.hidden_size, device=dev, dtype=torch.float32) / ids.numel()

    def fwd_bwd():
        invalidate_fp8_weights(tr.model)  # as in training: each step quantizes the (updated) weights once
        h = tr.model.model(ids, ctx)
        (h.float() * probe).sum().backward()

    for _ in range(2):
        fwd_bwd()
    tr.model.zero_grad(set_to_none=True)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fwd_bwd()
    _sync(dev)
    stack_s = (time.perf_counter() - t0) / steps
    tr.model.zero_grad(set_to_none=True)
    out = {"recipe": name, "layers": tr.model_config.num_hidden_layers, "tokens_per_step": tokens,
           "step_ms": step_s * 1e3, "stack_ms": stack_s * 1e3, "loss": rec["loss"], "note": note}
    if peak:
        out["step_mfu"] = tr.flops_per_token * tokens / step_s / peak
        out["stack_mfu"] = stack_flops_per_token(tr.model_config, cfg.seq_len) * tokens / stack_s / peak
    if dev.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _release() -> None:
    """Give the memory of the trainers dropped by the caller back (call after the last reference is gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_recipes(args, device: torch.device) -> list[dict]:
    from ringlinear.device import peak_flops
    from ringlinear.train.fp8_recipe import apply_fp8_recipe

    peak = peak_flops(device)
    rows = []
    tr = None
    # BF16, then our FP8 recipe swapped into the same model (same weights, same data); the layer estimate is only
    # an estimate: one layer fewer after an out-of-memory error
    while True:
        tr = None
        try:
            tr = make_trainer(args.preset, args.layers, args.seq_len, args.micro_batch, fp8=False)
            rows.append(time_recipe(tr, "bf16", args.steps, peak))
            break
        except torch.cuda.OutOfMemoryError:
            if tr is not None:
                tr.close()
            tr = None
            _release()
            if args.layers <= 2:
                raise
            print(f"out of memory with {args.layers} layers: trying {args.layers - 1}", flush=True)
            args.layers -= 1
    try:
        print(rows[-1], flush=True)
        try:
            apply_fp8_recipe(tr.model, experts=True, cache_weights=True, grouped_gemm="triton")
            rows.append(time_recipe(tr, "fp8 (ours)", args.steps, peak, "blockwise 1x128/128x128 e4m3, Triton "
                                                                        "grouped experts"))
        except Exception as e:  # noqa: BLE001 - a recipe that cannot run is reported, not hidden
            rows.append({"recipe": "fp8 (ours)", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)
    finally:
        tr.close()
        tr = None
        _release()
    try:
        import torchao  # noqa: F401
    except ImportError:
        rows.append({"recipe": "torchao float8", "error": "torchao is not importable (pip install torchao)"})
        return rows
    tr = make_trainer(args.preset, args.layers, args.seq_len, args.micro_batch, fp8=False)
    try:
        what = apply_torchao(tr)
        rows.append(time_recipe(tr, "torchao float8", args.steps, peak, what))
    except Exception as e:  # noqa: BLE001
        rows.append({"recipe": "torchao float8", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    finally:
        tr.close()
        tr = None
        _release()
    print(rows[-1], flush=True)
    return rows


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_save(args, device: torch.device) -> dict:
    """Checkpoint of a `--save-layers` stack: synchronous (the step waits for the disk) vs asynchronous (the step
    waits for the CPU copy; the write overlaps the next steps: their slowdown is the hiccup)."""
    out = {"layers": args.save_layers}
    root = tempfile.mkdtemp(prefix="bench-dcp-", dir=args.save_root)
    try:
        for mode in ("sync", "async"):
            save_dir = os.path.join(root, mode)
            tr = make_trainer(args.preset, args.save_layers, args.seq_len, args.micro_batch, fp8=False,
                              save_dir=save_dir, async_save=mode == "async")
            try:
                steady = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    tr.train_step()
                    steady.append(time.perf_counter() - t0)
                _sync(device)
                t0 = time.perf_counter()
                tr.save()
                blocked = time.perf_counter() - t0
                during = []
                while tr.checkpointer.pending() and len(during) < 50:
                    t1 = time.perf_counter()
                    tr.train_step()
                    during.append(time.perf_counter() - t1)
                path = tr.checkpointer.wait() or tr.checkpointer.last_committed
                total = time.perf_counter() - t0
                size = _dir_bytes(path) if path else 0
                base = sorted(steady)[len(steady) // 2]
                out[mode] = {"blocking_s": blocked, "total_s": total, "GB": size / 1e9, "GBps": size / 1e9 / total,
                             "steady_step_ms": base * 1e3, "steps_during_write": len(during),
                             "step_ms_during_write": (sum(during) / len(during) * 1e3) if during else None}
            finally:
                tr.close()
                tr = None
                _release()
            shutil.rmtree(save_dir, ignore_errors=True)
            print(mode, out[mode], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=RING_MINI, help="model preset at whose width the stack is built")
    ap.add_argument("--layers", type=int, default=0, help="layers of the timed stack (0: as many as fit the GPU)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
    ap.add_argument("--save-layers", type=int, default=2, help="layers of the stack whose checkpoint is timed")
    ap.add_argument("--save-root", default=None, help="where the timed checkpoints are written (default: $TMPDIR)")
    ap.add_argument("--parts", default="recipes,save")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.layers:
        args.layers = auto_layers(args.preset, device, args.seq_len, args.micro_batch)
    t_start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "torch": torch.__version__}
    from ringlinear.device import peak_flops

    result["peak_TFLOPs"] = (peak_flops(device) or 0) / 1e12
    parts = args.parts.split(",")
    if "recipes" in parts:
        result["recipes"] = bench_recipes(args, device)
        ok = {r["recipe"]: r for r in result["recipes"] if "error" not in r}
        if "bf16" in ok:
            result["speedup_vs_bf16"] = {
                k: {"step": ok["bf16"]["step_ms"] / r["step_ms"], "stack": ok["bf16"]["stack_ms"] / r["stack_ms"]}
                for k, r in ok.items() if k != "bf16"}
    if "save" in parts:
        result["save"] = bench_save(args, device)
    result["wall_s"] = time.perf_counter() - t_start

    print(f"\n{result['device']}, {args.preset} width, {args.seq_len} x {args.micro_batch} tokens per step, "
          f"peak {result['peak_TFLOPs']:.0f} TFLOP/s")
    print(f"{'recipe':16s} {'layers':>6s} {'step ms':>9s} {'step MFU':>9s} {'stack ms':>9s} {'stack MFU':>9s} "
          f"{'vs bf16 step':>12s} {'vs bf16 stack':>13s} {'mem GiB':>8s}")
    for r in result.get("recipes", []):
        if "error" in r:
            print(f"{r['recipe']:16s} error: {r['error']}")
            continue
        sp = result.get("speedup_vs_bf16", {}).get(r["recipe"], {"step": 1.0, "stack": 1.0})
        print(f"{r['recipe']:16s} {r['layers']:6d} {r['step_ms']:9.1f} {r.get('step_mfu', 0):9.1%} "
              f"{r['stack_ms']:9.1f} {r.get('stack_mfu', 0):9.1%} {sp['step']:11.2f}x {sp['stack']:12.2f}x "
              f"{r.get('peak_mem_GiB', 0):8.1f}")
        if r.get("note"):
            print(f"{'':16s} ({r['note']})")
    if "save" in result:
        s = result["save"]
        for mode in ("sync", "async"):
            m = s.get(mode)
            if m:
                during = "-" if m["step_ms_during_write"] is None else f"{m['step_ms_during_write']:.1f}"
                print(f"save {mode:5s} ({s['layers']} layers, {m['GB']:.1f} GB): step blocked {m['blocking_s']:.2f} s, "
                      f"on disk after {m['total_s']:.2f} s ({m['GBps']:.2f} GB/s); step {m['steady_step_ms']:.1f} ms "
                      f"steady, {during} ms during the write ({m['steps_during_write']} steps)")
    print(f"wall {result['wall_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
