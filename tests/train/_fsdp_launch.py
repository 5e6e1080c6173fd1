"""Shared by the FSDP tests: run the trainer in fresh processes (`torchrun --standalone` when nproc > 1) on a
JSON config, optionally stopping right after a step as a crash would, and return the saved loss history."""

import json
import os
import subprocess
import sys

RUNNER = """import sys
from ringlinear.train.trainer import TrainConfig, Trainer
stop = int(sys.argv[2])
Trainer(TrainConfig.from_json(sys.argv[1])).fit(stop_after=stop or None)
"""


def pydoc_corpus(path, max_topics: int | None = None) -> str:
    import pydoc_data.topics as topics

    path.write_text("\n\n\n".join(list(topics.topics.values())[:max_topics]))
    return str(path)


def run_trainer(tmp_path, name: str, nproc: int, cfg: dict, env: dict, stop_after: int = 0, timeout: int = 600):
    """Train `cfg` (save_dir = tmp_path/name) in `nproc` processes; the history, or None if it stopped early."""
    cfg = {**cfg, "save_dir": str(tmp_path / name)}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    (tmp_path / "runner.py").write_text(RUNNER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launch if nproc > 1 else [sys.executable]) + [str(tmp_path / "runner.py"), str(tmp_path / f"{name}.json"),
                                                          str(stop_after)]
    r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    hist = tmp_path / name / "history.json"
    return json.loads(hist.read_text()) if hist.exists() else None
