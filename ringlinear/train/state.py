"""Crash-safe training checkpoints: `{save_dir}/step-{N:08d}/` holds the model and fp32 master weights,
optimizer, scheduler, data position, RNG states and step, plus `manifest.json` (a fingerprint of the run
and a SHA-256 per file). Each one is written into a temp dir and renamed (never a half-written checkpoint);
loading verifies checksums and fingerprint and refuses anything else with a clear message. Resuming takes the
newest intact checkpoint (a corrupt newer one is skipped, with the reason); what killed saves left behind is
removed; one trainer at a time holds a save directory (`SaveDirLock`).
"""

from __future__ import annotations

import json
import os
import random
import re

import torch

from ringlinear.files import remove_atomically, remove_interrupted, sha256_file, write_atomically

MANIFEST = "manifest.json"
STATE_FILE = "train_state.pt"
FORMAT = "ringlinear-train-v1"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class TrainCheckpointError(RuntimeError):
    """A training checkpoint is corrupt, incomplete, or belongs to a different run."""


class CorruptCheckpointError(TrainCheckpointError):
    """A checkpoint's files are missing, altered or unreadable (resume falls back to an older one)."""


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
    """(step, path) of every committed checkpoint under `save_dir`, oldest first (temp dirs are skipped)."""
    if not os.path.isdir(save_dir):
        return []
    out = [(int(m.group(1)), os.path.join(save_dir, n)) for n in os.listdir(save_dir) if (m := _STEP_DIR.match(n))]
    return sorted(out)


class SaveDirLock:
    """An exclusive `flock` on `{save_dir}/.lock` for as long as a trainer uses the directory: a second trainer
    on the same directory is refused (it would delete the first one's saves in progress as leftovers). The kernel
    drops the lock when the process dies, even by `kill -9`. POSIX only; elsewhere no lock is taken."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        os.makedirs(save_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TrainCheckpointError(f"{save_dir} is in use by another training process (it holds {self.path}); "
                                       "give this run its own save_dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def remove_interrupted_saves(save_dir: str) -> list[str]:
    """Remove the temp directories of saves (checkpoints, the final export) that a killed process left in
    `save_dir`; returns their paths. Only while no save into `save_dir` is in flight (the trainer holds the
    directory's lock and calls this before it starts one)."""
    return remove_interrupted(save_dir)


def save_checkpoint(save_dir: str, step: int, state: dict, fingerprint: dict, keep: int = 2) -> str:
    """Write `state` (tensors and plain data) atomically as step `step`; keep the newest `keep`."""
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
            remove_atomically(old)
    return path


def verify_checkpoint(path: str, fingerprint: dict) -> dict:
    """The manifest of checkpoint `path` once every file it lists is present with its SHA-256; raises
    CorruptCheckpointError when something is missing or altered, TrainCheckpointError when it was written by a
    run with a different model/optimizer layout (`fingerprint`)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CorruptCheckpointError(f"{path}: no {MANIFEST}; not a ringlinear training checkpoint (or incomplete)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CorruptCheckpointError(f"{path}: format {got!r}, expected {FORMAT!r}")
    files = manifest.get("sha256")
    if not isinstance(files, dict) or not isinstance(manifest.get("fingerprint"), dict):
        raise CorruptCheckpointError(f"{path}: {MANIFEST} lacks its sha256 / fingerprint tables")
    for fname, digest in files.items():
        fpath = os.path.join(path, fname)
        if os.path.dirname(os.path.normpath(fname)) or fname.startswith("."):
            raise CorruptCheckpointError(f"{path}: {MANIFEST} lists {fname!r}, not a file name inside the checkpoint")
        if not os.path.isfile(fpath):
            raise CorruptCheckpointError(f"{path}: {fname} is missing")
        if sha256_file(fpath) != digest:
            raise CorruptCheckpointError(f"{path}: {fname} is corrupt (SHA-256 differs from the manifest)")
    saved = manifest["fingerprint"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise TrainCheckpointError(f"{path} was written by a different training setup: " + "; ".join(diffs))
    return manifest


def load_checkpoint(path: str, fingerprint: dict) -> dict:
    """`verify_checkpoint`, then `read_state`."""
    verify_checkpoint(path, fingerprint)
    return read_state(path)


def read_state(path: str) -> dict:
    """The state of a verified checkpoint, unpickled with `weights_only=True`: tensors, dicts, lists, tuples,
    numbers, strings and None, never arbitrary objects (a crafted file cannot run code)."""
    try:
        return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the state is a corrupt checkpoint
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} cannot be read ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None


def find_resumable(save_dir: str, fingerprint: dict) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint under `save_dir` that verifies, [(path, why skipped)] for each newer corrupt one).
    None when there is no checkpoint; CorruptCheckpointError naming every one when none is intact; a checkpoint
    of a different setup (TrainCheckpointError) is never skipped: the run's settings changed, not its files."""
    skipped: list[tuple[str, str]] = []
    for _, path in reversed(list_checkpoints(save_dir)):
        try:
            verify_checkpoint(path, fingerprint)
        except CorruptCheckpointError as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    if skipped:
        raise CorruptCheckpointError(f"no intact checkpoint in {save_dir}: " + "; ".join(why for _, why in skipped))
    return None, []


def latest_checkpoint(save_dir: str) -> str | None:
    cks = list_checkpoints(save_dir)
    return cks[-1][1] if cks else None
