"""The server's defences (issue 27, item 6): the API key on /v1/* (not /health), the Host allow-list against
DNS rebinding, JSON Content-Type on POST, CORS off unless configured, 429 past the admitted requests, the time
limit on a request (finish_reason "length", slot freed), the idle keep-alive timeout; ServerConfig's checks."""

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serving import GREEDY, running_server, sse, wait_idle  # noqa: E402

from ringlinear.serve.config import ServerConfig  # noqa: E402

KEY = "sekrit-key"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def guarded(ckpt):
    cfg = ServerConfig(api_key=KEY, cors_allow_origins=[ORIGIN], log_level="warning")
    with running_server(ckpt, cfg) as s:
        yield s


def test_api_key(guarded):
    c, auth = guarded.client, {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "hi", **GREEDY}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for r in (c.post("/v1/completions", json=body, headers=headers), c.get("/v1/models", headers=headers)):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert c.post("/v1/completions", json=body, headers=auth).status_code == 200
    assert c.post("/v1/completions", json=body, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert c.get("/health").status_code == 200


def test_host_allow_list(server):
    """Bound to loopback, the server answers only for loopback names: a page on evil.example resolving to
    127.0.0.1 (DNS rebinding) is refused."""
    port = server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert server.client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "", "localhost.evil"):
        r = server.client.post("/v1/completions", json={"prompt": "hi", **GREEDY}, headers={"Host": host})
        assert r.status_code == 400 and "Host" in r.json()["error"]["message"], host
    assert ServerConfig(host="0.0.0.0").host_allow_list() == ["*"]
    assert ServerConfig(allowed_hosts=["Api.Example"]).host_allow_list() == ["api.example"]


def test_json_content_type_required(server):
    body = b'{"prompt": "hi", "max_tokens": 2}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = server.client.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.text)
    r = server.client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_cors(server, guarded):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = guarded.client.options("/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = guarded.client.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = guarded.client.get("/v1/models", headers={"Origin": ORIGIN})  # refused, but readable by the page
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    # off by default: no CORS headers, so a browser keeps other origins' pages from reading anything
    r = server.client.options("/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = server.client.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_waiting_limit_and_request_time_limit(ckpt):
    """One running + one waiting request admitted, the third is a 429; a request past the time limit finishes
    with finish_reason "length" (streamed too) and frees its slot; then the server takes requests again."""
    cfg = ServerConfig(max_waiting_requests=1, request_timeout_s=1.0, log_level="warning")
    with running_server(ckpt, cfg, max_num_seqs=1) as s:
        long = {"prompt": "go on", "temperature": 0, "ignore_eos": True, "max_tokens": 2000}
        results, first = {}, threading.Event()

        def stream(key):
            with httpx.Client(base_url=s.url, timeout=60.0) as c, c.stream(
                    "POST", "/v1/completions", json={**long, "stream": True}) as r:
                results[key] = r.status_code
                events = []
                for line in r.iter_lines():
                    first.set()
                    events += sse([line])
                results[key + "-events"] = events

        threads = [threading.Thread(target=stream, args=(k,)) for k in ("a", "b")]
        for t in threads:
            t.start()
        assert first.wait(30)
        deadline = time.monotonic() + 30
        while s.engine.num_admitted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = s.client.post("/v1/completions", json={"prompt": "hi", **GREEDY})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join(60)
        for k in ("a", "b"):
            events = results[k + "-events"]
            assert results[k] == 200 and events[-1] is None
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            assert len("".join(e["choices"][0]["text"] for e in events[:-1])) < 2000
        assert wait_idle(s.engine)
        r = s.client.post("/v1/completions", json=long)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] < 2000
        assert s.client.post("/v1/completions", json={"prompt": "hi", **GREEDY}).status_code == 200
        assert wait_idle(s.engine)


def test_idle_keep_alive_connection_is_closed(ckpt):
    cfg = ServerConfig(keep_alive_timeout_s=0.3, log_level="warning")
    with running_server(ckpt, cfg) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while b'{"status":"ok"}' not in data:
                data += sock.recv(4096)
            sock.settimeout(3.0)  # uvicorn's default keep-alive is 5 s: only the configured 0.3 s closes it here
            assert sock.recv(4096) == b""


@pytest.mark.parametrize("field,value", [
    ("port", 70000), ("port", "80"), ("api_key", ""), ("allowed_hosts", []), ("allowed_hosts", "localhost"),
    ("cors_allow_origins", None), ("max_request_body_bytes", 10), ("request_timeout_s", 0),
    ("request_timeout_s", float("nan")), ("keep_alive_timeout_s", float("inf")), ("max_waiting_requests", -1),
    ("graceful_shutdown_timeout_s", True), ("max_connections", 0), ("tokenizer_threads", 0), ("log_level", "loud"),
])
def test_server_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"server config field {field}=.*: must be"):
        ServerConfig(**{field: value})
