"""Each rank reads only its slices of an HF safetensors checkpoint (`safe_open(...).get_slice`: the bytes of those
rows or columns, never a whole tensor it does not hold) into a model built on `meta`, parallelized
(`tensor_parallel.parallelize_for_inference`) and given its FP8 slots (`quantization.quantize_fp8`). FP8 weights
on disk (e4m3 + `weight_scale_inv`) are copied as they are when a rank's slice is made of whole 128x128 blocks,
else dequantized and requantized over its own blocks; bf16 weights meant to run in FP8 are quantized on the
device, one tensor (one expert) at a time. `load_for_inference` does it all for the engine.
"""

from __future__ import annotations

import math
import os
import re
import resource
import zlib

import torch
from safetensors import safe_open
from torch import nn

from ringlinear.config import RingLinearConfig
from ringlinear.distributed.tensor_parallel import Piece, ShardGroup, Source, expert_sources, shard_model
from ringlinear.hf import CheckpointError, canonical_name, read_weight_map
from ringlinear.model import build_model
from ringlinear.ops.fp8.inference import quantize_weight
from ringlinear.ops.fp8.naive import BLOCK, FP8, dequantize_blockwise

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "F8_E4M3": FP8, "I64": torch.int64, "I32": torch.int32}
_STACKED = re.compile(r"^(.*\.mlp\.)(gate_proj|up_proj|down_proj)$")


class CheckpointReader:
    """Slices of the tensors of an HF checkpoint directory, by canonical name (`ringlinear.hf.canonical_name`)."""

    def __init__(self, path: str):
        self.path = path
        self.where = {canonical_name(k): (k, f) for k, f in read_weight_map(path).items()}
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _slice(self, name: str):
        disk, fname = self.where[name]
        if fname not in self._files:
            fpath = os.path.join(self.path, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"{self.path}: the index lists shard {fname}, which does not exist")
            self._files[fname] = safe_open(fpath, "pt")
        return self._files[fname].get_slice(disk)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        d = self._slice(name).get_dtype()
        if d not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {d}, which we do not load")
        return _SAFETENSORS_DTYPES[d]

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of `dim` (0 or 1) of tensor `name`, on the CPU."""
        sl = self._slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def default_source(name: str, tensor: torch.Tensor) -> Source:
    """Where a tensor of an unsplit model lies: stacked experts are one HF tensor per expert, the rest by name."""
    m = _STACKED.match(name)
    if m and tensor.dim() == 3:
        return expert_sources(m.group(1), 0, tensor.shape[0])[name]
    return Source((Piece(name),))


def sources_of(model: nn.Module) -> dict[str, Source]:
    """Model state-dict name -> its Source, for every tensor a checkpoint fills (block scales ride with their
    weights and are not listed)."""
    given = getattr(model, "checkpoint_sources", {})
    return {name: given.get(name) or default_source(name, t) for name, t in model.state_dict(keep_vars=True).items()
            if not name.endswith("_scale_inv")}


class _Loader:
    def __init__(self, reader):
        self.reader = reader

    def _stop(self, p: Piece) -> int:
        return self.reader.shape(p.name)[p.dim] if p.stop is None else p.stop

    def _scale_name(self, p: Piece) -> str:
        name = p.name + "_scale_inv"
        if name not in self.reader:
            raise CheckpointError(f"{p.name} is float8_e4m3fn but the checkpoint has no {name} (its block scales)")
        return name

    def dense_piece(self, p: Piece) -> torch.Tensor:
        """The piece's values (FP8 on disk: dequantized over the whole blocks that cover it, then cut)."""
        stop = self._stop(p)
        if self.reader.dtype(p.name) != FP8:
            return self.reader.read(p.name, p.dim, p.start, stop)
        size = self.reader.shape(p.name)[p.dim]
        a, b = p.start // BLOCK * BLOCK, min(size, math.ceil(stop / BLOCK) * BLOCK)
        w8 = self.reader.read(p.name, p.dim, a, b)
        scale = self.reader.read(self._scale_name(p), p.dim, a // BLOCK, math.ceil(b / BLOCK))
        return dequantize_blockwise(w8, scale).narrow(p.dim, p.start - a, stop - p.start)

    def dense(self, src: Source) -> torch.Tensor:
        parts = [self.dense_piece(p) for p in src.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, src.pieces[0].dim)

    def fp8_as_is(self, src: Source) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(e4m3, scales) of the slice when the disk holds it in FP8 as whole blocks of the local tensor, else None."""
        ws, ss = [], []
        for i, p in enumerate(src.pieces):
            if self.reader.dtype(p.name) != FP8:
                return None
            stop, size = self._stop(p), self.reader.shape(p.name)[p.dim]
            last = i == len(src.pieces) - 1
            if p.start % BLOCK or (stop - p.start) % BLOCK and not (last and stop == size):
                return None  # a block of this rank's tensor would hold rows of two disk blocks
            ws.append(self.reader.read(p.name, p.dim, p.start, stop))
            ss.append(self.reader.read(self._scale_name(p), p.dim, p.start // BLOCK, math.ceil(stop / BLOCK)))
        dim = src.pieces[0].dim
        return (ws[0], ss[0]) if len(ws) == 1 else (torch.cat(ws, dim), torch.cat(ss, dim))

    def put(self, name: str, dst: torch.Tensor, scale: torch.Tensor | None, src: Source) -> None:
        if scale is None:
            v = self.dense(src)
            if src.rows is not None and v.shape[0] < src.rows:  # the last vocabulary shard: zero rows
                dst[v.shape[0]:].zero_()
                dst = dst[: v.shape[0]]
            self._copy(name, dst, v)
            return
        as_is = self.fp8_as_is(src)
        if as_is is None:
            as_is = quantize_weight(self.dense(src).to(dst.device))
        self._copy(name, dst, as_is[0])
        self._copy(name + "_scale_inv", scale, as_is[1])

    @staticmethod
    def _copy(name: str, dst: torch.Tensor, v: torch.Tensor) -> None:
        if tuple(v.shape) != tuple(dst.shape):
            raise CheckpointError(f"{name}: the checkpoint's slice is {list(v.shape)}, this rank's tensor "
                                  f"{list(dst.shape)} (does config.json match the weights?)")
        dst.copy_(v)


@torch.no_grad()
def load_shards(model: nn.Module, reader, progress: bool = False) -> None:
    """Fill every tensor of `model` (materialised, e.g. `to_empty`) from `reader` (a CheckpointReader or a
    RandomReader) by `sources_of(model)`; raise CheckpointError listing the tensors the checkpoint lacks."""
    state = model.state_dict(keep_vars=True)
    sources = sources_of(model)
    missing = sorted({p.name for s in sources.values() for p in s.pieces if p.name not in reader})
    if missing:
        more = f" ... (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint {getattr(reader, 'path', '')} lacks {len(missing)} tensors this model "
                              f"reads: {', '.join(missing[:8])}{more}")
    loader = _Loader(reader)
    items = list(sources.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="loading shards", unit="tensor")
    for name, src in items:
        dst, scale = state[name], state.get(name + "_scale_inv")
        if src.stack:
            for j, piece in enumerate(src.pieces):  # one expert at a time: host memory holds one at most
                loader.put(name, dst[j], None if scale is None else scale[j], Source((piece,)))
        else:
            loader.put(name, dst, scale, src)


class RandomReader:
    """Random checkpoint tensors (`load_format="dummy"`: benchmarks, no checkpoint, no host copy), read like a
    checkpoint: each HF tensor is made whole on `device` from a generator seeded by its name (N(0, std) matrices,
    unit norms, zero biases and expert biases) and the reads cut it, so N tensor-parallel ranks hold the slices of
    the very weights one rank holds (their greedy tokens can be compared). FP8 slots are quantized from these
    values by the loader, as for a bf16 checkpoint."""

    def __init__(self, config: RingLinearConfig, device: torch.device, dtype: torch.dtype | None = None,
                 std: float = 0.02):
        whole = build_model(config, "meta", dtype)
        whole.model.mtp = nn.ModuleList()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name, t in whole.state_dict(keep_vars=True).items():
            for p in default_source(name, t).pieces:
                self.shapes[p.name] = tuple(t.shape[1:]) if t.dim() == 3 else tuple(t.shape)
                self.dtypes[p.name] = t.dtype
        self.device, self.std = device, std
        self._last: tuple[str, torch.Tensor] | None = None  # fused tensors (qkv) are read piece by piece

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    def _tensor(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        shape, dtype = self.shapes[name], self.dtypes[name]
        if "norm" in name:
            t = torch.ones(shape, device=self.device, dtype=dtype)
        elif len(shape) < 2 or name.endswith("expert_bias"):
            t = torch.zeros(shape, device=self.device, dtype=dtype)
        else:
            g = torch.Generator(self.device).manual_seed(zlib.crc32(name.encode()))
            t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32).mul_(self.std).to(dtype)
        self._last = (name, t)
        return t

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._tensor(name).narrow(dim, start, stop - start)


def peak_host_memory() -> int:
    """This process's peak resident memory, bytes (getrusage: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_for_inference(path: str | None, device: torch.device, dtype: torch.dtype | None = None,
                       group: ShardGroup | None = None, quantization: str | None = None,
                       progress: bool = False, reader=None, config: RingLinearConfig | None = None,
                       dummy: bool = False) -> nn.Module:
    """This rank's slice of the checkpoint at `path` (or `reader` + `config`), ready to run on `device`: built on
    meta, split over `group` (None: one rank), FP8 where `quantization == "fp8"` asks or the checkpoint holds FP8,
    materialised and filled slice by slice. `dummy`: random weights instead (`RandomReader`; `path` may be a
    preset name), nothing read. The MTP modules are not loaded (the engine does not run them)."""
    from ringlinear.config import PRESETS, preset
    from ringlinear.loading.fp8 import QUANTIZATIONS, fp8_checkpoint, fp8_weight_names, quantize_fp8

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: one of {QUANTIZATIONS} or None")
    if config is None:
        config = preset(path) if dummy and path in PRESETS else RingLinearConfig.load(path)
    if dummy:
        reader = RandomReader(config, device, dtype)
    reader = reader or CheckpointReader(path)
    on_disk_fp8 = fp8_checkpoint(config) and not dummy
    model = build_model(config, "meta", dtype)
    model.model.mtp = nn.ModuleList()
    if group is not None and group.size > 1:
        shard_model(model, group)
    if quantization == "fp8" or on_disk_fp8:
        sources = sources_of(model)

        def stored_fp8(name: str) -> bool:
            p = sources[name].pieces[0]
            return p.name in reader and reader.dtype(p.name) == FP8

        quantize_fp8(model, None if quantization == "fp8" else stored_fp8)
        if quantization is None and not any(stored_fp8(n) for n in fp8_weight_names(model)):
            raise CheckpointError(f"{path}: config.json has a quantization_config of FP8, but none of the weights is "
                                  "float8_e4m3fn")
    model.to_empty(device=device)
    load_shards(model, reader, progress and not dummy)
    model.reset_buffers()
    model.source_path = os.path.abspath(path) if path and os.path.isdir(path) else None
    return model.eval()
