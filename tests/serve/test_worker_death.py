"""A tensor-parallel server whose worker process dies ends with an error naming the worker (not a hang): served
over 2 gloo ranks on the CPU, its worker killed while the server is idle, the server process exits non-zero within
seconds; and the engine thread fails pending calls with the engine's error and tells the server to stop."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_shutdown import free_port  # noqa: E402

from ringlinear.engine.workers import EngineDeadError  # noqa: E402
from ringlinear.serve.async_engine import AsyncLLMEngine  # noqa: E402


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the worker through /proc")
def test_dead_worker_ends_the_server(ckpt):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "ringlinear.cli", "serve", "--model", ckpt, "--device", "cpu",
                             "--tensor-parallel-size", "2", "--cpu-cache-gib", "0.05", "--no-verbose", "--port",
                             str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        (worker,) = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
        os.kill(worker, signal.SIGKILL)
        code = proc.wait(timeout=60)  # idle: the engine thread sees the death within a second
        out = proc.stdout.read()
        assert code != 0 and "worker rank 1" in out and "exited with code -9" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


class _DeadEngine:
    model_name, max_model_len = "x", 16
    engine_config = type("C", (), {"max_num_seqs": 1})()

    def __init__(self):
        self.failure = None

    def step(self):
        raise EngineDeadError("tensor-parallel worker rank 1 died")

    def has_unfinished_requests(self):
        return True

    def add_request(self, *a):
        pass

    def abort_request(self, *a):
        pass


def test_a_fatal_step_stops_the_engine_thread():
    eng = _DeadEngine()
    seen = []
    a = AsyncLLMEngine(eng)
    a.on_fatal = seen.append
    assert a.call(lambda: 7).result(5) == 7  # the call runs, then the step after it raises
    a._thread.join(5)
    assert not a._thread.is_alive() and not a.alive
    assert isinstance(a.fatal_error, EngineDeadError) and seen == [a.fatal_error]
    with pytest.raises(RuntimeError, match="shut down"):
        a.call(lambda: None)
