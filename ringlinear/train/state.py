"""Crash-safe, sharded training checkpoints: `{save_dir}/step-{N:08d}/` holds the fp32 master weights, buffers and
AdamW moments written with `torch.distributed.checkpoint` (DCP: each rank writes its own shards, `__{rank}_*.distcp`,
rank 0 the `.metadata`; loading reshards onto any number of ranks), `trainer_state.json` (step, scheduler,
optimizer hyperparameters, data position, RNG states, history: plain JSON) and `manifest.json` (a fingerprint of
the run and a SHA-256 per file, each rank hashing the files it wrote). A save is written into
`.step-{N:08d}.tmp-{tag}` and renamed once every rank's files are complete (never a half-written checkpoint),
synchronously or in a background thread after a CPU copy of the state (`async_save`: the step does not wait for
the disk). Loading verifies checksums and fingerprint, reads the DCP metadata with an allow-list unpickler and
the tensors with `weights_only`: nothing in a checkpoint can run code. Resuming takes the newest intact checkpoint
(a corrupt newer one is skipped, with the reason); what killed saves left behind is removed; one trainer at a
time holds a save directory (`SaveDirLock`).
"""

from __future__ import annotations

import base64
import glob
import json
import math
import os
import pickle
import random
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import nn

from ringlinear.files import commit_dir, remove_atomically, remove_interrupted, sha256_file, temp_dir_for

MANIFEST = "manifest.json"
META_FILE = "trainer_state.json"
FORMAT = "ringlinear-train-v2"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# DCP warns on every single-process save/load, even when asked for one (no_dist=True), and from the async thread
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                                          r"assuming the intent is to (save|load) in a single process")


class TrainCheckpointError(RuntimeError):
    """A training checkpoint is corrupt, incomplete, or belongs to a different run."""


class CorruptCheckpointError(TrainCheckpointError):
    """A checkpoint's files are missing, altered or unreadable (resume falls back to an older one)."""


# ---- plain state as JSON ----------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": _bytes(torch.get_rng_state()), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def encode_floats(value):
    """JSON-safe copy of `value`: a non-finite float becomes {"__float__": "inf" | "-inf" | "nan"} (restored by
    `decode_floats`: the resumed history is the saved one exactly)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def decode_floats(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


# ---- the tensors of a checkpoint --------------------------------------------------------------------------------
def named_masters(model: nn.Module, pairs) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, its fp32 master) for `MasterWeights.pairs` in `model.parameters()` order."""
    names = [n for n, _ in model.named_parameters()]
    if len(names) != len(pairs):
        raise TrainCheckpointError("the master weights do not match the model's parameters")
    return [(n, m) for n, (_, m) in zip(names, pairs)]


def checkpoint_tensors(model: nn.Module, pairs, optimizer: torch.optim.Optimizer) -> dict:
    """The DCP state dict: {"model": {name: fp32 master (a DTensor shard under FSDP) or persistent buffer},
    "optim": {name: {"exp_avg", "exp_avg_sq", "step"}}} for every parameter the optimizer holds state for. The
    live tensors themselves: `dcp.save` reads them, `dcp.load` fills them in place."""
    masters = named_masters(model, pairs)
    tensors = {name: m for name, m in masters}
    non_persistent = {f"{mn}.{bn}" if mn else bn for mn, mod in model.named_modules()
                      for bn in getattr(mod, "_non_persistent_buffers_set", ())}
    tensors.update({n: b for n, b in model.named_buffers() if n not in non_persistent})
    optim = {name: dict(optimizer.state[m]) for name, m in masters if optimizer.state.get(m)}
    return {"model": tensors, "optim": optim}


def allocate_optimizer_state(model: nn.Module, pairs, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """Empty AdamW state (what its first step creates) for the parameters `names`, so that `dcp.load` has tensors
    of the right shape and sharding to fill."""
    by_name = dict(named_masters(model, pairs))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name in names:
        if name not in by_name:
            raise TrainCheckpointError(f"the checkpoint has optimizer state for {name}, which this model lacks")
        m = by_name[name]
        g = group_of[id(m)]
        on_device = g.get("fused") or g.get("capturable")
        step = torch.zeros((), dtype=torch.float32, device=m.device if on_device else "cpu")
        optimizer.state[m] = {"step": step, "exp_avg": torch.zeros_like(m, memory_format=torch.preserve_format),
                              "exp_avg_sq": torch.zeros_like(m, memory_format=torch.preserve_format)}


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The hyperparameters of each param group (lr as the scheduler left it, betas, ...), without the params."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def set_optimizer_groups(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    if len(groups) != len(optimizer.param_groups):
        raise TrainCheckpointError(f"the checkpoint has {len(groups)} optimizer param groups, this run "
                                   f"{len(optimizer.param_groups)}")
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})


# ---- reading DCP checkpoints without running code ---------------------------------------------------------------
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", n) for n in ("_StorageInfo", "_StoragePrefix", "SerializationFormat")
} | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: this unpickler builds only the metadata classes, torch.Size, dtypes and
    memory formats; any other global (os.system, builtins.eval, ...) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _safe_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _tensor_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # the default torch.loads arbitrary pickled objects
            raise TrainCheckpointError(f"checkpoint item {read_item.dest_index.fqn} is a pickled object, not a tensor")

    return TensorOnlyLoadPlanner()


def load_tensors(path: str, tensors: dict, group=None) -> None:
    """Fill `tensors` (a `checkpoint_tensors` dict, any sharding) in place from checkpoint `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        dcp.load(tensors, storage_reader=_safe_reader(path), planner=_tensor_only_planner(), process_group=group,
                 no_dist=not dist.is_initialized())
    except TrainCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - an unreadable shard or metadata: corrupt
        causes = getattr(e, "failures", None) or {None: e}  # CheckpointException: rank -> its exception
        why = "; ".join(f"{'' if r is None else f'rank {r}: '}{type(x).__name__}: "
                        f"{(str(x).strip().splitlines() or [''])[-1]}" for r, x in causes.items())
        raise CorruptCheckpointError(f"{path}: the sharded tensors cannot be read ({why})") from None


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            return decode_floats(json.load(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: {META_FILE} cannot be read ({e})") from None


# ---- the save directory -----------------------------------------------------------------------------------------
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
    directory's lock and calls this when it has no save pending)."""
    return remove_interrupted(save_dir)


# ---- saving -----------------------------------------------------------------------------------------------------
class Checkpointer:
    """Writes checkpoints of one run: `save` starts one (every rank, collectively), `wait` finishes it; with
    `async_save` the tensors are copied to CPU memory and written by a background thread while training goes on
    (one save in flight at a time: the next `save` waits for the previous). `group`: a gloo process group the
    background thread may use while the training collectives use the default one (None on one process)."""

    def __init__(self, save_dir: str, rank: int, world: int, keep: int, async_save: bool, group=None,
                 tag: str = "0"):
        self.save_dir, self.rank, self.world, self.keep = save_dir, rank, world, keep
        self.async_save, self.group, self.tag = async_save, group, tag
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future | None = None
        self.last_committed: str | None = None

    def save(self, step: int, tensors: dict, meta: dict, fingerprint: dict) -> None:
        self.wait()
        path = step_dir(self.save_dir, step)
        tmp = os.path.join(self.save_dir, f".step-{step:08d}.tmp-{self.tag}")
        if self.rank == 0:
            remove_interrupted_saves(self.save_dir)  # nothing of ours is in flight: leftovers are a killed run's
            tmp = temp_dir_for(path, self.tag)
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump(encode_floats(meta), f, allow_nan=False)
        if self.world > 1:
            dist.barrier()  # the directory exists before any rank writes into it
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(tmp, thread_count=1)
        no_dist = self.world == 1
        if self.async_save:
            fut = dcp.async_save(tensors, storage_writer=writer, process_group=self.group, no_dist=no_dist)
            self._pending = self._pool.submit(self._finish_after, fut, step, tmp, path, fingerprint)
        else:
            dcp.save(tensors, storage_writer=writer, process_group=self.group, no_dist=no_dist)
            self._finish(step, tmp, path, fingerprint)

    def _finish_after(self, fut, step, tmp, path, fingerprint) -> str | None:
        fut.result()
        return self._finish(step, tmp, path, fingerprint)

    def _finish(self, step: int, tmp: str, path: str, fingerprint: dict) -> str | None:
        """Every rank hashes the files it wrote; rank 0 writes the manifest and renames the directory into place.
        A rank killed before this point leaves only the temp directory."""
        mine = {os.path.basename(f): sha256_file(f) for f in sorted(glob.glob(os.path.join(tmp, f"__{self.rank}_*")))}
        if self.world > 1:
            every = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, every, dst=0, group=self.group)
        else:
            every = [mine]
        if self.rank != 0:
            return None
        sha = {}
        for part in every:
            sha.update(part)
        for name in (".metadata", META_FILE):
            sha[name] = sha256_file(os.path.join(tmp, name))
        on_disk = {n for n in os.listdir(tmp)}
        if on_disk != set(sha):
            raise TrainCheckpointError(f"{tmp}: files {sorted(on_disk ^ set(sha))} were not accounted for by a rank")
        manifest = {"format": FORMAT, "step": step, "fingerprint": fingerprint, "sha256": sha}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        commit_dir(tmp, path)
        if self.keep > 0:
            for _, old in list_checkpoints(self.save_dir)[:-self.keep]:
                remove_atomically(old)
        self.last_committed = path
        return path

    def pending(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self) -> str | None:
        """Finish the save in flight (re-raising its error); the path it committed (rank 0) or None."""
        if self._pending is None:
            return None
        fut, self._pending = self._pending, None
        return fut.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


# ---- verifying and choosing -------------------------------------------------------------------------------------
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
        if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
            raise CorruptCheckpointError(f"{path}: {MANIFEST} lists {fname!r}, not a file name inside the checkpoint")
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CorruptCheckpointError(f"{path}: {fname} is missing")
        if sha256_file(fpath) != digest:
            raise CorruptCheckpointError(f"{path}: {fname} is corrupt (SHA-256 differs from the manifest)")
    for need in (".metadata", META_FILE):
        if need not in files:
            raise CorruptCheckpointError(f"{path}: {MANIFEST} does not list {need}")
    saved = manifest["fingerprint"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise TrainCheckpointError(f"{path} was written by a different training setup: " + "; ".join(diffs))
    return manifest


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


