"""Triton kernels (ringlinear.ops.lightning, ops.fp8) run in the interpreter on the CPU: set before triton is
imported (only when no GPU is present, so `pytest -m gpu` on the device runs the compiled kernels)."""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def spy_calls():
    """`with spy_calls("pkg.mod.fn", replacement) as calls:` replaces `fn` by `replacement` inside the block and
    records each call in `calls` (tests that a module takes a given path)."""

    @contextlib.contextmanager
    def spy(target, replacement):
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return replacement(*args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, counted)
            yield calls

    return spy
