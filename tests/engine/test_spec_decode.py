"""Speculative decoding with the MTP module (CPU, fp32, tiny preset): greedy tokens equal plain greedy decoding token
for token (ragged batches, chunked prefill, preemption, prefix-cache hits, n > 1, stops, logprobs, penalised
requests mixed in); rejection sampling keeps the target's distribution (chi-square against the exact distribution,
fixed seeds); an MTP that predicts exactly what the target will say is always accepted."""

import math
import sys

import pytest
import torch

from ringlinear.accounting import cache_bytes
from ringlinear.config import preset
from ringlinear.config_base import ConfigError
from ringlinear.engine.llm import LLM
from ringlinear.engine.sampler import filter_logits
from ringlinear.engine.sequence import SamplingParams
from ringlinear.engine.spec_decode import accept
from ringlinear.hf import save_model
from ringlinear.model import init_model

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)
PROMPTS = [list(range(40, 57)), [7, 8, 9], list(range(100, 171)), [3] * 9, list(range(200, 233))]


def near_bigram(scale: float, seed: int = 1, preset_name: str = "tiny"):
    """A tiny model whose MTP knows a bigram model exactly: the MTP block's outputs are zeroed and eh_proj passes
    enorm(emb(x_{t+1})) through, so its logits are lm_head(norm(emb(x_{t+1}))) (up to RMSNorm's eps). The target's
    attention and MLP outputs are scaled by `scale`: 0 makes the target that same bigram model (every draft is
    right), small values make it depend on its context (linear states, KV) and drafts right only often."""
    model = init_model(preset(preset_name), seed=seed)
    H = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dense.weight") or "down_proj" in name:
                p.mul_(0.0 if name.startswith("model.mtp") else scale)
        w = model.model.mtp[0].eh_proj.weight
        w.zero_()
        w[:, H:] = torch.eye(H)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("near_bigram")
    save_model(near_bigram(0.03), str(d))
    return str(d)


@pytest.fixture(scope="module")
def exact_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigram")
    save_model(near_bigram(0.0), str(d))
    return str(d)


def engine(path, **kw):
    kw = {"max_num_batched_tokens": 32, "block_size": 4, "cpu_cache_gib": 0.02, "verbose": False, **kw}
    return LLM(path, **kw)


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_equals_plain_decoding_on_ragged_batches(ckpt):
    sp = SamplingParams(max_tokens=23, **GREEDY)
    base = engine(ckpt).generate(PROMPTS, sp)
    for k in (1, 2, 3):
        llm = engine(ckpt, num_speculative_tokens=k)
        outs = llm.generate(PROMPTS, sp)
        assert tokens(outs) == tokens(base)
        for a, b in zip(outs, base):  # the verify pass's logprobs are the target's
            ca, cb = a.outputs[0], b.outputs[0]
            assert max(abs(x[t].logprob - y[t].logprob) for t, x, y in zip(ca.token_ids, ca.logprobs,
                                                                             cb.logprobs)) < 1e-4
        st = llm.engine.spec_stats
        # some drafts accepted, some rejected: both paths (and the linear-state rollback) ran
        assert 0 < st.accepted_tokens < st.draft_tokens == k * st.verify_steps
        # each step emits its accepted drafts + 1, except where max_tokens cut its last step short
        assert st.verify_steps < st.emitted_tokens <= st.verify_steps + st.accepted_tokens
        assert st.emitted_tokens <= sum(len(o.outputs[0].token_ids) - 1 for o in outs)
        cache = llm.engine.scheduler.cache
        assert cache.num_free_blocks() == cache.layout.num_blocks and len(cache.free_slots) == cache.layout.num_slots


@pytest.mark.parametrize("k", [1, 3])
def test_verify_graph_buffers(ckpt, k):
    """The CUDA-graph verify path's static buffers, padding rows (state slot -1, the pad block) and padded commit,
    run eagerly on the CPU (`VerifyGraphs(capture=False)`): the same tokens as plain decoding, and verify-only steps
    took that path."""
    from ringlinear.engine.cuda_graphs import VerifyGraphs

    sp = SamplingParams(max_tokens=19, **GREEDY)
    base = engine(ckpt, max_num_seqs=6).generate(PROMPTS, sp)
    llm = engine(ckpt, max_num_seqs=6, num_speculative_tokens=k)
    runner = llm.engine.runner
    runner.verify_graphs = vg = VerifyGraphs(runner.model, runner.cache, 6, k + 1, capture=False)
    assert vg.sizes == [1, 2, 4, 6]
    calls = []
    run = vg.run
    vg.run = lambda seqs: (calls.append(len(seqs)), run(seqs))[1]
    assert tokens(llm.generate(PROMPTS, sp)) == tokens(base)
    assert set(calls) >= {3, 5}  # padded buckets (4, 6) among them
    assert llm.engine.spec_stats.accepted_tokens > 0


def test_exact_mtp_is_always_accepted(exact_ckpt, capsys):
    sp = SamplingParams(max_tokens=21, **GREEDY)
    base = engine(exact_ckpt).generate(PROMPTS, sp)
    llm = engine(exact_ckpt, num_speculative_tokens=3)
    assert tokens(llm.generate(PROMPTS, sp)) == tokens(base)
    st = llm.engine.spec_stats
    assert st.acceptance_rate == 1.0 and st.draft_tokens == 3 * st.verify_steps > 0
    # 21 tokens: the first from the prompt, then 5 steps of 4 tokens each
    assert st.verify_steps == 5 * len(PROMPTS) and st.tokens_per_step == 4.0
    llm.engine.engine_config.verbose = True  # the verbose log's line
    llm.engine._log_spec_stats(every_s=0.0)
    assert "speculative decoding: acceptance 1.000, 4.00 tokens per verify step" in capsys.readouterr().out


def test_rejected_tokens_blocks_are_returned(ckpt):
    """After every step each running sequence holds exactly the blocks of its computed tokens: the blocks grown for
    rejected drafts went back at once."""
    llm = engine(ckpt, num_speculative_tokens=3, block_size=2)
    eng, cache = llm.engine, llm.engine.scheduler.cache
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=20, **GREEDY))
    while eng.has_unfinished_requests():
        eng.step()
        for seq in eng.scheduler.running:
            assert len(seq.block_table) == cache.blocks_for(seq.num_computed), (seq.num_computed, seq.block_table)
    assert 0 < eng.spec_stats.accepted_tokens < eng.spec_stats.draft_tokens
    assert cache.num_free_blocks() == cache.layout.num_blocks


def test_chunked_prefill_and_small_budget(ckpt):
    """Prompts chunked over 6-token steps; a verify row of k + 1 = 4 tokens shares the budget with chunks and falls
    back to plain decoding when fewer than 4 tokens remain."""
    sp = SamplingParams(max_tokens=17, **GREEDY)
    base = engine(ckpt, max_num_batched_tokens=6).generate(PROMPTS, sp)
    llm = engine(ckpt, max_num_batched_tokens=6, num_speculative_tokens=3)
    assert tokens(llm.generate(PROMPTS, sp)) == tokens(base)
    assert llm.engine.spec_stats.accepted_tokens > 0


def test_preemption(ckpt):
    kv, state = cache_bytes(preset("tiny"), torch.float32)
    kv += 2 * 2 * 32 * 4  # the MTP layer's K and V (2 heads x 32, fp32)
    budget = 3 * state + 16 * 4 * kv  # 3 slots, 16 blocks of 4 tokens: too few for 3 sequences of ~34 tokens
    prompts = [list(range(20, 30)), list(range(50, 60)), list(range(80, 90))]
    sp = SamplingParams(max_tokens=24, **GREEDY)
    base = engine(ckpt).generate(prompts, sp)
    llm = engine(ckpt, max_num_seqs=3, cpu_cache_gib=budget / 2**30, max_num_batched_tokens=64,
                 num_speculative_tokens=2)
    assert llm.engine.scheduler.cache.layout.num_blocks == 16
    outs = llm.generate(prompts, sp)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == tokens(base)


def test_prefix_cache_hits(ckpt):
    """A prompt sent again resumes from its end-of-prompt snapshot, a follow-up turn from the finished sequence's
    snapshot (its MTP KV included): the same tokens as without the cache and without speculation."""
    prompt = list(range(60, 101))  # 41 tokens
    sp = SamplingParams(max_tokens=15, **GREEDY)
    plain = engine(ckpt, enable_prefix_caching=False)
    llm = engine(ckpt, prefix_state_interval=16, num_speculative_tokens=2)
    cold, hit = llm.generate([prompt], sp)[0], llm.generate([prompt], sp)[0]
    ref = plain.generate([prompt], sp)[0]
    assert hit.num_cached_tokens == len(prompt) - 1
    assert cold.outputs[0].token_ids == hit.outputs[0].token_ids == ref.outputs[0].token_ids
    turn2 = prompt + ref.outputs[0].token_ids + [5, 6, 7]
    again = llm.generate([turn2], sp)[0]
    assert again.num_cached_tokens >= len(prompt) + 14
    assert again.outputs[0].token_ids == plain.generate([turn2], sp)[0].outputs[0].token_ids
    assert llm.engine.spec_stats.accepted_tokens > 0


def test_n_greater_than_one(ckpt):
    """n = 3 greedy choices fork after the prompt and each equals plain greedy decoding; seeded sampled choices are
    reproducible."""
    sp = SamplingParams(n=3, max_tokens=14, **GREEDY)
    llm = engine(ckpt, num_speculative_tokens=2)
    base = engine(ckpt).generate(PROMPTS[:2], SamplingParams(max_tokens=14, **GREEDY))
    for out, ref in zip(llm.generate(PROMPTS[:2], sp), base):
        assert [c.token_ids for c in out.outputs] == [ref.outputs[0].token_ids] * 3
    seeded = SamplingParams(n=4, seed=11, temperature=1.0, top_k=20, max_tokens=12, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], seeded)[0]
    b = engine(ckpt, num_speculative_tokens=2).generate([PROMPTS[0]], seeded)[0]
    assert tokens([a]) == tokens([b]) and len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stops_and_mixed_requests(ckpt):
    """A stop token or max_tokens inside a run of accepted drafts cuts the output there; penalised and min_tokens
    requests decode one token per step in the same batches; logit_bias applies to drafts and targets alike; prompt
    logprobs come out of the same forward; the results equal plain decoding."""
    base = engine(ckpt).generate(PROMPTS, SamplingParams(max_tokens=20, **GREEDY))
    stop = base[0].outputs[0].token_ids[9]
    params = [SamplingParams(max_tokens=20, stop_token_ids=[stop], **GREEDY),
              SamplingParams(max_tokens=7, **GREEDY),
              SamplingParams(max_tokens=20, repetition_penalty=1.3, **GREEDY),
              SamplingParams(max_tokens=20, min_tokens=12, stop_token_ids=[base[3].outputs[0].token_ids[3]],
                             **GREEDY),
              SamplingParams(max_tokens=19, logit_bias={5: 2.0}, prompt_logprobs=1, **GREEDY)]
    ref = engine(ckpt).generate(PROMPTS, params)
    llm = engine(ckpt, num_speculative_tokens=3)
    outs = llm.generate(PROMPTS, params)
    assert tokens(outs) == tokens(ref)
    assert [d and sorted(d) for d in outs[4].prompt_logprobs] == [d and sorted(d) for d in ref[4].prompt_logprobs]
    assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].token_ids[-1] == stop
    assert len(outs[1].outputs[0].token_ids) == 7


def test_config_errors(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="num_speculative_tokens=-1: must be >= 0"):
        engine(ckpt, num_speculative_tokens=-1)
    with pytest.raises(ConfigError, match="num_speculative_tokens=2: not yet with tensor_parallel_size=2"):
        engine(ckpt, num_speculative_tokens=2, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="num_speculative_tokens=16: must be < 16"):
        engine(ckpt, num_speculative_tokens=16)
    with pytest.raises(ConfigError, match="num_speculative_tokens=2: not yet with quantization or load_format dummy"):
        engine(ckpt, num_speculative_tokens=2, quantization="fp8")
    with pytest.raises(ConfigError, match="aligned_numerics='all': not yet with num_speculative_tokens > 0"):
        engine(ckpt, num_speculative_tokens=2, aligned_numerics="all")
    save_model(init_model(preset("tiny", num_nextn_predict_layers=0), seed=0), str(tmp_path))
    with pytest.raises(ConfigError, match="num_speculative_tokens=1: needs a model with MTP layers"):
        engine(str(tmp_path), num_speculative_tokens=1)


def _chi2(counts: dict, probs: dict) -> tuple[float, int]:
    """Pearson's statistic over the cells of `probs` (counts outside them make it infinite) and the degrees of
    freedom."""
    n = sum(counts.values())
    if set(counts) - set(probs):
        return math.inf, len(probs) - 1
    return sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in probs.items()), len(probs) - 1


# chi-square quantiles at 0.999 (the tests are deterministic; this only says how far from the target is too far)
CHI2_999 = {3: 16.27, 5: 20.52, 8: 26.12, 15: 37.70}


def test_accept_keeps_the_target_distribution():
    """`accept` on fixed target rows p_0..p_2 and draft rows q_0, q_1 (drafts drawn from q): the first emitted token
    is distributed as p_0 and, after an accepted first draft, the second as p_1; a rule that skipped the correction
    (always taking the draft) is rejected by the same test."""
    gen = torch.Generator().manual_seed(0)
    V, N = 6, 12000
    p = torch.softmax(torch.randn(3, V, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(2, V, generator=gen) * 1.5, -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).T.tolist()  # [N, 2]
    logits = p.log()[None].expand(N, 3, V).contiguous()
    params = [SamplingParams(temperature=1.0)] * N
    out, num_acc, errors = accept(logits, drafts, [[q[0], q[1]]] * N, params, [gen] * N)
    assert errors == [None] * N and all(len(t) == a + 1 for t, a in zip(out, num_acc))
    first = {}
    for t in out:
        first[t[0]] = first.get(t[0], 0) + 1
    stat, dof = _chi2(first, dict(enumerate(p[0].tolist())))
    assert stat < CHI2_999[dof], stat
    second = {}
    for t in out:
        if len(t) >= 2:
            second[t[1]] = second.get(t[1], 0) + 1
    stat, dof = _chi2(second, dict(enumerate(p[1].tolist())))
    assert stat < CHI2_999[dof], stat
    uncorrected = {}
    for d in drafts:
        uncorrected[d[0]] = uncorrected.get(d[0], 0) + 1
    assert _chi2(uncorrected, dict(enumerate(p[0].tolist())))[0] > 10 * CHI2_999[5]


def test_engine_sampling_keeps_the_target_distribution(ckpt):
    """Seeded requests with k = 2 and top_k = 4: the joint distribution of the first two generated tokens (the second
    comes out of a verify step) against the target's exact one, by chi-square over its 16 cells."""
    model = near_bigram(0.03)
    prompt = [9, 10, 11, 12, 13]
    T, top_k, N = 0.5, 4, 640

    def dist(ids):
        with torch.no_grad():
            logits = model(torch.tensor(ids))[-1]
        return torch.softmax(filter_logits((logits - logits.max()) / T, top_k, 1.0), -1)

    exact = {}
    p1 = dist(prompt)
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = dist(prompt + [t1])
        for t2 in torch.nonzero(p2).flatten().tolist():
            exact[(t1, t2)] = float(p1[t1] * p2[t2])
    llm = engine(ckpt, num_speculative_tokens=2, max_num_seqs=64, max_num_batched_tokens=512,
                 enable_prefix_caching=False)
    params = [SamplingParams(temperature=T, top_k=top_k, seed=1000 + i, max_tokens=2, ignore_eos=True)
              for i in range(N)]
    outs = llm.generate([prompt] * N, params)
    st = llm.engine.spec_stats
    assert st.verify_steps == N and 0 < st.accepted_tokens < st.draft_tokens
    counts = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    stat, dof = _chi2(counts, exact)
    assert stat < CHI2_999[dof], (stat, counts, exact)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor back to the host (a device sync on the GPU), except the draws of the
    requests' CPU generators (`_uniform`, `_draw`: host tensors on the GPU too)."""

    NAMES = ("tolist", "item", "cpu", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES and sys._getframe(1).f_code.co_name not in ("_uniform",
                                                                                                     "_draw"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _step_work(path, k: int, B: int, sp: SamplingParams, steps: int = 4) -> list[dict]:
    """Per verify-only step with B sequences on the verify-graph path (`VerifyGraphs(capture=False)`): calls of
    lightning_commit / lightning_verify / the MTP forwards / accept / draft, the MTP forwards' shapes, and host
    reads of tensors."""
    from unittest import mock

    import ringlinear.engine.cache as cache_mod
    import ringlinear.engine.llm as llm_mod
    from ringlinear.engine.cuda_graphs import VerifyGraphs

    llm = engine(path, num_speculative_tokens=k, max_num_seqs=8, max_num_batched_tokens=256,
                 enable_prefix_caching=False)
    eng, runner = llm.engine, llm.engine.runner
    runner.verify_graphs = vg = VerifyGraphs(runner.model, runner.cache, 8, k + 1, capture=False)
    for i in range(B):
        eng.add_request(f"r{i}", [5 + i, 9, 11 + 2 * i, 3, 7], sp)
    while any(not s.draft_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    rows = []
    for _ in range(steps):
        calls: dict = {}

        def counted(name, fn, calls=calls):
            def f(*a, **kw):
                calls[name] = calls.get(name, 0) + 1
                if name == "mtp_forward":
                    calls.setdefault("mtp_shapes", set()).add(tuple(a[2]))
                if name == "mtp_graph":
                    calls.setdefault("mtp_shapes", set()).add(len(a[0]))
                return fn(*a, **kw)
            return f

        reads = _HostReads()
        with mock.patch.object(cache_mod, "lightning_commit", counted("commit", cache_mod.lightning_commit)), \
                mock.patch.object(cache_mod, "lightning_verify", counted("verify", cache_mod.lightning_verify)), \
                mock.patch.object(llm_mod, "accept", counted("accept", llm_mod.accept)), \
                mock.patch.object(llm_mod, "draft", counted("draft", llm_mod.draft)), \
                mock.patch.object(runner, "mtp_forward", counted("mtp_forward", runner.mtp_forward)), \
                mock.patch.object(vg, "mtp", counted("mtp_graph", vg.mtp)), \
                mock.patch.object(vg, "run", counted("verify_graph", vg.run)), \
                mock.patch.object(vg, "chain", counted("chain_graph", vg.chain)), reads:
            eng.step()
        assert len(eng.scheduler.running) == B and all(s.draft_tokens for s in eng.scheduler.running)
        calls["host_reads"] = reads.count
        rows.append(calls)
    return rows


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sampled", [False, True])
def test_step_work_does_not_grow_with_batch(ckpt, k, sampled):
    """The host work of a verify-only step is the same at B = 2 and B = 8: one lightning_verify and one
    lightning_commit per linear layer for the whole batch, one verify graph, one MTP catch-up graph over all
    k + 1 positions of every sequence (its shape never depends on what was accepted), the chain in one graph
    (greedy) or k - 1 MTP forwards of one row per sequence (sampled), and the same number of tensor reads to the
    host (greedy and seeded sampling)."""
    sp = (SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=60, ignore_eos=True) if sampled
          else SamplingParams(max_tokens=60, **GREEDY))
    small, large = _step_work(ckpt, k, 2, sp), _step_work(ckpt, k, 8, sp)
    cfg = preset("tiny")
    n_linear = sum(not cfg.is_softmax_layer(i) for i in range(cfg.num_hidden_layers))
    for B, rows in ((2, small), (8, large)):
        for r in rows:
            assert r["commit"] == r["verify"] == n_linear, r
            assert r["verify_graph"] == r["mtp_graph"] == r["accept"] == 1, r
            # the chain: greedy drafts in one graph (argmax on the device), sampled ones eagerly; then the catch-up
            chain_graph = int(k > 1 and not sampled)
            assert r.get("chain_graph", 0) == chain_graph, r
            assert r.get("mtp_forward", 0) == (k - 1) * (1 - chain_graph) and r["draft"] == 1 + r.get("mtp_forward", 0), r
            assert r["mtp_shapes"] <= {B * (k + 1), (1,) * B}, r  # fixed shapes: the graph's rows, chain rows
    strip = lambda rows: [{n: v for n, v in r.items() if n != "mtp_shapes"} for r in rows]  # noqa: E731
    assert strip(small) == strip(large)
