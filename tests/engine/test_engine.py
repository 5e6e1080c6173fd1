"""Engine invariants on the CPU with a tiny random checkpoint: engine greedy == the model's own greedy
generation (full recompute), ragged concurrent requests == each alone, chunked prefill and preemption
change nothing, stops/limits/seeds behave, logprobs equal the trainer's, bad requests are refused."""

import pytest
import torch

from ringlinear.accounting import cache_bytes
from ringlinear.config import preset
from ringlinear.engine.llm import LLM, EngineConfig, LLMEngine
from ringlinear.engine.sampler import filter_logits
from ringlinear.engine.sequence import RequestError, SamplingParams
from ringlinear.hf import save_model
from ringlinear.model import init_model
from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = init_model(preset("tiny"), seed=1)
    save_model(model, str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    model.eval()
    return str(d), model


def chosen(c) -> list[float]:
    """The chosen tokens' logprobs of a CompletionOutput."""
    return [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    logps = []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor(ids))[-1], -1)
            ids.append(int(logp.argmax()))
            logps.append(float(logp[ids[-1]]))
    return ids[len(prompt):], logps


PROMPTS = [list(range(40, 57)), [7, 8, 9], list(range(100, 171)), [3] * 9]


def test_greedy_equals_model_and_ragged_equals_alone(ckpt):
    path, model = ckpt
    llm = LLM(path, max_num_batched_tokens=32, block_size=4, cpu_cache_gib=0.02, verbose=False)
    together = llm.generate(PROMPTS, SamplingParams(max_tokens=10, **GREEDY))
    for p, out in zip(PROMPTS, together):
        ref, ref_lp = reference_greedy(model, p, 10)
        [c] = out.outputs
        assert c.token_ids == ref
        assert c.finish_reason == "length" and out.prompt_token_ids == p
        assert max(abs(a - b) for a, b in zip(chosen(c), ref_lp)) < 1e-4
        alone = llm.generate([p], SamplingParams(max_tokens=10, **GREEDY))[0]
        assert alone.outputs[0].token_ids == c.token_ids
    cache = llm.engine.scheduler.cache
    assert cache.num_free_blocks() == cache.layout.num_blocks and len(cache.free_slots) == cache.layout.num_slots


def test_preemption_recomputes_without_loss(ckpt):
    path, model = ckpt
    cfg = preset("tiny")
    kv, state = cache_bytes(cfg, torch.float32)
    budget = 3 * state + 14 * 4 * kv  # 3 slots, 14 blocks of 4 tokens: too few for 3 sequences of 30 tokens
    llm = LLM(path, max_num_seqs=3, block_size=4, cpu_cache_gib=budget / 2**30, max_num_batched_tokens=64,
              verbose=False)
    prompts = [list(range(20, 30)), list(range(50, 60)), list(range(80, 90))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(model, p, 20)[0]


def test_prompt_limits_and_bad_requests(ckpt):
    path, _ = ckpt
    eng = LLMEngine(EngineConfig(model=path, max_model_len=64, verbose=False))
    with pytest.raises(RequestError, match="prompt") as e:
        eng.add_request("a", list(range(60)), SamplingParams(max_tokens=10))
    assert e.value.field == "prompt"
    with pytest.raises(RequestError, match="prompt"):
        eng.add_request("b", [], SamplingParams())
    with pytest.raises(RequestError, match="vocabulary"):
        eng.add_request("c", [10**6], SamplingParams())
    for field, kw in [("temperature", {"temperature": -1}), ("top_p", {"top_p": 0}), ("max_tokens", {"max_tokens": 0}),
                      ("top_k", {"top_k": -5}), ("stop", {"stop": [""]}), ("seed", {"seed": "x"})]:
        with pytest.raises(RequestError) as e:
            SamplingParams(**kw)
        assert e.value.field == field
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=path, max_model_len=10**7, verbose=False))
    assert not eng.has_unfinished_requests()


def test_stops_text_seed_and_abort(ckpt):
    path, model = ckpt
    eng = LLMEngine(EngineConfig(model=path, verbose=False))
    ref, _ = reference_greedy(model, [65, 66, 67], 8)
    # a stop token: generation ends at its first occurrence, the stop token is kept in token_ids
    stop_tok = ref[3]
    llm = LLM(path, verbose=False)
    out = llm.generate([[65, 66, 67]], SamplingParams(max_tokens=8, stop_token_ids=[stop_tok], **GREEDY))[0]
    [out] = out.outputs
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(stop_tok) + 1]
    assert out.stop_reason == stop_tok
    # a stop string: cut from the text
    full = llm.generate(["ABC"], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0]
    assert full.text == llm.engine.decode(full.token_ids)
    if len(full.text) > 2:
        s = full.text[1:3]
        cut = llm.generate(["ABC"], SamplingParams(max_tokens=8, stop=[s], **GREEDY))[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(s)] and cut.stop_reason == s
    # seeds: same seed -> same tokens, whatever else runs in the batch
    sp = dict(temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, ignore_eos=True)
    a = llm.generate([[1, 2, 3]], SamplingParams(seed=7, **sp))[0].outputs[0]
    b = llm.generate([[9, 9], [1, 2, 3]], [SamplingParams(seed=1, **sp), SamplingParams(seed=7, **sp)])[1].outputs[0]
    c = llm.generate([[1, 2, 3]], SamplingParams(seed=8, **sp))[0].outputs[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    # abort mid-generation frees the cache and reports "abort"
    eng.add_request("x", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort_request("x")
    outs = eng.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] and not eng.has_unfinished_requests()
    cache = eng.scheduler.cache
    assert cache.num_free_blocks() == cache.layout.num_blocks


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = ~torch.isinf(filter_logits(logits, 0, 0.4))
    assert kept.tolist() == [[True, False, False, False]]


def test_chat_template(ckpt):
    path, _ = ckpt
    llm = LLM(path, verbose=False)
    text = llm.engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text
    with pytest.raises(RequestError, match="messages"):
        llm.engine.apply_chat_template([{"role": "user"}])
    out = llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=3, **GREEDY))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_triton_kernels_in_engine_match_reference(ckpt, monkeypatch):
    """The engine on the Triton Lightning kernels (interpreter on CPU, tests/conftest.py) == the reference path."""
    path, model = ckpt
    p = list(range(30, 50))
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    llm = LLM(path, max_num_batched_tokens=8, verbose=False)
    out = llm.generate([p, [4, 5]], SamplingParams(max_tokens=4, **GREEDY))
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    assert out[0].outputs[0].token_ids == reference_greedy(model, p, 4)[0]
    assert out[1].outputs[0].token_ids == reference_greedy(model, [4, 5], 4)[0]


def test_incremental_detokenisation_equals_whole_decodes_in_few_tokens(ckpt):
    # byte tokens that split 2-, 3- and 4-byte UTF-8 characters, an invalid byte, special tokens: the running text
    # is the whole decode of the tokens so far without a trailing incomplete character, the final text is the whole
    # decode, and the tokens decoded over the run grow linearly with its length (a few per token)
    from ringlinear.engine.sequence import Sequence

    path, _ = ckpt
    eng = LLMEngine(EngineConfig(model=path, max_num_seqs=2, verbose=False))
    tok = eng.tokenizer
    text = "ab é€ 😀 z" * 20
    ids = list(text.encode()) + [0xFF] + list(b"end")
    ids[40:40] = [tok.token_to_id("<|im_end|>")]
    decoded = []
    real_decode = eng.decode
    eng.decode = lambda x: decoded.append(len(x)) or real_decode(x)
    seq = Sequence("r", [1], SamplingParams())
    for i in range(len(ids)):
        seq.token_ids.append(ids[i])
        running = eng._detokenize(seq, seq.output_token_ids, final=False)
        whole = real_decode(ids[: i + 1])
        assert whole.startswith(running) and len(whole.rstrip("\ufffd")) == len(running), i
    assert eng._detokenize(seq, seq.output_token_ids, final=True) == real_decode(ids)
    assert sum(decoded) <= 10 * len(ids)
