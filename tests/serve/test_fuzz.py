"""Fuzzing the server on loopback (seeded, bounded): every field of /v1/completions, /v1/chat/completions, /tokenize
(with a prompt, with messages) and /detokenize, and every field of a chat message, gets wrong types, NaN/Infinity (as raw JSON tokens), huge and negative numbers,
empty and nested junk, and Unicode junk (lone surrogates, controls, private-use markers, special-token text);
malformed bodies too. Each answer is checked against an oracle of what the API allows: an accepted value is a
200, a refused one a 4xx whose error.param names the field (null for a malformed body); never a 5xx. Good
streaming requests run alongside the whole time, and each returns what it returns alone."""

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serving import CHAT, MAX_LEN, stream_text  # noqa: E402

from ringlinear.tokenizer import byte_level_tokenizer  # noqa: E402

SEED = 27
RANDOM_PER_FIELD = 3
BUDGET_S = 40.0  # the inputs are shuffled: a slow machine tries fewer, still of every field
VOCAB = 320  # the tiny preset's vocabulary
TOKENIZER = byte_level_tokenizer()
MAX_PROMPTS = 320  # prompts per completions request: the fuzz server admits max_num_seqs 64 + 256 waiting
CHAT_PROMPT_LEN = 40  # at most, for CHAT under the tiny template


# ---- what the API allows -------------------------------------------------------------------------------------
def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite(v) -> bool:
    return (integer(v) or isinstance(v, float)) and (integer(v) or math.isfinite(v))


def text(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from strings(x)


def max_tokens_ok(v):
    """True (accepted), False (refused naming the field), None (refused as too long for the prompt, or
    accepted)."""
    if v is None or (integer(v) and 1 <= v <= 16):
        return True
    if not integer(v) or v < 1 or v > MAX_LEN:
        return False
    return None


def one_prompt_ok(v):
    if isinstance(v, str):
        return bool(v) and text(v) and len(TOKENIZER.encode(v).ids) + 1 <= MAX_LEN
    return isinstance(v, list) and bool(v) and len(v) < MAX_LEN and all(integer(t) and 0 <= t < VOCAB for t in v)


def prompt_ok(v):
    """A prompt, or a list of prompts (strings or token-id lists)."""
    if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        return len(v) <= MAX_PROMPTS and all(one_prompt_ok(p) for p in v)
    return one_prompt_ok(v)


def finite_in(lo, hi, lo_open=False):
    return lambda v: v is None or (finite(v) and (v > lo if lo_open else v >= lo) and v <= hi)


def logit_bias_ok(v):
    return v is None or (isinstance(v, dict) and len(v) <= 1024 and all(
        k.isascii() and k.isdigit() and len(k) <= 12 and int(k) < VOCAB and finite(b) and -100 <= b <= 100
        for k, b in v.items()))


def template_kwargs_ok(v):
    return v is None or (isinstance(v, dict) and "messages" not in v and "add_generation_prompt" not in v
                         and all(text(s) for s in strings(v)))


def messages_ok(v):
    return None if isinstance(v, list) and v and all(isinstance(m, dict) and "role" in m for m in v) else False


def stop_ok(v):
    if isinstance(v, str):
        v = [v]
    return v is None or (isinstance(v, list) and len(v) <= 16 and all(text(s) and 0 < len(s) <= 1024 for s in v))


def content_ok(v):
    if isinstance(v, list):
        return all(isinstance(p, dict) and p.get("type") == "text" and text(p.get("text")) for p in v)
    return text(v) and (len(v) < 500 or None)  # long: may not fit the context (then refused as messages)


COMMON = {
    "model": lambda v: v is None or v == "MODEL",
    "temperature": lambda v: v is None or (finite(v) and 0 <= v <= 100),
    "top_p": lambda v: v is None or (finite(v) and 0 < v <= 1),
    "top_k": lambda v: v is None or (integer(v) and v >= -1),
    "seed": lambda v: v is None or (integer(v) and -(2**63) <= v < 2**63),
    "max_tokens": max_tokens_ok,
    "stop": stop_ok,
    "stop_token_ids": lambda v: v is None or (isinstance(v, list) and len(v) <= 1024
                                              and all(integer(t) and 0 <= t < VOCAB for t in v)),
    "ignore_eos": lambda v: v is None or isinstance(v, bool),
    "n": lambda v: v is None or (integer(v) and 1 <= v <= 64),  # up to max_num_seqs
    "stream": lambda v: v is None or isinstance(v, bool),
    "stream_options": lambda v: v is None,  # only with stream=true
    "user": lambda v: v is None or text(v),
    "best_of": lambda v: v is None or (integer(v) and v == 1),  # = n
    "presence_penalty": finite_in(-2, 2),
    "frequency_penalty": finite_in(-2, 2),
    "repetition_penalty": finite_in(0, 100, lo_open=True),
    "logit_bias": logit_bias_ok,
    "suffix": lambda v: v is None or v == "",
    "min_tokens": lambda v: v is None or (integer(v) and 0 <= v <= 1),  # up to max_tokens (1 in the bodies)
    "prompt_logprobs": lambda v: v is None,
    "use_beam_search": lambda v: v is None or v is False,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "x_unknown_field": lambda v: True,  # unknown fields are ignored, whatever they hold
}
def flag(v):
    return v is None or isinstance(v, bool)


ENDPOINTS = {  # name: (path, base body, {field: oracle}, {field: params a refusal may name besides the field})
    "completions": ("/v1/completions", {"prompt": "fuzz", "max_tokens": 1, "temperature": 0}, {
        **COMMON, "prompt": prompt_ok, "echo": flag, "logprobs": lambda v: v is None or (integer(v) and 0 <= v <= 20),
    }, {"max_tokens": {"prompt"}}),
    "chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "temperature": 0}, {
        **COMMON, "max_completion_tokens": lambda v: v is None or (integer(v) and 1 <= v <= MAX_LEN),
        "messages": messages_ok, "logprobs": flag,
        "top_logprobs": lambda v: v is None or (integer(v) and v == 0),  # more needs logprobs=true
        "echo": lambda v: v is None or v is False,
        "tools": lambda v: v is None or v == [], "functions": lambda v: v is None or v == [],
        "tool_choice": lambda v: v is None or v in ("none", "auto"),
        "function_call": lambda v: v is None or v in ("none", "auto"),
        "parallel_tool_calls": flag, "chat_template_kwargs": template_kwargs_ok,
    }, {"max_tokens": {"messages"}}),
    "tokenize": ("/tokenize", {"prompt": "fuzz"}, {
        "model": COMMON["model"], "add_special_tokens": flag, "return_token_strs": flag,
        "prompt": lambda v: text(v) and len(TOKENIZER.encode(v).ids) <= MAX_LEN,  # null: neither prompt nor messages
        "messages": lambda v: v is None,  # not with a prompt
        "x_unknown_field": lambda v: True,
    }, {}),
    "tokenize chat": ("/tokenize", {"messages": CHAT}, {
        "model": COMMON["model"], "messages": messages_ok, "add_special_tokens": flag, "return_token_strs": flag,
        "add_generation_prompt": flag, "chat_template_kwargs": template_kwargs_ok,
        "continue_final_message": lambda v: v is None or v is False, "chat_template": lambda v: v is None,
        "tools": lambda v: v is None or v == [], "x_unknown_field": lambda v: True,
    }, {"messages": {"prompt"}}),
    "detokenize": ("/detokenize", {"tokens": [104, 105]}, {
        "model": COMMON["model"], "x_unknown_field": lambda v: True,
        "tokens": lambda v: isinstance(v, list) and all(integer(t) and 0 <= t < VOCAB for t in v),
    }, {}),
}
MESSAGE_FIELDS = {  # keys of CHAT[1] (a user message); any refusal names "messages"
    "role": lambda v: v in ("system", "developer", "user", "assistant"),
    "content": content_ok,
    "name": lambda v: v is None or text(v),
    "tool_call_id": lambda v: v is None or text(v),
    "tool_calls": lambda v: v is None,  # only in assistant messages
}


# ---- junk ------------------------------------------------------------------------------------------------
def nested(depth: int):
    v = "deep"
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


FIXED = [
    None, True, False, "", [], {},  # null (the default), booleans, empty
    0, 1, -1, 2, 21, 0.5, -0.0, 1e-45, 5e-324,  # small numbers and range edges
    1e308, -1e308, 2**63, 2**64, -(2**63) - 1, 10**100,  # huge
    float("nan"), float("inf"), float("-inf"),  # written as the raw JSON tokens NaN, Infinity, -Infinity
    "a", "1", "NaN", "MODEL", "auto",  # strings, and values some field accepts
    "\ud800", "a\udfffb", "\x00\x01\u202e", "\U000f0000<|im_end|>\U000f0001", "<|im_start|>system", "😀" * 5,
    "x" * 5000,  # Unicode junk, special-token text, too long
    [1], [0, 319], [320], ["a"], [None], [[1]], [{}], ["s"] * 17,  # lists
    {"a": 1}, {"type": "text"}, {"messages": []}, {"k": "\ud800"}, [{"type": "text", "text": "hi"}],
    [{"type": "image_url", "image_url": {"url": "x"}}], nested(40), {"a": {"b": [float("nan"), {"c": [None]}]}},
]


def random_text(rng: random.Random) -> str:
    pools = ["abc xyz", "\ud800\udbff\udc00\udfff", "\x00\x1f\x7f", "\u200b\u202e\ufeff", "<|im_end|><|pad|>",
             "\U000f0000\U000f0001", "ünï😀中文", "\\\"'{}[]"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 24)))


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-10, 30)
    if kind == 2:
        return rng.choice([-1, 1]) * rng.randint(2**31, 2**80)
    if kind == 3:
        return rng.choice([rng.uniform(-3, 3), rng.uniform(-1e300, 1e300), float("nan"), float("inf"), 1e-320])
    if kind in (4, 5, 6):
        return random_text(rng)
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def malformed_bodies(rng: random.Random) -> list[bytes]:
    good = json.dumps(ENDPOINTS["completions"][1]).encode()
    fixed = [b"", b"{", b"}", b"null", b"[]", b'"str"', b"1", b"{'prompt': 'x'}", b'{"prompt": "x",}',
             b'{"prompt": "x"}{}', b"\xef\xbb\xbf" + good, good.decode().encode("utf-16"), b"\xff\xfe\x00",
             b'{"prompt": "\xed\xa0\x80"}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
             b'{"prompt": "x", "seed": 1' + b"1" * 5000 + b"}", b'{"prompt": "x", "max_tokens": 1e99999}',
             b"\x00" * 10, b'{"prompt": "x"', b'{"prompt": "\\ud800\\"}']
    mutated = []
    for _ in range(60):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            op = rng.randrange(3)
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                del b[i]
            else:
                b.insert(i, rng.choice(b'{}[]",:\\\x00\xff'))
        mutated.append(bytes(b))
    return fixed + mutated


def cases(rng: random.Random, model: str) -> list[tuple]:
    """(path, field, body bytes, verdict, params allowed in a refusal (None: any)), distinct bodies."""
    out = []
    for name, (path, base, fields, also) in ENDPOINTS.items():
        for field, ok in fields.items():
            values = FIXED + [random_value(rng) for _ in range(RANDOM_PER_FIELD)]
            for v in values:
                v = model if v == "MODEL" else v
                if field in ("max_tokens", "max_completion_tokens") and integer(v) and 16 < v <= MAX_LEN:
                    continue  # valid but slow: long generations are not what this suite is about
                verdict = ok("MODEL" if v == model else v)
                body = {**base, field: v}
                out.append((path, f"{name}.{field}", json.dumps(body).encode(), verdict, {field} | also.get(field,
                                                                                                          set())))
    for field, ok in MESSAGE_FIELDS.items():
        for v in FIXED + [random_value(rng) for _ in range(RANDOM_PER_FIELD)]:
            message = {**CHAT[1], field: v}
            for name in ("chat", "tokenize chat"):
                path, base = ENDPOINTS[name][:2]
                body = {**base, "messages": [CHAT[0], message]}
                out.append((path, f"{name}.messages[1].{field}", json.dumps(body).encode(), ok(v), {"messages"}))
    for raw in malformed_bodies(rng):
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        # a mutation that still parses as an object is a request like any other: it may be refused for any field
        out.append(("/v1/completions", "body", raw, None if isinstance(parsed, dict) else False,
                    None if isinstance(parsed, dict) else {None}))
    unique = {}
    for case in out:  # many values give the same body (null is the default of every field)
        unique.setdefault((case[0], case[2]), case)
    return list(unique.values())


GOOD = [{"prompt": f"steady {i}", "temperature": 0, "ignore_eos": True, "max_tokens": 12} for i in range(2)]


def test_fuzz_every_field(server):
    rng = random.Random(SEED)
    model = server.engine.model_name
    todo = cases(rng, model)
    rng.shuffle(todo)
    alone = [stream_text(server.url, "/v1/completions", g)[0] for g in GOOD]
    stop, steady = threading.Event(), {i: [] for i in range(len(GOOD))}

    def keep_streaming(i):
        while not stop.is_set():
            steady[i].append(stream_text(server.url, "/v1/completions", GOOD[i])[0])
            stop.wait(0.1)

    failures, clients, tried = [], threading.local(), []
    t0 = time.monotonic()

    def send(case):
        if time.monotonic() - t0 > BUDGET_S:
            return
        tried.append(case)
        path, field, raw, verdict, allowed = case
        if not hasattr(clients, "c"):
            clients.c = httpx.Client(base_url=server.url, timeout=60.0)
        r = clients.c.post(path, content=raw, headers={"content-type": "application/json"})
        what = f"{path} {field}={raw[:120]!r} -> {r.status_code} {r.text[:200]}"
        if r.status_code >= 500 or (verdict is True and r.status_code != 200) or (
                verdict is False and r.status_code == 200):
            failures.append(what)
        elif r.status_code != 200:
            err = r.json().get("error", {})
            if not (400 <= r.status_code < 500 and (allowed is None or err.get("param") in allowed)
                    and err.get("message")):
                failures.append(what)

    background = [threading.Thread(target=keep_streaming, args=(i,)) for i in range(len(GOOD))]
    for t in background:
        t.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, todo))
    finally:
        stop.set()
        for t in background:
            t.join(60)
    elapsed = time.monotonic() - t0
    fields = {(c[0], c[1]) for c in tried}
    print(f"\nfuzz (seed {SEED}): {len(tried)} of {len(todo)} inputs tried in {elapsed:.1f} s, over {len(fields)} "
          f"fields ({sum(c[3] is True for c in tried)} to accept, {sum(c[3] is False for c in tried)} to refuse, "
          f"{sum(c[3] is None for c in tried)} either way); {sum(map(len, steady.values()))} good streams alongside")
    assert not failures, f"{len(failures)} of {len(tried)} inputs misanswered:\n" + "\n".join(failures[:20])
    assert len(fields) == len({(c[0], c[1]) for c in todo})  # every field was tried
    for i, texts in steady.items():
        assert texts and all(t == alone[i] for t in texts), i
    assert server.client.get("/health").status_code == 200
