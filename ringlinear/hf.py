"""Hugging Face checkpoint layout of Ring-linear: `config.json`, sharded safetensors +
`model.safetensors.index.json`, per-expert tensor names. Loads tensor by tensor into a model built on `meta`
(never two copies of the weights), refuses mismatched checkpoints with the list of differences, and saves
atomically (`ringlinear.files.write_atomically`). Safetensors only: nothing read from a checkpoint runs code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ringlinear.config import RingLinearConfig
from ringlinear.files import write_atomically
from ringlinear.hf_remote import remote_code_files
from ringlinear.model import RingLinearForCausalLM, build_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STACKED = re.compile(r"^(.*\.mlp)\.(gate_proj|up_proj|down_proj)$")
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Names some exports use for the same tensor.
_ALIASES = {".mlp.gate.gate_proj.weight": ".mlp.gate.weight", ".mlp.gate.e_score_correction_bias": ".mlp.gate.expert_bias"}



class CheckpointError(ValueError):
    """The checkpoint on disk does not match the model its config describes."""



# ---- key mapping (model state_dict <-> HF names) ------------------------------------------------
def hf_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One model state_dict entry -> the HF tensors it stands for (stacked experts split per expert)."""
    m = _STACKED.match(name)
    if m and tensor.dim() == 3:
        for e in range(tensor.shape[0]):
            yield f"{m.group(1)}.experts.{e}.{m.group(2)}.weight", tensor[e]
    else:
        yield name, tensor


def canonical_name(hf_name: str) -> str:
    """Undo the aliases some exports use (`mlp.gate.gate_proj.weight` for `mlp.gate.weight`, ...)."""
    for alias, canon in _ALIASES.items():
        if hf_name.endswith(alias):
            return hf_name[: -len(alias)] + canon
    return hf_name


def model_name(hf_name: str) -> tuple[str, int | None]:
    """Canonical HF tensor name -> (model state_dict name, expert index or None)."""
    m = _EXPERT.match(hf_name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return hf_name, None


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF name -> (shape, dtype) for every tensor a checkpoint of `model` holds (works on `meta`)."""
    out = {}
    for name, t in model.state_dict().items():
        for hf_name, piece in hf_tensors(name, t):
            out[hf_name] = (tuple(piece.shape), piece.dtype)
    return out


# ---- loading ----------------------------------------------------------------------------------
@contextlib.contextmanager
def open_safetensors(fpath: str):
    """`safe_open(fpath)`, with a truncated or corrupt file reported as a CheckpointError naming it (the
    library's own message does not say which file)."""
    try:
        f = safe_open(fpath, "pt")
    except SafetensorError as e:
        raise CheckpointError(f"{fpath} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    with f:
        yield f


def _shard_inside(path: str, fname, index: str) -> str:
    """`fname` from the index, refused unless it names a file inside checkpoint directory `path` (no absolute
    paths, no `..`, no symlink out): an index must not make the loader open other files of the machine."""
    if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{index}: a weight_map entry {fname!r} is not a file name")
    root = os.path.realpath(path)
    full = os.path.realpath(os.path.join(root, fname))
    if os.path.isabs(fname) or os.path.commonpath([root, full]) != root or full == root:
        raise CheckpointError(f"{index}: weight_map entry {fname!r} points outside the checkpoint directory {path}")
    return fname


def read_weight_map(path: str) -> dict[str, str]:
    """HF tensor name -> shard file name (relative to `path`, checked to stay inside it)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a JSON object with a weight_map ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file")
        return {k: _shard_inside(path, v, index) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        with open_safetensors(single) as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def check_checkpoint(path: str, model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """Compare names and shapes on disk with what `model` needs; raise CheckpointError listing every
    missing, unexpected and mis-shaped tensor. Returns canonical name -> (name on disk, shard file)."""
    on_disk = {canonical_name(k): (k, fname) for k, fname in read_weight_map(path).items()}
    want = expected_tensors(model)
    missing = sorted(set(want) - set(on_disk))
    unexpected = sorted(on_disk[k][0] for k in set(on_disk) - set(want))
    bad_shapes = []
    by_file: dict[str, list[str]] = {}
    for k in set(want) & set(on_disk):
        by_file.setdefault(on_disk[k][1], []).append(k)
    for fname, names in sorted(by_file.items()):
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{path}: the index lists shard {fname}, which does not exist")
        with open_safetensors(fpath) as f:
            for k in names:
                shape = tuple(f.get_slice(on_disk[k][0]).get_shape())
                if shape != want[k][0]:
                    bad_shapes.append(f"{on_disk[k][0]}: checkpoint {list(shape)}, model {list(want[k][0])}")
    if missing or unexpected or bad_shapes:
        def show(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} with the wrong shape: {show(sorted(bad_shapes))}")
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(parts))
    return on_disk


@torch.no_grad()
def load_model(path: str, device: str | torch.device = "cpu", dtype=None, progress: bool = False) -> RingLinearForCausalLM:
    """Load a Ring-linear checkpoint in the official HF layout onto `device` (each tensor read once,
    copied straight into its parameter slice)."""
    config = RingLinearConfig.load(path)
    model = build_model(config, "meta", dtype)
    on_disk = check_checkpoint(path, model)
    model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for canon, (disk_name, fname) in on_disk.items():
        by_file.setdefault(fname, []).append((canon, disk_name))
    files = sorted(by_file)
    if progress:
        from tqdm import tqdm
        files = tqdm(files, desc="loading shards", unit="shard")
    for fname in files:
        with open_safetensors(os.path.join(path, fname)) as f:
            for canon, disk_name in by_file[fname]:
                mname, e = model_name(canon)
                dst = targets[mname] if e is None else targets[mname][e]
                dst.copy_(f.get_tensor(disk_name))
    model.reset_buffers()
    model.source_path = os.path.abspath(path)  # where save_model finds the checkpoint's own remote code
    return model


# ---- saving -----------------------------------------------------------------------------------
@torch.no_grad()
def save_model(model: RingLinearForCausalLM, path: str, max_shard_bytes: int = 4 * 1024**3,
               extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write `model` in the HF layout at `path`, replacing any previous checkpoint there only once the new
    one is complete. `extra_files`: file name -> text/bytes written beside (tokenizer files, ...). The transformers
    remote code and `auto_map` come along (`ringlinear.hf_remote`): ours, or the checkpoint's own when it has one."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in model.state_dict().items():
        for hf_name, piece in hf_tensors(name, t):
            nbytes = piece.numel() * piece.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][hf_name] = piece.detach().to("cpu").contiguous()
            size += nbytes
            total += nbytes

    def write(tmp: str) -> None:
        config, code = remote_code_files(model.config, path, getattr(model, "source_path", None))
        config.save(tmp)
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        for fname, content in {**code, **(extra_files or {})}.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(os.path.join(tmp, fname), mode) as f:
                f.write(content)

    write_atomically(path, write)
