"""The sampler under hostile parameters and broken logits: no parameter value makes it produce NaN or raise
(tiny temperatures are greedy, a top_p that rounds to 0 keeps the top token), a row without finite logits is
reported as that row's error while the other rows are sampled as usual; and the engine's step finishes only
that sequence (finish_reason "error"), the others go on unchanged."""

import math

import pytest
import torch

from ringlinear.config import preset
from ringlinear.engine.llm import LLM, EngineConfig, LLMEngine
from ringlinear.engine.sampler import filter_logits, sample
from ringlinear.engine.sequence import RequestError, SamplingParams
from ringlinear.hf import save_model
from ringlinear.model import init_model
from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

HOSTILE = [dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=1e-38), dict(temperature=1e-6),
           dict(top_p=1e-300), dict(top_p=5e-324), dict(temperature=100.0, top_p=1e-300),
           dict(temperature=1e-30, top_k=1), dict(temperature=7e-6, top_p=1e-200, top_k=3)]


@pytest.mark.parametrize("kw", HOSTILE, ids=[str(k) for k in HOSTILE])
def test_hostile_parameters_sample_the_top_token(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 30
    logits[1, 7] = 3e38  # a huge but finite logit: (logit - max) / T must not overflow into NaN
    logits[2, :40] = float("-inf")  # masked tokens
    params = [SamplingParams(**kw)] * 3
    out = sample(logits, params, [None] * 3, g)
    assert out.errors == [None] * 3
    assert out.tokens == logits.argmax(-1).tolist()  # 1/T dwarfs every gap, or top_p keeps only the top token
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_top_p_rounding_to_zero_keeps_the_top_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    for top_p in (1e-300, 1e-45, 1e-7):
        assert (~torch.isinf(filter_logits(logits, 0, top_p))).tolist() == [[True, False, False]]


def test_a_row_without_finite_logits_fails_alone():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    logits[0] = float("nan")
    logits[2, 5] = float("nan")
    logits[3] = float("-inf")
    logits[4, 9] = float("inf")
    params = [SamplingParams(temperature=0.8)] * 2 + [SamplingParams(temperature=0.0)] * 3
    out = sample(logits, params, [None] * 5, torch.Generator().manual_seed(2))
    assert out.errors[1] is None and all("not finite" in e for e in out.errors[:1] + out.errors[2:])
    # the failed rows draw nothing: the good row gets the draw it gets alone
    alone = sample(logits[1:2], params[1:2], [None], torch.Generator().manual_seed(2))
    assert out.tokens[1] == alone.tokens[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-sampler")
    save_model(init_model(preset("tiny"), seed=1), str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    return str(d)


def test_step_fails_only_the_broken_sequence(ckpt):
    """One sequence's logits turn NaN mid-generation: it finishes with an error, the others equal their runs
    alone; hostile numbers in a request change nothing for its neighbours."""
    eng = LLMEngine(EngineConfig(model=ckpt, verbose=False))
    greedy = dict(temperature=0.0, ignore_eos=True, max_tokens=12)
    prompts = {"a": [5, 6, 7], "poisoned": [8, 9], "b": list(range(30, 50)), "cold": [11, 12]}
    alone = LLM(ckpt, verbose=False).generate(list(prompts.values()), SamplingParams(**greedy))
    execute = eng.runner.execute
    steps = [0]

    def poisoned_execute(batch, rows, *rest):
        logits = execute(batch, rows, *rest)
        steps[0] += 1
        for j, i in enumerate(rows):
            if batch[i][0].request_id == "poisoned" and steps[0] >= 3:
                logits[j] = float("nan")
        return logits

    eng.runner.execute = poisoned_execute
    for rid, p in prompts.items():
        params = SamplingParams(**{**greedy, "temperature": 1e-45}) if rid == "cold" else SamplingParams(**greedy)
        eng.add_request(rid, p, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done["poisoned"].outputs[0].finish_reason == "error" and "not finite" in done["poisoned"].error
    for rid, ref in zip(prompts, alone):
        if rid != "poisoned":
            assert done[rid].outputs[0].finish_reason == "length" and done[rid].error is None
            assert done[rid].outputs[0].token_ids == ref.outputs[0].token_ids, rid
    cache = eng.scheduler.cache
    assert cache.num_free_blocks() == cache.layout.num_blocks and len(cache.free_slots) == cache.layout.num_slots


def test_seed_outside_64_bits_is_a_request_error(ckpt):
    eng = LLMEngine(EngineConfig(model=ckpt, verbose=False))
    for seed in (2**64, -(2**63) - 1, 10**100):
        with pytest.raises(RequestError) as e:
            eng.add_request(f"s{seed}", [1, 2], SamplingParams(seed=seed))
        assert e.value.field == "seed"
    eng.add_request("ok", [1, 2], SamplingParams(seed=2**64 - 1, max_tokens=2))
    with pytest.raises(RequestError, match="Unicode"):
        eng.add_request("u", "a\ud800b", SamplingParams())
