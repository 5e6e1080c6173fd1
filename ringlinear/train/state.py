"""Crash-safe training checkpoints: `{save_dir}/step-{N:08d}/` holds the model and fp32 master weights,
optimizer, scheduler, data position, RNG states and step, plus `manifest.json` (a fingerprint of the run
and a SHA-256 per file). Each one is written into a temp dir and renamed (never a half-written checkpoint);
loading verifies checksums and fingerprint and refuses anything else with a clear message.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from ringlinear.files import sha256_file, write_atomically

MANIFEST = "manifest.json"
STATE_FILE = "train_state.pt"
FORMAT = "ringlinear-train-v1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class TrainCheckpointError(RuntimeError):
    """A training checkpoint is corrupt, incomplete, or belongs to a different run."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step-{step:08d}")


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `save_dir`, oldest first (temp dirs are skipped)."""
    if not os.path.isdir(save_dir):
        return []
    out = [(int(m.group(1)), os.path.join(save_dir, n)) for n in os.listdir(save_dir) if (m := _STEP_DIR.match(n))]
    return sorted(out)


def save_checkpoint(save_dir: str, step: int, state: dict, fingerprint: dict, keep: int = 2) -> str:
    """Write `state` (a dict of picklable tensors/objects) atomically as step `step`; keep the newest `keep`."""
    path = step_dir(save_dir, step)

    def write(tmp: str) -> None:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        manifest = {"format": FORMAT, "step": step, "fingerprint": fingerprint,
                    "sha256": {STATE_FILE: sha256_file(os.path.join(tmp, STATE_FILE))}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)

    write_atomically(path, write)
    if keep > 0:
        for _, old in list_checkpoints(save_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str, fingerprint: dict) -> dict:
    """Read a checkpoint written by `save_checkpoint`, refusing it when a file is missing or altered, or
    when it was written by a run with a different model/optimizer layout (`fingerprint`)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise TrainCheckpointError(f"{path}: no {MANIFEST}; not a ringlinear training checkpoint (or incomplete)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainCheckpointError(f"{path}: {MANIFEST} is corrupt ({e})") from None
    if manifest.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for fname, digest in manifest["sha256"].items():
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise TrainCheckpointError(f"{path}: {fname} is missing")
        if sha256_file(fpath) != digest:
            raise TrainCheckpointError(f"{path}: {fname} is corrupt (SHA-256 differs from the manifest)")
    saved = manifest["fingerprint"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise TrainCheckpointError(f"{path} was written by a different training setup: " + "; ".join(diffs))
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def latest_checkpoint(save_dir: str) -> str | None:
    cks = list_checkpoints(save_dir)
    return cks[-1][1] if cks else None
