"""Which implementation an op runs: the Triton kernels or the PyTorch reference (`naive.py` of each op).

Default: Triton for CUDA tensors, the reference elsewhere. `use_backend("torch" | "triton")` overrides it for
the calls made inside the block, in this thread only (a context variable: no process-wide state changes);
`RINGLINEAR_BACKEND` sets the process default. With `TRITON_INTERPRET=1` and "triton", the kernels run in
Triton's interpreter on the CPU (how CPU tests check them). Every environment variable ringlinear reads:

    RINGLINEAR_BACKEND=triton|torch   the default backend of every op (unset: Triton on CUDA, torch elsewhere)
    RINGLINEAR_VARLEN_ATTN=0          packed softmax attention one SDPA call per sequence (default: one call per
                                      batch: varlen flash for bf16/fp16, padded SDPA for fp32)
    RINGLINEAR_FUSED_CE=0             lm_head + cross entropy without the Triton loss/grad kernel
    TRITON_INTERPRET=1                Triton's own switch: run kernels in its CPU interpreter
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "torch")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("ringlinear_backend", default=None)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports; without it every op runs its PyTorch reference (one warning, the first time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn("triton is not installed: ringlinear runs the PyTorch references of its kernels", stacklevel=2)
        return False
    return True


def _check(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops called inside the block on backend `name` ("triton" or "torch"); None keeps the default."""
    if name is None:
        yield
        return
    token = _override.set(_check(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or `RINGLINEAR_BACKEND`, or None (dispatch by device)."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("RINGLINEAR_BACKEND", "").strip()
    return _check(env, "RINGLINEAR_BACKEND") if env else None


def backend_for(x: torch.Tensor) -> str:
    """The path a call on tensor `x` takes: the forced backend, else Triton on CUDA (when installed), else torch."""
    forced = forced_backend()
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for, but Triton is not installed")
        return "triton"
    if forced == "torch":
        return "torch"
    return "triton" if x.is_cuda and triton_available() else "torch"


def use_triton(x: torch.Tensor) -> bool:
    return backend_for(x) == "triton"


def varlen_attention_enabled() -> bool:
    """Whether packed softmax attention may run as one call per batch (`RINGLINEAR_VARLEN_ATTN`, default on)."""
    return os.environ.get("RINGLINEAR_VARLEN_ATTN", "1") != "0"


def fused_cross_entropy_enabled() -> bool:
    """Whether the lm_head + cross entropy uses the Triton loss/grad kernel on CUDA (`RINGLINEAR_FUSED_CE`)."""
    return os.environ.get("RINGLINEAR_FUSED_CE", "1") != "0"
