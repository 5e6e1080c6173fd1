"""The engine's Python API in vLLM's shape: SamplingParams' new fields validated by name, the deprecated forms
still working with a warning, outputs as RequestOutput -> CompletionOutput -> Logprob; the sampler's logit
processing (min_tokens, logit_bias, penalties) against per-row references, batched equal to alone; and through
the engine: n choices with seeds seed + i, top-k logprobs and prompt logprobs equal to the model's own
distribution, penalties equal to a reference generation loop."""

import math
import warnings

import pytest
import torch

from ringlinear.config import preset
from ringlinear.engine.llm import LLM, EngineConfig, LLMEngine
from ringlinear.engine.sampler import Penalties, process_logits, sample, token_logprobs
from ringlinear.engine.sequence import Logprob, RequestError, SamplingParams
from ringlinear.hf import save_model
from ringlinear.model import init_model
from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-api")
    model = init_model(preset("tiny"), seed=1)
    save_model(model, str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    return str(d), model.eval()


# ---- SamplingParams -------------------------------------------------------------------------------------
BAD = [
    ("n", {"n": 0}), ("n", {"n": 1.0}), ("n", {"n": True}),
    ("logprobs", {"logprobs": 21}), ("logprobs", {"logprobs": -1}), ("logprobs", {"logprobs": 1.5}),
    ("prompt_logprobs", {"prompt_logprobs": 21}), ("prompt_logprobs", {"prompt_logprobs": "3"}),
    ("presence_penalty", {"presence_penalty": NAN}), ("presence_penalty", {"presence_penalty": INF}),
    ("presence_penalty", {"presence_penalty": 2.5}), ("frequency_penalty", {"frequency_penalty": -3}),
    ("frequency_penalty", {"frequency_penalty": "1"}), ("repetition_penalty", {"repetition_penalty": 0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}), ("repetition_penalty", {"repetition_penalty": NAN}),
    ("repetition_penalty", {"repetition_penalty": INF}), ("logit_bias", {"logit_bias": [1, 2]}),
    ("logit_bias", {"logit_bias": {"5": 1.0}}), ("logit_bias", {"logit_bias": {-1: 1.0}}),
    ("logit_bias", {"logit_bias": {5: NAN}}), ("logit_bias", {"logit_bias": {5: -INF}}),
    ("logit_bias", {"logit_bias": {5: "1"}}), ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 17, "max_tokens": 16}), ("temperature", {"temperature": NAN}),
    ("top_p", {"top_p": NAN}), ("ignore_eos", {"ignore_eos": 1}),
]


@pytest.mark.parametrize("field,kw", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_sampling_params_name_the_field(field, kw):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_sampling_params_normalisation_and_deprecated_bool_logprobs():
    p = SamplingParams(logit_bias={3: 250.0, 4: -1e9, 5: 0.5})
    assert p.logit_bias == {3: 100.0, 4: -100.0, 5: 0.5}  # clamped as OpenAI
    with pytest.warns(DeprecationWarning, match="logprobs"):
        assert SamplingParams(logprobs=True).logprobs == 0
    with pytest.warns(DeprecationWarning):
        assert SamplingParams(logprobs=False).logprobs is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20


def test_engine_refuses_by_name(ckpt):
    path, _ = ckpt
    eng = LLMEngine(EngineConfig(model=path, max_num_seqs=4, verbose=False))
    for field, kw in [("n", {"n": 5}), ("logit_bias", {"logit_bias": {320: 1.0}}),
                      ("stop_token_ids", {"stop_token_ids": [10**6]}), ("seed", {"seed": 2**64 - 1, "n": 2})]:
        with pytest.raises(RequestError) as e:
            eng.add_request("r", [1, 2, 3], SamplingParams(**kw))
        assert e.value.field == field, kw
    for prompt in ([1, True, 3], [1, 2.0], [1, -1], [1, eng.config.vocab_size], [], "", None):
        with pytest.raises(RequestError) as e:
            eng.add_request("r", prompt, SamplingParams())
        assert e.value.field == "prompt", prompt
    assert not eng.has_unfinished_requests()


# ---- the sampler ----------------------------------------------------------------------------------------
def reference_process(row: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int],
                      stop_ids: list[int]) -> torch.Tensor:
    """One row, token by token, as vLLM/HF/OpenAI define them."""
    x = row.clone()
    if p.min_tokens and len(out) < p.min_tokens:
        for t in stop_ids:
            x[t] = -INF
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.penalised:
        for t in set(prompt) | set(out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        for t in set(out):
            x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return x


def test_process_logits_equals_per_row_reference_and_alone():
    V = 40
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 3
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.6),
              SamplingParams(logit_bias={2: 5.0, 9: -100.0}, min_tokens=3),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.5, logit_bias={7: 1.5}, min_tokens=1, frequency_penalty=2.0),
              SamplingParams(min_tokens=2)]
    prompts = [[1, 2, 3, 3], [4], [5, 6], [7, 8, 30], [9]]
    outs = [[3, 3, 11, 12, 12, 12], [2], [], [7, 7, 39], [1]]
    stop_ids = [[0], [0, 13], [0], [0, 39], [0]]
    pen_rows = [0, 3]
    counts = torch.zeros(len(pen_rows), V, dtype=torch.int32)
    seen = torch.zeros(len(pen_rows), V, dtype=torch.bool)
    for j, i in enumerate(pen_rows):
        for t in outs[i]:
            counts[j, t] += 1
        seen[j, prompts[i] + outs[i]] = True
    got = process_logits(logits, params, [len(o) for o in outs], stop_ids, Penalties(pen_rows, counts, seen))
    for i, p in enumerate(params):
        ref = reference_process(logits[i], p, prompts[i], outs[i], stop_ids[i])
        torch.testing.assert_close(got[i], ref, rtol=1e-6, atol=1e-6)
        j = pen_rows.index(i) if i in pen_rows else None
        pen = None if j is None else Penalties([0], counts[j : j + 1], seen[j : j + 1])
        alone = process_logits(logits[i : i + 1], [p], [len(outs[i])], [stop_ids[i]], pen)
        assert torch.equal(alone[0], got[i])
    assert torch.equal(got[2], logits[2])  # neutral parameters change nothing
    assert got[1, 13] == -INF and got[4, 0] == -INF  # min_tokens not reached: stop tokens masked
    assert got[3, 39] != -INF  # reached


def test_sampler_reports_the_model_distribution_and_never_makes_nan():
    V = 30
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    logits[2, 4] = 3e38  # a huge finite logit under a tiny repetition penalty: overflow is clamped
    params = [SamplingParams(temperature=0.0, logit_bias={17: 100.0}, logprobs=3),
              SamplingParams(temperature=0.7, min_tokens=2, logprobs=0, seed=1),
              SamplingParams(temperature=0.9, repetition_penalty=1e-3, logprobs=0)]
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, 4] = True
    pen = Penalties([2], torch.zeros(1, V, dtype=torch.int32), seen)
    out = sample(logits, params, [None, torch.Generator().manual_seed(1), None],
                 torch.Generator().manual_seed(2), num_outputs=[0, 0, 0], stop_ids=[[], [0], []], penalties=pen)
    assert out.errors == [None] * 3
    logp = torch.log_softmax(logits, -1)
    assert out.tokens[0] == 17  # the bias decides what is sampled ...
    assert out.logprobs[0] == pytest.approx(logp[0, 17].item(), abs=1e-6)  # ... not what is reported
    assert out.ranks[0] == int((logp[0] > logp[0, 17]).sum()) + 1
    top = torch.topk(logp[0], 3)
    assert [t for t, _ in out.top[0]] == top.indices.tolist()
    assert out.tokens[1] != 0 and out.top[1] == [] and out.ranks[1] is not None
    assert all(math.isfinite(x) for x in out.logprobs)
    # every token masked: an error for that row only
    one = sample(torch.zeros(2, 3), [SamplingParams(min_tokens=1), SamplingParams()], [None, None],
                 num_outputs=[0, 0], stop_ids=[[0, 1, 2], [0]])
    assert "masked" in one.errors[0] and one.errors[1] is None


def test_token_logprobs_ranks_and_alternatives():
    logp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]]), -1)
    chosen, ranks, alts = token_logprobs(logp, torch.tensor([2, 0]), [2, None])
    assert ranks == [3, None] and [t for t, _ in alts[0]] == [1, 3] and alts[1] == []
    assert chosen[0] == pytest.approx(logp[0, 2].item())


# ---- through the engine ---------------------------------------------------------------------------------
def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(ids)).float(), -1)


def test_outputs_in_vllm_shape_and_deprecated_flat_fields(ckpt):
    path, model = ckpt
    llm = LLM(path, max_num_batched_tokens=8, verbose=False)  # the prompt crosses chunks
    prompt = list(range(60, 80))
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=4,
                                                  prompt_logprobs=2))
    assert out.finished and out.prompt_token_ids == prompt and out.prompt is None and out.num_cached_tokens == 0
    [c] = out.outputs
    assert c.index == 0 and c.finish_reason == "length" and c.stop_reason is None and len(c.token_ids) == 5
    ref = model_logprobs(model, prompt + c.token_ids)
    n = len(prompt)
    for j, (t, d) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[n - 1 + j]
        assert isinstance(d[t], Logprob) and d[t].rank == 1  # greedy: the chosen token is the top one
        assert d[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert list(d)[0] == t and set(list(d)[1:]) <= set(torch.topk(row, 4).indices.tolist())
        assert len(d) in (4, 5) and d[t].decoded_token == llm.engine.tokenizer.decode([t])
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs)))
    # prompt logprobs: None for the first token, then log p(prompt[j] | prompt[:j]) and the top 2
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for j in range(1, n):
        d = out.prompt_logprobs[j]
        assert d[prompt[j]].logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4)
        assert d[prompt[j]].rank == int((ref[j - 1] > ref[j - 1, prompt[j]]).sum()) + 1
        assert len(d) in (2, 3)
    # the flat fields of the previous release: outputs[0], with a warning
    with pytest.warns(DeprecationWarning):
        assert out.token_ids == c.token_ids
    with pytest.warns(DeprecationWarning):
        assert out.text == c.text
    with pytest.warns(DeprecationWarning):
        assert out.finish_reason == "length"
    with pytest.warns(DeprecationWarning):
        assert out.logprobs == [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]


def test_n_choices_equal_separate_requests_with_seed_plus_index(ckpt):
    path, _ = ckpt
    llm = LLM(path, verbose=False)
    sp = dict(temperature=1.0, top_k=40, max_tokens=10, ignore_eos=True, logprobs=1)
    prompt = list(range(30, 52))
    [group] = llm.generate([prompt], SamplingParams(n=4, seed=11, **sp))
    assert [c.index for c in group.outputs] == [0, 1, 2, 3] and group.finished
    alone = llm.generate([prompt] * 4, [SamplingParams(seed=11 + i, **sp) for i in range(4)])
    for c, a in zip(group.outputs, alone):
        [a] = a.outputs
        assert c.token_ids == a.token_ids
        assert max(abs(x[t].logprob - y[t].logprob) for t, x, y in zip(c.token_ids, c.logprobs, a.logprobs)) < 1e-5
    assert len({tuple(c.token_ids) for c in group.outputs}) > 1


def reference_penalised_greedy(model, prompt, n, p: SamplingParams, stop_ids=()):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor(ids))[-1].float()
            ids.append(int(reference_process(row, p, prompt, out, list(stop_ids)).argmax()))
            out.append(ids[-1])
    return out


def test_penalties_bias_and_min_tokens_equal_reference_generation(ckpt):
    path, model = ckpt
    llm = LLM(path, verbose=False)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    # negative penalties reward repeats: a random model's greedy path rarely repeats on its own
    cases = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=-1.5),
             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=-2.0,
                            repetition_penalty=0.3),
             SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={65: 30.0, 66: 29.0},
                            logprobs=0)]
    outs = llm.generate([prompt] * len(cases), cases)  # one batch: penalised and plain rows together
    for p, o in zip(cases, outs):
        assert o.outputs[0].token_ids == reference_penalised_greedy(model, prompt, p.max_tokens, p), p
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert all(plain.outputs[0].token_ids != o.outputs[0].token_ids for o in outs)  # each changed the greedy path
    # the biased choice reports the model's own logprob, not the biased one
    c = outs[2].outputs[0]
    ref = model_logprobs(model, prompt + c.token_ids)
    for j, (t, d) in enumerate(zip(c.token_ids, c.logprobs)):
        assert d[t].logprob == pytest.approx(ref[len(prompt) - 1 + j, t].item(), abs=1e-4)
    # min_tokens: the greedy first token made a stop token is masked until 3 tokens are out
    first = plain.outputs[0].token_ids[0]
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, min_tokens=3, stop_token_ids=[first])
    c = llm.generate([prompt], p)[0].outputs[0]
    assert first not in c.token_ids[:3] and len(c.token_ids) >= 3
    assert c.token_ids[:3] == reference_penalised_greedy(model, prompt, 3, p, stop_ids=[first])
    if first in c.token_ids:
        assert c.finish_reason == "stop" and c.stop_reason == first and c.token_ids[-1] == first
