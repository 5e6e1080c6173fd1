"""Expert parallel + FSDP2 on a device mesh, and DCP checkpoints, on the CPU (gloo, torchrun): 2 ranks with ep=2
give one process's loss curve for the same global batch (2 ranks x 1 micro-batch == 1 rank x 2 accumulated); a
checkpoint of 2 ranks resumes on 1 and one of 1 on 2 (DCP reshards), onto the uninterrupted curve; a rank killed
during a save leaves the last complete checkpoint usable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _fsdp_launch import pydoc_corpus

from ringlinear.train import state as ckpt

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

RUNNER = """import json, os, sys, time
import torch.distributed as dist
cfg_path, stop, slow_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ.get("RANK", "0"))
save_dir = json.load(open(cfg_path))["save_dir"]
os.makedirs(save_dir, exist_ok=True)
with open(os.path.join(save_dir, f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
if rank == slow_rank:  # widen this rank's part of each save (hashing the shards it wrote), and say when it is in it
    import ringlinear.train.state as state
    _sha = state.sha256_file
    def slow_sha(path):
        print("SAVING", path, flush=True)
        time.sleep(0.5)
        return _sha(path)
    state.sha256_file = slow_sha
from ringlinear.train.trainer import TrainConfig, Trainer
tr = Trainer(TrainConfig.from_json(cfg_path))
print("RESUMED", tr.step, flush=True)
if rank == 0:  # how the expert weights are laid out: the mesh dims of each one's DTensor
    layout = {n: [list(p.device_mesh.mesh_dim_names), [str(pl) for pl in p.placements], list(p.to_local().shape)]
              for n, p in tr.model.named_parameters() if n.endswith("mlp.gate_proj") and hasattr(p, "placements")}
    with open(os.path.join(tr.cfg.save_dir, "layout.json"), "w") as f:
        json.dump(layout, f)
tr.fit(stop_after=stop or None)
"""

ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "always"}
STEPS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ep")
    (d / "runner.py").write_text(RUNNER)
    pydoc_corpus(d / "corpus.txt", 30)
    return d


def _cfg(workdir, name: str, nproc: int, **kw) -> dict:
    """Same global batch whatever the ranks: 4 rows a step (micro_batch 2 x ranks x grad_accum)."""
    cfg = {"model": "tiny", "model_overrides": {"num_hidden_layers": 3}, "data": [str(workdir / "corpus.txt")],
           "seq_len": 48, "micro_batch": 2, "grad_accum": 2 // nproc, "steps": STEPS, "lr": 2e-3, "warmup_steps": 2,
           "progress": False, "plot": False, "deterministic": True, "export": False, "tensorboard": False,
           "save_dir": str(workdir / name), "resume": True}
    if nproc == 2:
        cfg["parallelism"] = {"dp_shard": 2, "ep": 2}
    cfg.update(kw)
    return cfg


def _launch(workdir, cfg: dict, nproc: int, stop_after: int = 0, slow_rank: int = -1) -> subprocess.Popen:
    path = workdir / f"{os.path.basename(cfg['save_dir'])}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launch if nproc > 1 else [sys.executable]) + [str(workdir / "runner.py"), str(path), str(stop_after),
                                                          str(slow_rank)]
    return subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _run(workdir, cfg: dict, nproc: int, stop_after: int = 0) -> str:
    p = _launch(workdir, cfg, nproc, stop_after)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:] + err[-6000:]
    return out + err


def _losses(workdir, name: str) -> list[float]:
    return [h["loss"] for h in json.loads((workdir / name / "history.json").read_text())]


def _close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_process(workdir) -> list[float]:
    """The reference: one process, the global batch as 2 accumulated micro-batches, no interruption."""
    _run(workdir, _cfg(workdir, "one", 1), 1)
    return _losses(workdir, "one")


def test_ep2_matches_one_process_and_resumes_on_one(workdir, one_process):
    _run(workdir, _cfg(workdir, "two", 2, save_every=2), 2, stop_after=5)  # dies after step 5: step 4 is the latest
    layout = json.loads((workdir / "two" / "layout.json").read_text())
    assert layout and all(v[0] == ["efsdp", "ep"] and v[2][0] == 8 for v in layout.values()), layout  # 16 experts / 2
    assert [s for s, _ in ckpt.list_checkpoints(str(workdir / "two"))] == [2, 4]
    out = _run(workdir, _cfg(workdir, "two", 1), 1)  # the 2-rank checkpoint, resumed on 1 process
    assert "RESUMED 4" in out
    curve = _losses(workdir, "two")  # steps 1-4 trained on 2 ranks (EP), 5-6 on 1 process after the resume
    assert _close(curve, one_process), (curve, one_process)
    assert one_process[-1] < one_process[0]


def test_one_process_checkpoint_resumes_on_two_ranks(workdir, one_process):
    _run(workdir, _cfg(workdir, "back", 1, save_every=2), 1, stop_after=3)  # step 2 is the latest
    out = _run(workdir, _cfg(workdir, "back", 2), 2)
    assert "RESUMED 2" in out
    layout = json.loads((workdir / "back" / "layout.json").read_text())
    assert layout and all(v[0] == ["efsdp", "ep"] and v[2][0] == 8 for v in layout.values()), layout
    curve = _losses(workdir, "back")
    assert _close(curve, one_process), (curve, one_process)


def test_rank_killed_mid_save_leaves_the_last_checkpoint_usable(workdir, one_process):
    save = workdir / "killed"
    p = _launch(workdir, _cfg(workdir, "killed", 2, save_every=2), 2, slow_rank=1)
    saves = 0
    deadline = time.time() + 240
    for line in p.stdout:
        if line.startswith("SAVING"):
            saves += 1
            if saves == 2:  # rank 1 is hashing its shards of the step-4 checkpoint: kill it there
                time.sleep(0.2)
                os.kill(int((save / "rank1.pid").read_text()), signal.SIGKILL)
                break
        assert time.time() < deadline
    p.wait(timeout=120)
    p.stdout.close()
    p.stderr.close()
    assert p.returncode != 0
    assert [s for s, _ in ckpt.list_checkpoints(str(save))] == [2]
    assert any(".step-00000004.tmp-" in n for n in os.listdir(save))  # the killed save's leftovers
    out = _run(workdir, _cfg(workdir, "killed", 2), 2)
    assert "RESUMED 2" in out and "interrupted" in out
    assert not any(".tmp-" in n for n in os.listdir(save))
    curve = _losses(workdir, "killed")
    assert _close(curve, one_process), (curve, one_process)
