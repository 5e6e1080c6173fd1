"""The OpenAI API's features over real HTTP, each against the offline engine (`LLM.generate` with the same
`SamplingParams`): n choices, several prompts (choices indexed prompt-major), logprobs with alternatives in the
completions and chat shapes, echo (with prompt logprobs), penalties, logit_bias, min_tokens, stop_token_ids;
streaming of all of it (per choice index, usage summed); /tokenize, /detokenize, /metrics, served-model-name."""

import json
import math
import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from _serving import CHAT, GREEDY, MAX_LEN, running_server, sse, wait_idle  # noqa: E402

from ringlinear.engine.sequence import SamplingParams  # noqa: E402
from ringlinear.serve.config import ServerConfig  # noqa: E402

SAMPLED = {"temperature": 1.0, "top_p": 0.9, "seed": 11, "ignore_eos": True, "max_tokens": 6}


def post(server, path: str, body: dict) -> dict:
    r = server.client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path: str, body: dict) -> list[dict]:
    """The events of a streamed request (without the final [DONE], which is checked)."""
    with server.client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse(r.iter_lines())
    assert events[-1] is None and all(e is not None for e in events[:-1])
    return events[:-1]


def offline_outputs(offline, prompt, **params):
    return offline.generate(prompt, SamplingParams(**params))[0]


def by_index(events: list[dict]) -> dict[int, list[dict]]:
    """Stream choices grouped by index, in order."""
    out: dict[int, list[dict]] = {}
    for e in events:
        for c in e["choices"]:
            out.setdefault(c["index"], []).append(c)
    return out


# ---- n, several prompts -------------------------------------------------------------------------------------
def test_n_choices_equal_offline(server, offline):
    """Seeded sampling with n = 3: choice i draws with seed + i, in the server as offline."""
    ref = offline_outputs(offline, "Colours:", n=3, **SAMPLED)
    body = post(server, "/v1/completions", {"prompt": "Colours:", "n": 3, **SAMPLED})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [o.text for o in ref.outputs]
    assert len({c["text"] for c in body["choices"]}) > 1  # different seeds: not n copies of one
    assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)  # the prompt counts once
    assert body["usage"]["completion_tokens"] == 18
    chat_ref = offline.chat([CHAT], SamplingParams(n=2, **SAMPLED))[0]
    chat = post(server, "/v1/chat/completions", {"messages": CHAT, "n": 2, **SAMPLED})
    assert [c["message"]["content"] for c in chat["choices"]] == [o.text for o in chat_ref.outputs]
    assert [c["index"] for c in chat["choices"]] == [0, 1] and chat["usage"]["completion_tokens"] == 12


def test_several_prompts_are_indexed_prompt_major(server, offline):
    prompts = ["alpha", [104, 105, 33], "gamma delta"]
    refs = [offline_outputs(offline, p, n=2, **SAMPLED) for p in prompts]
    body = post(server, "/v1/completions", {"prompt": prompts, "n": 2, **SAMPLED})
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == [o.text for r in refs for o in r.outputs]
    n_prompt = sum(len(r.prompt_token_ids) for r in refs)
    assert {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"} == {
        "prompt_tokens": n_prompt, "completion_tokens": 36, "total_tokens": n_prompt + 36}
    # streamed: every choice's deltas add up to its text, each finishes once, the usage chunk sums them all
    events = stream(server, "/v1/completions", {"prompt": prompts, "n": 2, **SAMPLED,
                                                "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == body["usage"]
    got = by_index(events[:-1])
    assert sorted(got) == list(range(6))
    for c in body["choices"]:
        chunks = got[c["index"]]
        assert "".join(x["text"] for x in chunks) == c["text"]
        assert [x["finish_reason"] for x in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert wait_idle(server.engine)


# ---- logprobs -----------------------------------------------------------------------------------------------
def test_completion_logprobs_with_alternatives(server, offline):
    ref = offline_outputs(offline, "The quick brown fox", temperature=0, ignore_eos=True, max_tokens=8,
                          logprobs=3).outputs[0]
    body = post(server, "/v1/completions", {"prompt": "The quick brown fox", "logprobs": 3, **GREEDY})
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == ref.text
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    offset = 0
    for j, (t, d) in enumerate(zip(ref.token_ids, ref.logprobs)):
        assert lp["text_offset"][j] == offset
        offset += len(lp["tokens"][j])
        assert lp["tokens"][j] == d[t].decoded_token
        assert math.isclose(lp["token_logprobs"][j], d[t].logprob, abs_tol=1e-4)
        top = lp["top_logprobs"][j]
        # the chosen token and the 3 most likely (greedy: the chosen is the most likely): 3 entries, by text
        assert 1 <= len(top) <= 4 and top[lp["tokens"][j]] == lp["token_logprobs"][j]
        assert lp["token_logprobs"][j] >= max(top.values()) - 1e-6  # greedy picks the most likely
        expected = {}  # keyed by text: tokens of equal text (bytes of one character: U+FFFD) keep the first
        for x in d.values():
            expected.setdefault(x.decoded_token, x.logprob)
        assert top == pytest.approx(expected, abs=1e-4)


def test_chat_logprobs_and_top_logprobs(server, offline):
    ref = offline.chat([CHAT], SamplingParams(temperature=0, ignore_eos=True, max_tokens=8, logprobs=4))[0].outputs[0]
    body = post(server, "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 4, **GREEDY})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    for entry, t, d in zip(content, ref.token_ids, ref.logprobs):
        assert math.isclose(entry["logprob"], d[t].logprob, abs_tol=1e-4)
        # the tiny vocabulary is byte-level, ids 0-255 in byte order: a token's bytes are its id
        assert entry["bytes"] == ([t] if t < 256 else list(entry["token"].encode()))
        alts = entry["top_logprobs"]
        assert len(alts) == 4 and [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        assert alts[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy: the chosen is the top one
        expected = sorted((lp for lp in d.values() if lp.rank <= 4), key=lambda lp: lp.rank)
        assert [a["logprob"] for a in alts] == pytest.approx([lp.logprob for lp in expected], abs=1e-4)
    # logprobs without top_logprobs: the chosen tokens only
    body = post(server, "/v1/chat/completions", {"messages": CHAT, "logprobs": True, **GREEDY})
    assert all(e["top_logprobs"] == [] for e in body["choices"][0]["logprobs"]["content"])


def test_echo(server, offline):
    prompt = "Echo me"
    ref = offline_outputs(offline, prompt, temperature=0, ignore_eos=True, max_tokens=8, logprobs=2,
                          prompt_logprobs=2)
    body = post(server, "/v1/completions", {"prompt": prompt, "echo": True, **GREEDY})
    assert body["choices"][0]["text"] == prompt + ref.outputs[0].text and body["choices"][0]["logprobs"] is None
    body = post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, **GREEDY})
    lp = body["choices"][0]["logprobs"]
    n_prompt = len(ref.prompt_token_ids)
    assert len(lp["tokens"]) == n_prompt + 8 and "".join(lp["tokens"][:n_prompt]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    for j in range(1, n_prompt):
        d = ref.prompt_logprobs[j]
        assert lp["token_logprobs"][j] == pytest.approx(d[ref.prompt_token_ids[j]].logprob, abs=1e-4)
        assert len(lp["top_logprobs"][j]) in (2, 3)
    assert lp["text_offset"][:3] == [0, 1, 2]  # one byte per token
    # token-id prompts echo their text; several prompts and n echo on every choice; streaming sends it first
    ids = ref.prompt_token_ids
    body = post(server, "/v1/completions", {"prompt": [prompt, ids], "n": 2, "echo": True, **GREEDY})
    assert [c["text"] for c in body["choices"]] == [prompt + ref.outputs[0].text] * 4
    events = stream(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, **GREEDY})
    assert events[0]["choices"][0]["text"].startswith(prompt)
    assert "".join(e["choices"][0]["text"] for e in events) == prompt + ref.outputs[0].text
    assert sum((e["choices"][0]["logprobs"]["token_logprobs"] for e in events), []) == lp["token_logprobs"]
    assert sum((e["choices"][0]["logprobs"]["text_offset"] for e in events), []) == lp["text_offset"]


# ---- penalties, bias, min_tokens, stop tokens -------------------------------------------------------------
PARAMS = [
    {"presence_penalty": 1.5}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8},
    {"presence_penalty": -1.0, "frequency_penalty": 0.5, "repetition_penalty": 0.7},
    {"logit_bias": {"65": 100}},  # "A" everywhere
    {"logit_bias": {"65": 8.5, "66": -100}},
]


@pytest.mark.parametrize("extra", PARAMS, ids=[json.dumps(p) for p in PARAMS])
def test_sampling_fields_equal_offline(server, offline, extra):
    params = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in extra.items()}
    # 24 tokens: the tiny model's greedy text repeats a token by then, which the penalties change
    ref = offline_outputs(offline, "aaa bbb aaa", temperature=0, ignore_eos=True, max_tokens=24, **params).outputs[0]
    plain = offline_outputs(offline, "aaa bbb aaa", temperature=0, ignore_eos=True, max_tokens=24).outputs[0]
    body = post(server, "/v1/completions", {"prompt": "aaa bbb aaa", **GREEDY, "max_tokens": 24, **extra})
    assert body["choices"][0]["text"] == ref.text
    assert ref.token_ids != plain.token_ids  # the field changes what is generated
    if extra == {"logit_bias": {"65": 100}}:
        assert ref.text == "A" * 24
    chat_ref = offline.chat([CHAT], SamplingParams(temperature=0, ignore_eos=True, max_tokens=10, **params))[0]
    chat = post(server, "/v1/chat/completions", {"messages": CHAT, **GREEDY, "max_tokens": 10, **extra})
    assert chat["choices"][0]["message"]["content"] == chat_ref.outputs[0].text


def test_stop_token_ids_and_min_tokens(server, offline):
    plain = offline_outputs(offline, "stop here", temperature=0, max_tokens=10, ignore_eos=True).outputs[0]
    stop = plain.token_ids[2]  # the third greedy token ends the completion (before min_tokens allows it)
    first = plain.token_ids.index(stop)
    body = post(server, "/v1/completions", {"prompt": "stop here", "temperature": 0, "max_tokens": 10,
                                            "ignore_eos": True, "stop_token_ids": [stop]})
    c = body["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop
    assert body["usage"]["completion_tokens"] == first + 1  # the stop token is generated, not shown
    params = dict(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop], min_tokens=first + 2)
    ref = offline_outputs(offline, "stop here", **params).outputs[0]
    body = post(server, "/v1/completions", {"prompt": "stop here", **params})
    assert body["choices"][0]["text"] == ref.text and body["usage"]["completion_tokens"] == len(ref.token_ids)
    assert len(ref.token_ids) >= first + 2 and stop not in ref.token_ids[: first + 2]  # masked until min_tokens


# ---- streaming --------------------------------------------------------------------------------------------
def test_chat_streaming_n_with_logprobs(server):
    req = {"messages": CHAT, "n": 2, "logprobs": True, "top_logprobs": 2, **SAMPLED}
    full = post(server, "/v1/chat/completions", req)
    events = stream(server, "/v1/chat/completions", {**req, "stream_options": {"include_usage": True,
                                                                               "continuous_usage_stats": True}})
    got = by_index([e for e in events if e["choices"]])
    assert sorted(got) == [0, 1]
    for c in full["choices"]:
        chunks = got[c["index"]]
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}  # each choice's role comes first
        assert "".join(x["delta"].get("content", "") for x in chunks) == c["message"]["content"]
        streamed = sum((x["logprobs"]["content"] for x in chunks if x["logprobs"]), [])
        assert streamed == c["logprobs"]["content"]
        assert [x["finish_reason"] for x in chunks].count("length") == 1 and chunks[-1]["finish_reason"] == "length"
    usages = [e["usage"] for e in events]  # continuous usage: every chunk, growing to the final one
    assert all(u is not None for u in usages) and usages[-1] == full["usage"]
    assert [u["completion_tokens"] for u in usages] == sorted(u["completion_tokens"] for u in usages)


def test_multi_prompt_stream_abandoned_is_aborted(server):
    req = {"prompt": ["one", "two", "three"], "n": 2, "temperature": 0, "ignore_eos": True, "max_tokens": 1500}
    with httpx.Client(base_url=server.url, timeout=60.0) as c, c.stream("POST", "/v1/completions",
                                                                       json={**req, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    assert wait_idle(server.engine), "the abandoned requests were not aborted"


# ---- /tokenize, /detokenize -------------------------------------------------------------------------------
def test_tokenize_and_detokenize(server):
    eng = server.engine.engine
    r = post(server, "/tokenize", {"prompt": "hi <|im_end|>"})
    ids = eng.encode("hi <|im_end|>")
    assert r == {"count": len(ids), "max_model_len": eng.max_model_len, "tokens": ids, "token_strs": None}
    r = post(server, "/tokenize", {"prompt": "hé", "return_token_strs": True, "add_special_tokens": False})
    assert r["tokens"] == list("hé".encode()) and r["token_strs"] == [eng.tokenizer.id_to_token(t) for t in r["tokens"]]
    assert post(server, "/detokenize", {"tokens": ids}) == {"prompt": "hi <|im_end|>"}
    assert post(server, "/detokenize", {"tokens": []}) == {"prompt": ""}
    # messages: the same ids the chat endpoint feeds the engine (its usage counts them)
    chat = post(server, "/v1/chat/completions", {"messages": CHAT, **GREEDY})
    r = post(server, "/tokenize", {"messages": CHAT})
    assert r["count"] == chat["usage"]["prompt_tokens"]
    assert r["tokens"] == eng.apply_chat_template(CHAT, tokenize=True)
    no_gen = post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False})
    assert no_gen["tokens"] == eng.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=False)
    assert no_gen["count"] < r["count"]
    for body, param in (({}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": "\ud800"}, "prompt"),
                        ({"prompt": "a", "messages": CHAT}, "messages"), ({"messages": [{"role": "x"}]}, "messages"),
                        ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
                        ({"messages": CHAT, "chat_template": "{{ 1 }}"}, "chat_template"),
                        ({"messages": CHAT, "chat_template_kwargs": []}, "chat_template_kwargs"),
                        ({"prompt": "a", "model": "nope"}, "model"), ({"prompt": "a" * 5000}, "prompt")):
        resp = server.client.post("/tokenize", content=json.dumps(body), headers={"content-type": "application/json"})
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, (body, resp.text)
    for body in ({}, {"tokens": [320]}, {"tokens": [-1]}, {"tokens": "1"}, {"tokens": [1.0]}):
        resp = server.client.post("/detokenize", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tokens", (body, resp.text)


def test_chat_template_kwargs_reach_the_template(ckpt, tmp_path):
    """A template that reads `enable_thinking` (as the official one): the kwarg changes the rendered prompt in
    /tokenize and in /v1/chat/completions alike."""
    d = tmp_path / "thinking"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] += "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with running_server(str(d)) as s:
        plain = post(s, "/tokenize", {"messages": CHAT})
        off = post(s, "/tokenize", {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
        assert off["tokens"] == plain["tokens"] + list(b"<think></think>")
        chat = post(s, "/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False},
                                                **GREEDY})
        assert chat["usage"]["prompt_tokens"] == off["count"]


# ---- /metrics, served model name, API key -----------------------------------------------------------------
def slow_steps(monkeypatch, engine, seconds: float = 0.02) -> None:
    """Each engine step takes at least `seconds`, so that a long request is still running when looked at."""
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), step())[1])


def first_event(r):
    """Read a stream up to its first event; returns its line iterator, which holds the stream open (dropping it
    closes the connection)."""
    lines = r.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return lines
    raise AssertionError("the stream ended without an event")


def test_metrics(ckpt, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    with running_server(ckpt) as s:
        def read() -> dict:
            r = s.client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return {smp.name: smp.value for fam in text_string_to_metric_families(r.text) for smp in fam.samples
                    if not smp.labels or smp.labels.get("le") in (None, "+Inf") or "finish_reason" in smp.labels}

        before = read()
        assert before["ringlinear_num_requests_running"] == 0 and before["ringlinear_decode_tokens_total"] == 0
        layout = s.engine.engine.scheduler.cache.layout
        assert before["ringlinear_kv_cache_blocks_total"] == layout.num_blocks
        assert before["ringlinear_state_slots_total"] == layout.num_slots
        post(s, "/v1/completions", {"prompt": "abcd", "n": 2, **GREEDY})
        post(s, "/v1/chat/completions", {"messages": CHAT, **GREEDY, "max_tokens": 3})
        m = read()
        # 2 choices x 8 tokens + 3: each sequence's first token comes from its prefill step, the rest decode
        assert m["ringlinear_decode_tokens_total"] == 2 * 7 + 2
        chat_prompt = post(s, "/tokenize", {"messages": CHAT})["count"]
        # n = 2: the prompt computed once per choice, or once when the engine forks the choices after it
        assert 4 + chat_prompt <= m["ringlinear_prefill_tokens_total"] <= 2 * 4 + chat_prompt
        assert m["ringlinear_time_to_first_token_seconds_count"] == 2  # once per request
        assert m["ringlinear_inter_token_latency_seconds_count"] == 2 * 7 + 2
        assert m["ringlinear_choices_finished_total"] == 3  # all by length (one label value)
        assert m["ringlinear_num_preemptions_total"] == 0
        # while a long request runs: one running, its blocks and slot in use
        slow_steps(monkeypatch, s.engine.engine)
        with s.client.stream("POST", "/v1/completions", json={"prompt": "x" * 40, "temperature": 0,
                                                              "ignore_eos": True, "max_tokens": 1500,
                                                              "stream": True}) as r:
            lines = first_event(r)
            m = read()
            assert m["ringlinear_num_requests_running"] == 1 and m["ringlinear_state_slots_used"] == 1
            assert m["ringlinear_kv_cache_blocks_used"] >= 3
        del lines
        assert wait_idle(s.engine)


def test_metrics_of_speculative_decoding(ckpt):
    """With num_speculative_tokens, /metrics counts verify steps, drafts proposed and accepted and the tokens they
    emitted, as the engine's `spec_stats` (and greedy completions equal those of plain decoding)."""
    from prometheus_client.parser import text_string_to_metric_families

    with running_server(ckpt) as plain:
        ref = post(plain, "/v1/completions", {"prompt": "abcd", **GREEDY})
    with running_server(ckpt, num_speculative_tokens=2) as s:
        body = post(s, "/v1/completions", {"prompt": "abcd", **GREEDY})
        assert [c["text"] for c in body["choices"]] == [c["text"] for c in ref["choices"]]
        text = s.client.get("/metrics").text
        m = {smp.name: smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples}
        st = s.engine.engine.spec_stats
        assert st.verify_steps > 0 and m["ringlinear_spec_decode_num_verify_steps_total"] == st.verify_steps
        assert m["ringlinear_spec_decode_num_draft_tokens_total"] == 2 * st.verify_steps
        assert m["ringlinear_spec_decode_num_accepted_tokens_total"] == st.accepted_tokens
        assert m["ringlinear_spec_decode_num_emitted_tokens_total"] == st.emitted_tokens
        # the first token comes from the prompt, the others from verify steps (cut at max_tokens)
        assert st.emitted_tokens == body["usage"]["completion_tokens"] - 1


def test_served_model_name_and_api_key_on_every_api_route(ckpt):
    cfg = ServerConfig(served_model_name="ring-test", api_key="k3y", log_level="warning")
    with running_server(ckpt, cfg) as s:
        auth = {"Authorization": "Bearer k3y"}
        assert [m["id"] for m in s.client.get("/v1/models", headers=auth).json()["data"]] == ["ring-test"]
        for path, body in (("/v1/completions", {"prompt": "hi", **GREEDY}),
                           ("/v1/chat/completions", {"messages": CHAT, **GREEDY}),
                           ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert s.client.post(path, json=body).status_code == 401, path
            assert s.client.post(path, json={**body, "model": "ring-test"}, headers=auth).status_code == 200, path
            r = s.client.post(path, json={**body, "model": s.engine.model_name}, headers=auth)
            assert r.status_code == 404 and r.json()["error"]["param"] == "model", path
        r = s.client.post("/v1/completions", json={"prompt": "hi", "model": "ring-test", **GREEDY}, headers=auth)
        assert r.json()["model"] == "ring-test"
        assert s.client.get("/metrics").status_code == 200 and s.client.get("/health").status_code == 200


def test_prompt_lists_and_admission(ckpt, monkeypatch):
    """A request holds one admission per prompt: more prompts than the server admits at all is a 400 naming the
    prompt; more than it admits now is a 429, and nothing is left behind."""
    with running_server(ckpt, ServerConfig(max_waiting_requests=1, log_level="warning"), max_num_seqs=2) as s:
        assert len(post(s, "/v1/completions", {"prompt": ["a", "b", "c"], **GREEDY})["choices"]) == 3
        r = s.client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], **GREEDY})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        slow_steps(monkeypatch, s.engine.engine)
        with s.client.stream("POST", "/v1/completions", json={"prompt": "long", "temperature": 0, "ignore_eos": True,
                                                              "max_tokens": 1500, "stream": True}) as held:
            lines = first_event(held)
            r = s.client.post("/v1/completions", json={"prompt": ["a", "b", "c"], **GREEDY})
            assert r.status_code == 429, r.text
            assert len(post(s, "/v1/completions", {"prompt": ["a", "b"], **GREEDY})["choices"]) == 2
        del lines
        assert wait_idle(s.engine)


def test_a_failed_choice_fails_its_request_alone(server, monkeypatch):
    """Choice 1 of an n = 3 request gets NaN logits: the request is a 500 (streamed: an error event, then
    [DONE]) and its other choices are ended, freeing the cache; the next request is unaffected."""
    eng = server.engine.engine
    execute = eng.runner.execute
    beside = {"prompt": "beside", **GREEDY}
    alone = post(server, "/v1/completions", beside)["choices"][0]["text"]

    def poisoned(batch, rows, *rest):
        logits = execute(batch, rows, *rest)
        for j, i in enumerate(rows):
            seq = batch[i][0]
            if seq.index == 1 and bytes(t for t in seq.prompt_token_ids if t < 256) == b"poison":
                logits[j] = float("nan")
        return logits

    monkeypatch.setattr(eng.runner, "execute", poisoned)
    r = server.client.post("/v1/completions", json={"prompt": "poison", "n": 3, **GREEDY, "max_tokens": 200})
    assert r.status_code == 500 and "not finite" in r.json()["error"]["message"]
    with server.client.stream("POST", "/v1/completions", json={"prompt": "poison", "n": 3, "stream": True,
                                                               **GREEDY, "max_tokens": 200}) as resp:
        events = sse(resp.iter_lines())
    assert events[-1] is None and "not finite" in events[-2]["error"]["message"]
    assert post(server, "/v1/completions", beside)["choices"][0]["text"] == alone
    assert wait_idle(server.engine)


def test_one_refused_prompt_refuses_the_request(server):
    """The engine refuses prompt[1] (no room for max_tokens): a 400 naming it, and prompt[0], added beside it, is
    aborted."""
    r = server.client.post("/v1/completions", json={"prompt": ["fine", [97] * (MAX_LEN - 4)],
                                                     **GREEDY, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert r.json()["error"]["message"].startswith("prompt[1]")
    assert wait_idle(server.engine)
