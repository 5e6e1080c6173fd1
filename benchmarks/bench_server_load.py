"""The server under load and hostile input (issue 27: one request must never hurt another), on the CPU with the
tiny preset (a random checkpoint written to a temp dir, byte-level tokenizer). The real server, `ringlinear serve`
in a process of its own on a loopback port (so its RSS is its own, and the clients do not share its GIL), then:

- load: `--clients` concurrent clients send `--requests` requests each (completions and chat, streamed and not;
  greedy, and seeded sampling, ignore_eos) drawn from `--unique` distinct requests whose outputs were first
  taken alone, one at a time, on the same server. Each answer must equal its request's alone: counted finished
  (equal), wrong (different text or finish reason) or failed (transport error, non-200, stream without [DONE]);
  requests/s and p50/p99 latency of the good ones. A 429 is retried (counted: the server admits
  `max_num_seqs` + `--max-waiting` requests, which the clients' own requests never exceed);
- faults, sent by `--fault-workers` clients beside the load for as long as it runs (a short load: until every
  kind has been sent once), round robin: streams closed after their first chunks, non-streamed requests whose
  client times out, over-long prompts (text and token ids), bodies over the limit (sized and chunked: 413), a
  batch of as many prompts as the server admits sent while a stream of its own holds an admission (429, all or
  none), hostile numbers (temperature 1e-45, top_p 1e-300: 200 and the greedy text), a 2**64 seed, lone
  surrogates, bad roles, NaN, malformed JSON (400), a wrong content type (415). Each must get its answer;
- nothing lost: once the load ends, /metrics must show 0 requests running and waiting and 0 KV blocks and state
  slots in use (prefix caching is on: its cached blocks are free-able and count as free there; its snapshots
  have a region of their own), the server's count of finished choices by reason must match the clients' answers
  (each good request and 200 fault `length`, each closed one `abort`), and the server's RSS is reported after
  start-up, after the references and after each of `--rounds` rounds of the same load.

    python benchmarks/bench_server_load.py --json out.json    (5 rounds of 64 clients x 4 requests; ~1 minute)
    python benchmarks/bench_server_load.py --quick             (2 rounds of 16 clients x 3; ~20 s on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MAX_LEN = 2048
MAX_NUM_SEQS = 64
CHAT_SYSTEM = {"role": "system", "content": "Be brief."}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


# ---- the server --------------------------------------------------------------------------------------------
def write_checkpoint(d: Path) -> str:
    """The tiny preset with random weights (seed 1) and the byte-level tokenizer, as tests/serve writes it."""
    from ringlinear.config import preset
    from ringlinear.hf import save_model
    from ringlinear.model import init_model
    from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

    save_model(init_model(preset("tiny"), seed=1), str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    return str(d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    max_admitted: int
    max_body: int

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)


@contextlib.contextmanager
def server_process(ckpt: str, max_waiting: int, max_num_seqs: int = MAX_NUM_SEQS, log: str | None = None):
    """`ringlinear serve` on 127.0.0.1 (a free port), CPU, prefix caching on (the default), until SIGTERM. It
    imports this `ringlinear` (its checkout first on PYTHONPATH); its output goes to `log` (default: a temp file,
    whose tail a failure to start shows)."""
    import ringlinear
    from ringlinear.serve.config import ServerConfig

    port = free_port()
    cmd = [sys.executable, "-m", "ringlinear.cli", "serve", "--model", ckpt, "--device", "cpu",
           "--max-model-len", str(MAX_LEN), "--cpu-cache-gib", "0.05", "--prefix-state-interval", "64",
           "--max-num-seqs", str(max_num_seqs), "--max-waiting-requests", str(max_waiting),
           "--port", str(port), "--log-level", "warning"]
    root = str(Path(ringlinear.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])}
    with contextlib.ExitStack() as stack:
        if log is None:
            log = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="server-log-")), "server.log")
        out = stack.enter_context(open(log, "w"))
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log) as f:
                        tail = f.read()[-3000:]
                    what = f"exited with {proc.returncode}" if proc.poll() is not None else "did not come up in 120 s"
                    raise RuntimeError(f"the server {what}; its output:\n{tail}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield ServerProcess(url, proc, max_num_seqs + max_waiting, ServerConfig().max_request_body_bytes)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metrics(url: str) -> dict[str, float]:
    """/metrics' ringlinear_* samples without labels: name (prefix dropped) -> value."""
    vals = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("ringlinear_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            vals[name[len("ringlinear_"):]] = float(value)
    return vals


LOAD_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "state_slots_used")


def wait_drained(url: str, seconds: float = 30.0) -> dict[str, float]:
    """The load gauges once all are 0, or as they stand after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        m = metrics(url)
        if all(m.get(k, 0) == 0 for k in LOAD_GAUGES) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


# ---- the good requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    path: str
    body: dict
    stream: bool

    @property
    def kind(self) -> str:
        return ("chat" if "chat" in self.path else "completion") + ("-stream" if self.stream else "")


def good_specs(n: int, seed: int) -> list[Spec]:
    """`n` distinct requests: completions and chat, streamed and not; 3 in 4 greedy, 1 in 4 seeded sampling."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        text = f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        params = {"max_tokens": rng.randint(6, 20), "ignore_eos": True}
        if i % 4 == 3:
            params |= {"temperature": 0.9, "top_k": 40, "seed": rng.randint(0, 2**31)}
        else:
            params |= {"temperature": 0}
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        body = {"messages": [CHAT_SYSTEM, {"role": "user", "content": text}]} if i % 2 else {"prompt": text}
        specs.append(Spec(path, body | params, stream=(i // 2) % 2 == 1))
    return specs


@dataclass
class Answer:
    status: int  # 0: no HTTP answer
    text: str = ""
    finish: str | None = None
    error: str = ""
    retries_429: int = 0
    seconds: float = 0.0


def _sse(line: str):
    if not line.startswith("data: "):
        return "skip"
    payload = line[len("data: "):]
    return None if payload == "[DONE]" else json.loads(payload)


async def send(client: httpx.AsyncClient, spec: Spec, retry_429_s: float = 60.0) -> Answer:
    """One good request: its text and finish reason (a stream's deltas joined; an error event or no [DONE] is a
    failure). A 429 is retried after a pause, for up to `retry_429_s`."""
    t0 = time.perf_counter()
    retries = 0
    while True:
        try:
            ans = await _send_once(client, spec)
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as e:
            ans = Answer(0, error=f"{type(e).__name__}: {e}"[:200])
        if ans.status != 429 or time.perf_counter() - t0 > retry_429_s:
            break
        retries += 1
        await asyncio.sleep(0.05)
    ans.retries_429, ans.seconds = retries, time.perf_counter() - t0
    return ans


async def _send_once(client: httpx.AsyncClient, spec: Spec) -> Answer:
    chat = "chat" in spec.path
    if not spec.stream:
        r = await client.post(spec.path, json=spec.body)
        if r.status_code != 200:
            return Answer(r.status_code, error=r.text[:200])
        c = r.json()["choices"][0]
        return Answer(200, c["message"]["content"] if chat else c["text"], c["finish_reason"])
    text, finish, done, error = "", None, False, ""
    async with client.stream("POST", spec.path, json={**spec.body, "stream": True}) as r:
        if r.status_code != 200:
            return Answer(r.status_code, error=(await r.aread()).decode()[:200])
        async for line in r.aiter_lines():
            e = _sse(line)
            if e == "skip":
                continue
            if e is None:
                done = True
            elif "error" in e:
                error = json.dumps(e["error"])[:200]
            elif e.get("choices"):
                c = e["choices"][0]
                text += (c.get("delta", {}).get("content") or "") if chat else c.get("text", "")
                finish = c.get("finish_reason") or finish
    if error or not done:
        return Answer(200, text, finish, error or "stream ended without [DONE]")
    return Answer(200, text, finish)


# ---- the faults --------------------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    expect: str  # the answer it must get: a status code, "200 greedy", "aborted"


def fault_kinds(max_admitted: int, max_body: int) -> list[Fault]:
    return [Fault("disconnect mid-stream", "aborted"), Fault("client timeout (non-streamed)", "aborted"),
            Fault("prompt over max_model_len", "400"), Fault("prompt ids over max_model_len", "400"),
            Fault(f"body over {max_body >> 20} MiB", "413"), Fault("chunked body over the limit", "413"),
            Fault(f"{max_admitted} prompts in one request", "429"),
            Fault("temperature 1e-45", "200 greedy"), Fault("top_p 1e-300", "200 greedy"),
            Fault("seed 2**64", "400"), Fault("lone surrogate", "400"), Fault("bad role", "400"),
            Fault("temperature NaN", "400"), Fault("malformed JSON", "400"), Fault("text/plain body", "415")]


HOSTILE_PROMPT = "hostile numbers"
HOSTILE_BODY = {"prompt": HOSTILE_PROMPT, "max_tokens": 8, "ignore_eos": True}


async def inject(client: httpx.AsyncClient, fault: Fault, max_admitted: int, max_body: int, greedy_ref: str,
                 res: LoadResult) -> str:
    """Send one fault; returns its answer as a string (status code, "aborted", "200 greedy", or what went
    wrong)."""
    k = fault.kind
    raw = {"content-type": "application/json"}
    if k == "disconnect mid-stream":
        body = {"prompt": "to be continued", "temperature": 0, "ignore_eos": True, "max_tokens": 400, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return str(r.status_code)
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream
        return "aborted"
    if k == "client timeout (non-streamed)":
        body = {"prompt": "wait for it", "temperature": 0, "ignore_eos": True, "max_tokens": 400}
        try:
            r = await client.post("/v1/completions", json=body, timeout=0.5)
            return str(r.status_code)  # finished within the timeout (should not happen: 400 tokens)
        except httpx.TimeoutException:
            return "aborted"
    if k == "prompt over max_model_len":
        r = await client.post("/v1/completions", json={"prompt": "a" * (MAX_LEN + 5)})
    elif k == "prompt ids over max_model_len":
        r = await client.post("/v1/completions", json={"prompt": list(range(100, 100 + MAX_LEN - 4)), "max_tokens": 8})
    elif k.startswith("body over"):
        r = await client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (max_body + 10) + b'"}',
                              headers=raw)
    elif k == "chunked body over the limit":
        async def chunks():
            for _ in range(max_body // 2**16 + 2):
                yield b"x" * 2**16

        r = await client.post("/v1/completions", content=chunks(), headers=raw)
    elif k.endswith("prompts in one request"):
        # a stream of this client holds one admission: max_admitted more cannot fit, whatever else runs (all or none)
        hold = {"prompt": "holding on", "temperature": 0, "ignore_eos": True, "max_tokens": 400, "stream": True}
        async with client.stream("POST", "/v1/completions", json=hold) as held:
            if held.status_code != 200:
                return f"holder {held.status_code}"
            async for line in held.aiter_lines():
                if line.startswith("data: "):
                    break  # admitted and running
            res.holder_streams += 1  # closed below, mid-stream: aborted
            r = await client.post("/v1/completions", json={"prompt": ["hi"] * max_admitted, "max_tokens": 1})
    elif k == "temperature 1e-45":
        r = await client.post("/v1/completions", json={**HOSTILE_BODY, "temperature": 1e-45})
    elif k == "top_p 1e-300":
        r = await client.post("/v1/completions", json={**HOSTILE_BODY, "temperature": 1.0, "top_p": 1e-300})
    elif k == "seed 2**64":
        r = await client.post("/v1/chat/completions", json={"messages": [CHAT_SYSTEM], "seed": 2**64})
    elif k == "lone surrogate":  # Python's json writes \ud800; httpx's json= would refuse to encode it
        r = await client.post("/v1/chat/completions", headers=raw,
                              content=json.dumps({"messages": [{"role": "user", "content": "a\ud800b"}]}))
    elif k == "bad role":
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "hacker", "content": "hi"}]})
    elif k == "temperature NaN":
        r = await client.post("/v1/completions", content='{"prompt": "hi", "temperature": NaN}', headers=raw)
    elif k == "malformed JSON":
        r = await client.post("/v1/completions", content=b'{"prompt": "hi"', headers=raw)
    elif k == "text/plain body":
        r = await client.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    else:
        raise ValueError(k)
    if fault.expect == "200 greedy" and r.status_code == 200:
        return "200 greedy" if r.json()["choices"][0]["text"] == greedy_ref else "200 not greedy"
    return str(r.status_code)


def count(d: dict, key: str, sub: str | None = None) -> None:
    if sub is not None:
        d = d.setdefault(key, {})
        key = sub
    d[key] = d.get(key, 0) + 1


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    clients: int
    requests_per_client: int
    unique: int
    sent: int = 0
    good: int = 0
    wrong: int = 0
    failed: int = 0
    retries_429: int = 0
    load_s: float = 0.0
    latencies: list = field(default_factory=list)
    by_kind: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    faults: dict = field(default_factory=dict)  # kind -> {"expect": ..., "answers": {answer: count}}
    faults_unexpected: int = 0
    leaks: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)
    reference_s: float = 0.0
    not_sent: int = 0
    rounds: int = 0
    fault_seq: int = 0
    holder_streams: int = 0  # streams the 429 fault held open (then closed: aborted)
    faults_after_load: int = 0  # sent after the good clients finished (a short load: every kind sent once)
    finished: dict = field(default_factory=dict)  # the server's choices finished during the load, by reason
    finished_expected: dict = field(default_factory=dict)  # what the clients' answers say they should be

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))
        return {"clients": self.clients, "requests_per_client": self.requests_per_client, "unique": self.unique,
                "rounds": self.rounds, "sent": self.sent, "not_sent": self.not_sent, "good_equal_alone": self.good, "wrong": self.wrong,
                "failed": self.failed, "retries_429": self.retries_429, "load_s": self.load_s,
                "requests_per_s": self.good / self.load_s if self.load_s else float("nan"),
                "latency_p50_s": q(0.5), "latency_p99_s": q(0.99),
                "latency_mean_s": statistics.fmean(lat) if lat else float("nan"), "by_kind": self.by_kind,
                "faults": self.faults, "faults_injected": sum(sum(f["answers"].values()) for f in self.faults.values()),
                "faults_unexpected": self.faults_unexpected, "faults_after_load": self.faults_after_load, "leaks": self.leaks, "rss_mib": self.rss_mib,
                "reference_s": self.reference_s, "finished_on_server": self.finished,
                "finished_expected": self.finished_expected, "problems": self.problems[:20]}

    @property
    def lost(self) -> int:
        return int(sum(self.leaks.get(k, 0) for k in LOAD_GAUGES))

    @property
    def ok(self) -> bool:
        """Nothing wrong, failed, answered otherwise than required, left in the server, or finished otherwise
        than its client saw; the server still healthy."""
        return (self.wrong == self.failed == self.faults_unexpected == self.lost == 0 and self.sent > 0
                and self.finished == self.finished_expected and bool(self.leaks.get("server_healthy_after")))


async def _references(url: str, specs: list[Spec]) -> tuple[list[Answer], str]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        refs = [await send(client, s) for s in specs]
        r = await client.post("/v1/completions", json={**HOSTILE_BODY, "temperature": 0})
        return refs, r.json()["choices"][0]["text"]


async def _load(url: str, res: LoadResult, specs: list[Spec], refs: list[Answer], greedy_ref: str,
                server: ServerProcess, fault_workers: int, deadline: float) -> None:
    faults = fault_kinds(server.max_admitted, server.max_body)
    for f in faults:
        res.faults.setdefault(f.kind, {"expect": f.expect, "answers": {}})
    limits = httpx.Limits(max_connections=res.clients + fault_workers + 8, max_keepalive_connections=res.clients + 8)
    loading = True
    kinds = res.by_kind

    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        async def good_client(c: int) -> None:
            for j in range(res.requests_per_client):
                if time.monotonic() > deadline:
                    res.not_sent += res.requests_per_client - j
                    return
                i = (c * res.requests_per_client + j) % len(specs)
                spec, ref = specs[i], refs[i]
                res.sent += 1
                ans = await send(client, spec)
                res.retries_429 += ans.retries_429
                if ans.status != 200 or ans.error:
                    res.failed += 1
                    count(kinds, spec.kind, "failed")
                    res.problems.append({"spec": i, "kind": spec.kind, "status": ans.status, "error": ans.error})
                elif (ans.text, ans.finish) != (ref.text, ref.finish):
                    res.wrong += 1
                    count(kinds, spec.kind, "wrong")
                    res.problems.append({"spec": i, "kind": spec.kind, "got": ans.text, "alone": ref.text,
                                         "finish": ans.finish})
                else:
                    res.good += 1
                    count(kinds, spec.kind, "good")
                    res.latencies.append(ans.seconds)

        async def fault_client() -> None:
            # while the load runs, and (a short load) until every kind has been sent once
            while loading or any(not res.faults[f.kind]["answers"] for f in faults):
                f = faults[res.fault_seq % len(faults)]  # one round robin over the workers and the rounds
                res.fault_seq += 1
                if not loading:
                    res.faults_after_load += 1
                try:
                    a = await inject(client, f, server.max_admitted, server.max_body, greedy_ref, res)
                except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as e:
                    a = type(e).__name__
                count(res.faults[f.kind]["answers"], a)
                if a != f.expect:
                    res.faults_unexpected += 1
                    res.problems.append({"fault": f.kind, "expect": f.expect, "got": a})
                await asyncio.sleep(0.01)

        t0 = time.perf_counter()
        fault_tasks = [asyncio.create_task(fault_client()) for _ in range(fault_workers)]
        await asyncio.gather(*(good_client(c) for c in range(res.clients)))
        res.load_s += time.perf_counter() - t0
        loading = False
        await asyncio.gather(*fault_tasks)


def finished_by_reason(url: str) -> dict[str, float]:
    """/metrics' choices finished, by finish reason."""
    fin = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("ringlinear_choices_finished_total{"):
            fin[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return fin


def run_load(ckpt: str, clients: int, requests: int, unique: int, fault_workers: int = 4, max_waiting: int = 16,
             budget_s: float = 600.0, seed: int = 0, rounds: int = 1, log: str | None = None,
             verbose: bool = True) -> LoadResult:
    """The whole benchmark on one fresh server: references, `rounds` of load with faults (the RSS after each),
    drain, leaks, and the server's count of finished choices against what the clients saw."""
    say = print if verbose else (lambda *a, **k: None)
    res = LoadResult(clients, requests, unique)
    specs = good_specs(unique, seed)
    with server_process(ckpt, max_waiting, log=log) as server:
        res.rss_mib["started"] = server.rss_mib()
        say(f"server up at {server.url} (pid {server.proc.pid}, RSS {res.rss_mib['started']:.0f} MiB); "
            f"{unique} references, one at a time", flush=True)
        t0 = time.perf_counter()
        refs, greedy_ref = asyncio.run(_references(server.url, specs))
        res.reference_s = time.perf_counter() - t0
        bad = [i for i, a in enumerate(refs) if a.status != 200 or a.error]
        if bad:
            raise RuntimeError(f"references failed: {[(i, refs[i].status, refs[i].error) for i in bad[:5]]}")
        res.rss_mib["after_references"] = server.rss_mib()
        before = finished_by_reason(server.url)
        say(f"references in {res.reference_s:.1f} s", flush=True)
        deadline = time.monotonic() + budget_s
        for r in range(rounds):
            say(f"load round {r + 1}/{rounds}: {clients} clients x "
                f"{requests} requests, {fault_workers} fault clients", flush=True)
            asyncio.run(_load(server.url, res, specs, refs, greedy_ref, server, fault_workers, deadline))
            res.rounds += 1
            wait_drained(server.url)
            res.rss_mib[f"after_round_{r + 1}"] = server.rss_mib()
        m = wait_drained(server.url)
        res.leaks = {k: m.get(k, float("nan")) for k in LOAD_GAUGES}
        res.leaks["kv_cache_blocks_total"] = m.get("kv_cache_blocks_total")
        res.leaks["state_slots_total"] = m.get("state_slots_total")
        after = finished_by_reason(server.url)
        res.finished = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}
        res.finished = {k: v for k, v in res.finished.items() if v}
        # what the clients saw: every good request and every 200 fault finished by length, every closed one aborted
        # (the streams the 429 fault held open too)
        answers = {kind: f["answers"] for kind, f in res.faults.items()}
        greedy_200 = sum(n for a in answers.values() for ans, n in a.items() if ans.startswith("200"))
        aborted = sum(n for a in answers.values() for ans, n in a.items() if ans == "aborted")
        res.finished_expected = {"length": res.good + res.wrong + greedy_200, "abort": aborted + res.holder_streams}
        res.finished_expected = {k: v for k, v in res.finished_expected.items() if v}
        res.leaks["server_healthy_after"] = (server.proc.poll() is None
                                             and httpx.get(server.url + "/health", timeout=5).status_code == 200)
    return res


def report(s: dict) -> None:
    print(f"\nload: {s['rounds']} round(s) of {s['clients']} clients x {s['requests_per_client']} requests "
          f"({s['unique']} distinct, each checked against its output alone), {s['load_s']:.1f} s")
    print("| requests sent | good (equal alone) | wrong | failed | not sent (time bound) | 429s retried | "
          "requests/s | p50 latency | p99 latency |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {s['sent']} | {s['good_equal_alone']} | {s['wrong']} | {s['failed']} | {s['not_sent']} | "
          f"{s['retries_429']} | {s['requests_per_s']:.1f} | {s['latency_p50_s']:.2f} s | "
          f"{s['latency_p99_s']:.2f} s |")
    print("\nby kind: " + ", ".join(f"{k} {v}" for k, v in s["by_kind"].items()))
    print(f"\nfaults injected during the load: {s['faults_injected'] - s['faults_after_load']} (and "
          f"{s['faults_after_load']} after it, to send every kind), answered otherwise than required: "
          f"{s['faults_unexpected']}")
    print("| fault | required | answers (count) |")
    print("|---|---|---|")
    for kind, f in s["faults"].items():
        answers = ", ".join(f"{a} x{n}" for a, n in sorted(f["answers"].items()))
        print(f"| {kind} | {f['expect']} | {answers or '-'} |")
    lk, rss = s["leaks"], s["rss_mib"]
    print("\nafter the load (/metrics):")
    print("| requests running | waiting | KV blocks used | state slots used | server healthy | "
          "choices finished on the server (by the clients' answers) | server RSS: " + " / ".join(rss) + " |")
    print("|---|---|---|---|---|---|---|")
    fin = ", ".join(f"{k} {v:.0f} ({s['finished_expected'].get(k, 0)})" for k, v in s["finished_on_server"].items())
    print(f"| {lk['num_requests_running']:.0f} | {lk['num_requests_waiting']:.0f} | "
          f"{lk['kv_cache_blocks_used']:.0f} of {lk['kv_cache_blocks_total']:.0f} | "
          f"{lk['state_slots_used']:.0f} of {lk['state_slots_total']:.0f} | {lk['server_healthy_after']} | "
          f"{fin} | " + " / ".join(f"{v:.0f}" for v in rss.values()) + " MiB |")
    for p in s["problems"][:10]:
        print("  problem:", json.dumps(p)[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--unique", type=int, default=64, help="distinct requests (each taken alone first)")
    ap.add_argument("--fault-workers", type=int, default=4, help="clients sending faults beside the load")
    ap.add_argument("--max-waiting", type=int, default=16, help="the server's --max-waiting-requests")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock bound of the load (then no new "
                                                                   "requests)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of load on the same server (RSS after each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 16 clients x 3 requests, 24 distinct, 60 s "
                                                        "bound")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the tiny preset, random "
                                                       "weights, in a temp dir)")
    ap.add_argument("--server-log", default=None, help="write the server's output here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.unique, args.rounds, args.budget_s = 16, 3, 24, 2, 60.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-server-load-") as tmp:
        ckpt = args.checkpoint or write_checkpoint(Path(tmp))
        res = run_load(ckpt, args.clients, args.requests, args.unique, args.fault_workers, args.max_waiting,
                       args.budget_s, args.seed, args.rounds, args.server_log)
    s = res.summary()
    s["total_s"] = time.perf_counter() - t0
    report(s)
    print(f"\ntotal {s['total_s']:.0f} s")
    if args.json:
        import torch

        meta = {"device": "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__, "preset": "tiny",
                "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "result": s}, f, indent=2)
        print(f"wrote {args.json}")
    print("OK: nothing wrong, failed or lost" if res.ok else "FAILED: see the problems above")
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":
    main()
