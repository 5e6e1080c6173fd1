"""FSDP2 over NCCL on 2 GPUs (torchrun): the loss curve tracks one GPU with the same global batch (bf16 compute,
so within bf16 tolerance rather than bit-equal), a sharded checkpoint resumes on 2 ranks, and the exported model
loads. Run on a machine with >= 2 GPUs: `python -m pytest -q -s -m gpu tests/train/test_fsdp_gpu.py`."""

import pytest
import torch
from _fsdp_launch import pydoc_corpus, run_trainer

from ringlinear.hf import load_model

pytestmark = pytest.mark.gpu

def _train(tmp_path, name, nproc, steps, accum, resume=False, save_every=0, stop_after=0):
    cfg = {"model": "small", "data": [pydoc_corpus(tmp_path / "corpus.txt")], "seq_len": 1024, "micro_batch": 8,
           "grad_accum": accum, "steps": steps, "lr": 1e-3, "warmup_steps": 5, "save_every": save_every,
           "progress": False, "resume": resume}
    return run_trainer(tmp_path, name, nproc, cfg, {"OMP_NUM_THREADS": "4"}, stop_after=stop_after, timeout=900)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_two_gpus_tracks_one_gpu_and_resumes(tmp_path):
    steps = 40
    one = _train(tmp_path, "one", 1, steps, accum=2)
    _train(tmp_path, "two", 2, steps, accum=1, save_every=10, stop_after=25)  # "crash" after step 25
    two = _train(tmp_path, "two", 2, steps, accum=1, resume=True, save_every=10)
    assert [h["step"] for h in two] == list(range(1, steps + 1))
    a, b = [h["loss"] for h in one], [h["loss"] for h in two]
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    tail = lambda c: sum(c[-10:]) / 10  # noqa: E731
    tps = lambda h: sorted(r["tokens_per_s"] for r in h[5:])[len(h[5:]) // 2]  # noqa: E731
    print(f"\nFSDP2 NCCL: loss 1 GPU {a[0]:.3f} -> {tail(a):.4f}, 2 GPUs {b[0]:.3f} -> {tail(b):.4f}; "
          f"worst per-step relative gap {worst:.2e}; median tokens/s 1 GPU {tps(one):.0f}, 2 GPUs (after resume) "
          f"{tps(two[25:]):.0f}")
    assert abs(a[0] - b[0]) <= 1e-2 * a[0]  # same init, same first batch
    assert abs(tail(a) - tail(b)) <= 0.02 * tail(a), (a, b)
    assert tail(b) < b[0] - 1.0
    m = load_model(str(tmp_path / "two" / "final"))
    assert m.config.num_hidden_layers == 8 and m.config.layer_types.count("softmax") == 2
