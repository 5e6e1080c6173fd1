"""Helpers of the server tests: a tiny random checkpoint with the byte-level tokenizer, a server over real HTTP
(uvicorn in a thread on a loopback port, httpx client), SSE parsing, and the engine's idle check."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import uvicorn

from ringlinear.config import preset
from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.hf import save_model
from ringlinear.model import init_model
from ringlinear.serve.app import build_app
from ringlinear.serve.async_engine import AsyncLLMEngine
from ringlinear.serve.config import ServerConfig
from ringlinear.serve.server import uvicorn_config
from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

MAX_LEN = 2048
# prefix_state_interval 64: short prompts keep their end-of-prompt snapshot (interval / 8 tokens or more)
ENGINE_KW = dict(max_model_len=MAX_LEN, cpu_cache_gib=0.05, prefix_state_interval=64, verbose=False)
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 8}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def write_checkpoint(d) -> str:
    save_model(init_model(preset("tiny"), seed=1), str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    return str(d)


@contextlib.contextmanager
def running_server(ckpt: str, server_config: ServerConfig | None = None, **engine_kw):
    """A server on 127.0.0.1 (any free port), set up as `serve()` sets it up: SimpleNamespace(url, client,
    engine: AsyncLLMEngine, app)."""
    cfg = server_config or ServerConfig(log_level="warning")
    llm_engine = LLMEngine(EngineConfig(model=ckpt, device="cpu", **{**ENGINE_KW, **engine_kw}))
    engine = AsyncLLMEngine(llm_engine, cfg.max_waiting_requests, cfg.request_timeout_s)
    app = build_app(engine, cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn_config(app, cfg))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    client = httpx.Client(base_url=url, timeout=60.0)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        yield SimpleNamespace(url=url, client=client, engine=engine, app=app)
    finally:
        client.close()
        srv.should_exit = True
        thread.join(10)
        engine.shutdown()
        app.state.prompts.shutdown()
        sock.close()


def sse(lines) -> list:
    """SSE `data:` payloads as dicts, the final `[DONE]` as None."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(None if payload == "[DONE]" else json.loads(payload))
    return events


def stream_text(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[str, list]:
    """A streamed request's text (completion or chat deltas joined) and its events (the last None = [DONE])."""
    with httpx.Client(base_url=url, timeout=120.0) as c, c.stream("POST", path, json={**body, "stream": True},
                                                                   headers=headers) as r:
        assert r.status_code == 200, r.read()
        events = sse(r.iter_lines())
    text = ""
    for e in events:
        if e is not None and e.get("choices"):
            ch = e["choices"][0]
            text += ch.get("text", "") or ch.get("delta", {}).get("content", "")
    return text, events


def engine_idle(engine: AsyncLLMEngine) -> bool:
    """No unfinished request, no admission held and every cache block and state slot free (checked on the
    engine thread)."""
    def check():
        cache = engine.engine.scheduler.cache
        return (not engine.engine.has_unfinished_requests() and cache.num_free_blocks() == cache.layout.num_blocks
                and len(cache.free_slots) == cache.layout.num_slots)

    return engine.call(check).result(timeout=30) and engine.num_admitted == 0


def wait_idle(engine: AsyncLLMEngine, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not engine_idle(engine):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
