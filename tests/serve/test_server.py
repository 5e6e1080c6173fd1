"""The OpenAI-compatible server over real HTTP (uvicorn in a thread, httpx client) with a tiny random
checkpoint: greedy completions equal the offline engine, streamed deltas add up to the non-streamed text,
concurrent requests equal each alone, bad input is a 4xx naming the field, a client that leaves is aborted."""

import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serving import CHAT, GREEDY, MAX_LEN, sse, wait_idle  # noqa: E402

from ringlinear.engine.sequence import SamplingParams  # noqa: E402


def test_health_and_models(server, ckpt):
    assert server.client.get("/health").json() == {"status": "ok"}
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    [m] = models["data"]
    assert m["id"] == server.engine.model_name and m["max_model_len"] == MAX_LEN and m["object"] == "model"


def test_completion_greedy_equals_offline(server, offline):
    prompt = "The quick brown fox"
    out = offline.generate(prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8, logprobs=0))[0]
    ref = out.outputs[0]
    r = server.client.post("/v1/completions", json={"prompt": prompt, "logprobs": 0,
                                                    "model": server.engine.model_name, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["text"] == ref.text and choice["finish_reason"] == "length" and choice["index"] == 0
    usage = body["usage"]
    assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] < len(out.prompt_token_ids)
    assert usage == {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": 8,
                     "total_tokens": len(out.prompt_token_ids) + 8}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 8
    assert max(abs(a - b[t].logprob) for a, t, b in zip(lp["token_logprobs"], ref.token_ids, ref.logprobs)) < 1e-4
    # the same prompt as token ids and as a one-element list: the same completion
    for p in (out.prompt_token_ids, [prompt], [out.prompt_token_ids]):
        again = server.client.post("/v1/completions", json={"prompt": p, **GREEDY}).json()
        assert again["choices"][0]["text"] == ref.text and again["choices"][0]["logprobs"] is None


def test_chat_completion(server, offline):
    out = offline.chat([CHAT], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))[0]
    ref = out.outputs[0]
    r = server.client.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 8
    assert body["usage"]["prompt_tokens"] == len(out.prompt_token_ids)
    # max_completion_tokens is the newer name of max_tokens; content parts of type text are joined
    parts = [{**CHAT[0]}, {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                       {"type": "text", "text": "colour."}]}]
    r = server.client.post("/v1/chat/completions", json={"messages": parts, "temperature": 0, "ignore_eos": True,
                                                         "max_completion_tokens": 8})
    assert r.json()["choices"][0]["message"]["content"] == ref.text


def test_usage_reports_cached_prompt_tokens(server):
    """A prompt sent again resumes from the prefix cache: usage.prompt_tokens_details.cached_tokens counts the
    prompt tokens it did not compute (all but the last, whose logits it needs), and the text is the same."""
    body = {"prompt": "A prompt long enough to fill a few cache blocks, sent twice.", **GREEDY}
    first = server.client.post("/v1/completions", json=body).json()
    again = server.client.post("/v1/completions", json=body).json()
    n = first["usage"]["prompt_tokens"]
    assert n > 16 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": n - 1}
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_streaming_equals_non_streamed(server):
    req = {"prompt": "Once upon a time", "logprobs": 0, **GREEDY, "max_tokens": 12}
    full = server.client.post("/v1/completions", json=req).json()["choices"][0]
    with server.client.stream("POST", "/v1/completions",
                              json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] is None and all(e is not None for e in events[:-1])
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((c["choices"][0]["logprobs"][key] for c in chunks), []) == full["logprobs"][key]

    chat = {"messages": CHAT, **GREEDY}
    full = server.client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    with server.client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = sse(r.iter_lines())
    assert events[-1] is None
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert wait_idle(server.engine)


def test_concurrent_requests_equal_each_alone(server):
    reqs = [{"prompt": "alpha beta", **GREEDY},
            {"prompt": "Lorem ipsum dolor sit amet, consectetur", **GREEDY, "max_tokens": 10},
            {"prompt": "x", "temperature": 0.9, "top_k": 20, "seed": 7, "ignore_eos": True, "max_tokens": 9},
            {"prompt": "0123456789", "temperature": 1.0, "top_p": 0.8, "seed": 3, "ignore_eos": True,
             "max_tokens": 6, "stop": ["@@"]}]
    alone = [server.client.post("/v1/completions", json=r).json()["choices"][0]["text"] for r in reqs]
    results = [None] * len(reqs)

    def send(i):
        with httpx.Client(base_url=server.url, timeout=60.0) as c:
            results[i] = c.post("/v1/completions", json=reqs[i]).json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone


BAD = [  # (path, body: dict or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": "all"}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": 0}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 65}, 400, "n"),  # more than max_num_seqs
    ("/v1/completions", {"prompt": "hi", "n": 2.0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": "x"}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 101}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": []}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {" 5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"320": 1}}, 400, "logit_bias"),  # outside the vocabulary
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": "1"}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(300)} | {"x": 1}}, 400,
     "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": True}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": 1}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1, 999]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], 5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 1025}, 400, "prompt"),
    ("/v1/completions", {"prompt": [999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "model": 3}, 400, "model"),
    ("/v1/chat/completions", b"nope", 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "yes"}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),  # without logprobs
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": 5, "max_tokens": 4}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": MAX_LEN}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "n": -1}, 400, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "other"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field(server, path, body, status, param):
    if isinstance(body, bytes):
        r = server.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] is None
    assert isinstance(err["message"], str) and err["message"]


def test_unknown_route_and_prompt_too_long(server):
    r = server.client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    long = "a" * (MAX_LEN + 5)  # byte-level: one token per character
    cases = [("/v1/completions", {"prompt": long}, "prompt"),
             ("/v1/completions", {"prompt": list(range(100, 100 + MAX_LEN - 4)), "max_tokens": 8}, "prompt"),
             ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_LEN}, "prompt"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 4}, "messages")]
    for path, body, param in cases:
        r = server.client.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    assert wait_idle(server.engine)


def test_client_disconnect_aborts_the_request(server):
    eng = server.engine.engine
    aborted = []
    abort = eng.abort_request
    eng.abort_request = lambda rid: (aborted.append(rid), abort(rid))[1]
    try:
        req = {"prompt": "to be continued", "temperature": 0, "ignore_eos": True, "max_tokens": 1500}
        with httpx.Client(base_url=server.url, timeout=60.0) as c:
            with c.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
        rid = json.loads(first[len("data: "):])["id"]
        assert wait_idle(server.engine), "the abandoned stream was not aborted"
        assert rid in aborted
        # a non-streamed request whose client times out is aborted too
        n = len(aborted)
        with httpx.Client(base_url=server.url, timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=req)
        assert wait_idle(server.engine), "the abandoned request was not aborted"
        assert len(aborted) > n
    finally:
        eng.abort_request = abort
    assert server.client.get("/health").status_code == 200
    r = server.client.post("/v1/completions", json={"prompt": "still here", **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_failed_engine_step_is_a_500_and_the_server_recovers(server):
    eng = server.engine.engine

    def broken_step():
        del eng.step  # back to the real step for the next call
        raise RuntimeError("injected step failure")

    eng.step = broken_step
    r = server.client.post("/v1/completions", json={"prompt": "boom", **GREEDY})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert wait_idle(server.engine)
    r = server.client.post("/v1/completions", json={"prompt": "boom", **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
