"""The backend switch: a context-scoped override that changes no environment variable and stays in its thread,
the environment default, and refusal of unknown names."""

import os
import threading

import pytest
import torch

from ringlinear.ops.backend import backend_for, forced_backend, use_backend


def test_use_backend_is_scoped_and_writes_no_environment(monkeypatch):
    monkeypatch.delenv("RINGLINEAR_BACKEND", raising=False)
    x = torch.zeros(1)
    before = dict(os.environ)
    assert backend_for(x) == "torch" and forced_backend() is None
    with use_backend("triton"):
        assert backend_for(x) == "triton" and dict(os.environ) == before
        seen = []
        t = threading.Thread(target=lambda: seen.append(forced_backend()))
        t.start()
        t.join()
        assert seen == [None]  # another thread keeps its own default
        with use_backend("torch"):
            assert backend_for(x) == "torch"
        assert backend_for(x) == "triton"
    assert forced_backend() is None and dict(os.environ) == before
    with use_backend(None):
        assert forced_backend() is None


def test_environment_default_and_bad_names(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    assert backend_for(torch.zeros(1)) == "triton"
    with use_backend("torch"):
        assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("RINGLINEAR_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RINGLINEAR_BACKEND='cuda' is not one of"):
        backend_for(torch.zeros(1))
    with pytest.raises(ValueError, match="backend='tpu' is not one of"), use_backend("tpu"):
        pass
