"""The official OpenAI Python client against the server over real HTTP: completions and chat, n > 1, logprobs
with alternatives, streaming with usage; what it parses equals what the raw HTTP responses hold, and greedy
outputs equal the offline engine's."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from _serving import CHAT, running_server  # noqa: E402

from ringlinear.engine.sequence import SamplingParams  # noqa: E402
from ringlinear.serve.config import ServerConfig  # noqa: E402

KEY = "client-key"
SAMPLED = {"temperature": 0.8, "seed": 5, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def api(ckpt):
    with running_server(ckpt, ServerConfig(api_key=KEY, served_model_name="ring-tiny", log_level="warning")) as s:
        yield s, openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_key(api):
    s, client = api
    assert [m.id for m in client.models.list().data] == ["ring-tiny"]
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ring-tiny", prompt="hi", n=0)
    assert e.value.body["param"] == "n"


def test_completions(api, offline):
    s, client = api
    ref = offline.generate(["Hello", "World"], SamplingParams(n=2, temperature=0, ignore_eos=True, max_tokens=6,
                                                              logprobs=2))
    r = client.completions.create(model="ring-tiny", prompt=["Hello", "World"], n=2, logprobs=2, temperature=0,
                                  max_tokens=6, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [o.text for out in ref for o in out.outputs]
    for c, o in zip(r.choices, [o for out in ref for o in out.outputs]):
        assert c.logprobs.token_logprobs == pytest.approx([d[t].logprob for t, d in zip(o.token_ids, o.logprobs)],
                                                          abs=1e-4)
        assert len(c.logprobs.top_logprobs) == 6 and all(1 <= len(d) <= 3 for d in c.logprobs.top_logprobs)
    assert r.usage.completion_tokens == 24
    raw = s.client.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "ring-tiny", "prompt": ["Hello", "World"], "n": 2, "logprobs": 2, "temperature": 0, "max_tokens": 6,
        "ignore_eos": True}).json()
    assert r.model_dump(exclude_none=True)["choices"] == [{k: v for k, v in c.items() if v is not None}
                                                         for c in raw["choices"]]

    stream = client.completions.create(model="ring-tiny", prompt=["Hello", "World"], n=2, logprobs=2, stream=True,
                                       stream_options={"include_usage": True}, **{**SAMPLED, "temperature": 0})
    texts, tokens, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + c.logprobs.token_logprobs
    assert texts == {c.index: c.text for c in r.choices}
    assert {i: pytest.approx(v, abs=1e-6) for i, v in tokens.items()} == {
        c.index: c.logprobs.token_logprobs for c in r.choices}
    assert usage.completion_tokens == 24 and usage.prompt_tokens == r.usage.prompt_tokens


def test_chat(api, offline):
    s, client = api
    ref = offline.chat([CHAT], SamplingParams(n=3, temperature=0.8, seed=5, ignore_eos=True, max_tokens=6,
                                              logprobs=3))[0]
    r = client.chat.completions.create(model="ring-tiny", messages=CHAT, n=3, logprobs=True, top_logprobs=3, **SAMPLED)
    assert [c.message.content for c in r.choices] == [o.text for o in ref.outputs]
    for c, o in zip(r.choices, ref.outputs):
        assert [e.logprob for e in c.logprobs.content] == pytest.approx(
            [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)], abs=1e-4)
        assert all(len(e.top_logprobs) == 3 and e.bytes is not None for e in c.logprobs.content)

    stream = client.chat.completions.create(model="ring-tiny", messages=CHAT, n=3, logprobs=True, top_logprobs=3,
                                            stream=True, stream_options={"include_usage": True}, **SAMPLED)
    texts, roles, finish, lps, usage = {}, {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles.setdefault(c.index, c.delta.role)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            if c.logprobs is not None:
                lps[c.index] = lps.get(c.index, []) + [e.logprob for e in c.logprobs.content]
    assert texts == {c.index: c.message.content for c in r.choices}
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"} and finish == {0: "length", 1: "length",
                                                                                     2: "length"}
    assert lps == {c.index: [e.logprob for e in c.logprobs.content] for c in r.choices}
    assert usage.completion_tokens == 18 == r.usage.completion_tokens
