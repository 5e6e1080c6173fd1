"""FSDP2 over NCCL on 2 GPUs (torchrun): the loss curve tracks one GPU with the same global batch (bf16 compute,
so within bf16 tolerance rather than bit-equal), a sharded checkpoint resumes on 2 ranks, and the exported model
loads. Run on a machine with >= 2 GPUs: `python -m pytest -q -s -m gpu tests/train/test_fsdp_gpu.py`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ringlinear.checkpoint import load_model

pytestmark = pytest.mark.gpu

RUNNER = """import sys
from ringlinear.train.trainer import TrainConfig, Trainer
stop = int(sys.argv[2])
Trainer(TrainConfig.from_json(sys.argv[1])).fit(stop_after=stop or None)
"""


def _train(tmp_path, name, nproc, steps, accum, resume=False, save_every=0, stop_after=0):
    import pydoc_data.topics as topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n\n".join(topics.topics.values()))
    cfg = {"model": "small", "data": [str(corpus)], "seq_len": 1024, "micro_batch": 8, "grad_accum": accum,
           "steps": steps, "lr": 1e-3, "warmup_steps": 5, "save_dir": str(tmp_path / name), "save_every": save_every,
           "progress": False, "resume": resume}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    (tmp_path / "runner.py").write_text(RUNNER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launch if nproc > 1 else [sys.executable]) + [str(tmp_path / "runner.py"), str(tmp_path / f"{name}.json"),
                                                          str(stop_after)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    hist = tmp_path / name / "history.json"
    return json.loads(hist.read_text()) if hist.exists() else None


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
