"""A bounded graceful shutdown (issue 27, item 6): `serve()` in a child process gets SIGTERM while one long and
one short request stream: it stops accepting connections, the short request completes, the long one is ended
after the grace period with finish_reason "abort" and [DONE], and the process exits."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serving import sse  # noqa: E402

GRACE_S = 4.0
# the child's engine steps at most 100 times a second, so the long request (4000 tokens) surely outlasts the grace
# period and the short one (15 tokens) surely fits in it, however fast or loaded the machine
CHILD = f"""
import sys, time
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.serve import ServerConfig, serve
step = LLMEngine.step
LLMEngine.step = lambda self: (time.sleep(0.01), step(self))[1]
serve(EngineConfig(model=sys.argv[1], device="cpu", max_model_len=4096, cpu_cache_gib=0.05, verbose=False),
      ServerConfig(port=int(sys.argv[2]), graceful_shutdown_timeout_s={GRACE_S}, log_level="warning"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_shuts_down_within_the_grace_period(ckpt):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ckpt, str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        results, started = {}, {"long": threading.Event(), "short": threading.Event()}

        def stream(key, max_tokens):
            body = {"prompt": key, "temperature": 0, "ignore_eos": True, "max_tokens": max_tokens, "stream": True}
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    started[key].set()
                    lines.append(line)
            results[key] = sse(lines)

        threads = [threading.Thread(target=stream, args=("long", 4000)), threading.Thread(target=stream,
                                                                                         args=("short", 15))]
        for t in threads:
            t.start()
        assert started["long"].wait(60) and started["short"].wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/health", timeout=5)
        for t in threads:
            t.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        elapsed = time.monotonic() - t0
        assert results["short"][-1] is None and results["short"][-2]["choices"][0]["finish_reason"] == "length"
        events = results["long"]
        assert events[-1] is None and events[-2]["choices"][0]["finish_reason"] == "abort", json.dumps(events[-3:])
        assert GRACE_S <= elapsed < 30  # the grace period and the final messages, not the 4000 tokens
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
