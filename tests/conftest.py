"""Triton kernels (ringlinear.ops.lightning, ops.fp8) run in the interpreter on the CPU: set before triton is
imported (only when no GPU is present, so `pytest -m gpu` on the device runs the compiled kernels)."""

import gc
import os
import traceback

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fused_path(monkeypatch):
    """`fused, ref = fused_path(run, "pkg.mod.Fn.apply", stand_in)`: `run()` under the torch backend (ref), then
    under the Triton backend once with `Fn.apply` replaced by `stand_in` (asserting that `run` reaches it: the
    module takes the fused path) and once as is (fused)."""

    def check(run, target, stand_in):
        monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
        ref = run()
        monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, lambda *a, **kw: calls.append(1) or stand_in(*a, **kw))
            run()
        assert calls, f"{target} was not called: the module did not take the fused path"
        return run(), ref

    return check


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    """Engines size their cache from the memory the process holds (as vLLM): free each test's engines and cached
    blocks before the next test plans its own."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's traceback keeps its frames, and with them its engines and their cache, until the session
    ends: the next tests on the GPU would then plan from memory that is gone. Once the report is written, the
    frames' locals are dropped."""
    yield
    if call.excinfo is not None and torch.cuda.is_available():
        traceback.clear_frames(call.excinfo.tb)
