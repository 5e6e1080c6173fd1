"""Prefix caching, n > 1 and RL groups on the CPU (tiny preset, fp32): a request served from the cache gives the
tokens and logprobs it gives with caching off (greedy and seeded; hits mid-block, with chunked prefill, after
preemption, after eviction, for n > 1), the very same ones (bitwise) as the run that filled the cache; a full
cache evicts and keeps serving; the hit counts of a multi-turn chat and of RL groups; the trie's bookkeeping."""

import pytest
import torch

from ringlinear.accounting import cache_bytes
from ringlinear.cli import build_parser
from ringlinear.config import preset
from ringlinear.engine.cache import HybridCache, plan_layout
from ringlinear.engine.llm import LLM, EngineConfig
from ringlinear.engine.prefix_cache import PrefixCache
from ringlinear.engine.sequence import SamplingParams, Sequence
from ringlinear.hf import save_model
from ringlinear.model import init_model
from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

BS, INTERVAL = 4, 8
KW = dict(block_size=BS, prefix_state_interval=INTERVAL, verbose=False)
GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)
SEEDED = dict(temperature=1.0, top_k=60, ignore_eos=True, logprobs=0)
A = list(range(40, 78))  # 38 tokens: its end-of-prompt snapshot (37 tokens) lies mid-block


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-prefix")
    save_model(init_model(preset("tiny"), seed=1), str(d))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (d / name).write_text(text)
    return str(d)


def result(out, i=0):
    c = out.outputs[i]
    return c.token_ids, [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]


def assert_same(got, ref, exact=False):
    """Tokens equal; logprobs equal (`exact`) or to fp32 rounding (the cache-off run chunks prompts elsewhere)."""
    assert got[0] == ref[0]
    if exact:
        assert got[1] == ref[1]
    else:
        assert max(abs(a - b) for a, b in zip(got[1], ref[1])) < 1e-5


def budget_bytes(n_slots, n_blocks, n_snapshots):
    """A cache budget `plan_layout` splits into these numbers (n_blocks >= n_snapshots * INTERVAL / BS: the
    budget holds one snapshot per INTERVAL tokens of KV)."""
    kv, state = cache_bytes(preset("tiny"), torch.float32)
    return n_slots * state + n_blocks * BS * kv + n_snapshots * (state + BS * kv)


def budget_gib(n_slots, n_blocks, n_snapshots):
    return budget_bytes(n_slots, n_blocks, n_snapshots) / 2**30


def assert_all_free(llm):
    cache = llm.engine.scheduler.cache
    assert len(cache.free_blocks) == cache.layout.num_blocks and len(cache.free_slots) == cache.layout.num_slots
    assert all(r == 0 for r in cache.ref)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("chunk", [64, 6], ids=["whole", "chunked"])
def test_hits_equal_cache_off(ckpt, sampling, chunk):
    on = LLM(ckpt, max_num_batched_tokens=chunk, **KW)
    off = LLM(ckpt, max_num_batched_tokens=chunk, enable_prefix_caching=False, **KW)
    sp = SamplingParams(max_tokens=8, seed=3, **sampling)
    cold = on.generate([A], sp)[0]
    assert cold.num_cached_tokens == 0
    reply = cold.outputs[0].token_ids
    # (request, cached tokens): the same prompt (end-of-prompt snapshot, mid-block), an extension of it, a
    # shorter prefix (the interval snapshot at 24), the prompt + its reply + more (the end-of-sequence snapshot)
    cases = [(A, 37), (A + [5, 6, 7, 8, 9, 10], 37), (A[:27], 24), (A + reply + [9, 9], len(A) + len(reply) - 1)]
    for prompt, cached in cases:
        hit = on.generate([prompt], sp)[0]
        assert hit.num_cached_tokens == cached, (len(prompt), hit.num_cached_tokens)
        assert_same(result(hit), result(off.generate([prompt], sp)[0]))
        if prompt == A:  # the same chunks after the snapshot as the run that took it: bitwise equal
            assert_same(result(hit), result(cold), exact=True)
    prefix = on.engine.scheduler.prefix
    assert prefix.hits == 37 + 37 + 24 + cases[-1][1]
    assert_all_free(on)


def test_end_of_prompt_snapshot_only_when_worth_a_step(ckpt):
    """The prompt's last token gets a step of its own (for a snapshot before it) only when a resend would otherwise
    recompute interval / 8 tokens or more since the last kept state: a short addition to a cached prefix (a chat
    turn) computes its first token in one step."""
    kw = dict(block_size=BS, prefix_state_interval=64, max_num_batched_tokens=256, verbose=False)
    on, off = LLM(ckpt, **kw), LLM(ckpt, enable_prefix_caching=False, **kw)
    steps = []
    execute = on.engine.runner.execute
    on.engine.runner.execute = lambda batch, rows, *rest: steps.append([n for _, n in batch]) or execute(
        batch, rows, *rest)
    sp = SamplingParams(max_tokens=1, **GREEDY)
    x = list(range(10, 110))  # 100 tokens: 99 - 64 >= 64 / 8, so the prompt's end is kept
    on.generate([x], sp)
    assert steps == [[64], [35], [1]]  # the interval, the end of the prompt minus one token, the last token
    steps.clear()
    turn = x + [1, 2, 3, 4, 5]  # resumes at 100, where x's sequence ended; 104 - 100 < 64 / 8: one step
    got = on.generate([turn], sp)[0]
    assert got.num_cached_tokens == 100 and steps == [[5]]
    assert_same(result(got), result(off.generate([turn], sp)[0]))
    assert on.generate([turn], sp)[0].num_cached_tokens == 100  # so a resend recomputes those 5 tokens


def test_n_choices_fork_the_prompt_once(ckpt):
    on = LLM(ckpt, max_num_batched_tokens=16, **KW)
    off = LLM(ckpt, max_num_batched_tokens=16, enable_prefix_caching=False, **KW)
    computed = []
    execute = on.engine.runner.execute

    def counting(batch, rows, *rest):
        computed.append(sum(n for _, n in batch))
        return execute(batch, rows, *rest)

    on.engine.runner.execute = counting
    sp = SamplingParams(n=4, max_tokens=7, seed=21, **SEEDED)
    [group] = on.generate([A], sp)
    assert sum(computed) == len(A) + 4 * (7 - 1)  # the prompt once, then each choice's own tokens
    alone = off.generate([A] * 4, [SamplingParams(max_tokens=7, seed=21 + i, **SEEDED) for i in range(4)])
    for i, ref in enumerate(alone):
        assert_same(result(group, i), result(ref))
    assert len({tuple(c.token_ids) for c in group.outputs}) == 4
    # n > 1 from the cache: the group resumes from the end-of-prompt snapshot and forks the same way
    [again] = on.generate([A], sp)
    assert again.num_cached_tokens == len(A) - 1
    for i in range(4):
        assert_same(result(again, i), result(group, i), exact=True)
    [off_group] = off.generate([A], sp)  # the fork without a prefix cache
    for i in range(4):
        assert_same(result(off_group, i), result(group, i))
    assert_all_free(on)


def test_preemption_resumes_from_its_snapshot(ckpt):
    # 3 slots, 14 blocks of 4 tokens: too few for 3 sequences of 30 tokens, so sequences are preempted
    gib = budget_gib(3, 14, 6)
    on = LLM(ckpt, max_num_seqs=3, cpu_cache_gib=gib, max_num_batched_tokens=64, **KW)
    off = LLM(ckpt, max_num_seqs=3, cpu_cache_gib=gib, max_num_batched_tokens=64, enable_prefix_caching=False,
              **KW)
    assert on.engine.scheduler.cache.layout.num_blocks == 14 and on.engine.scheduler.prefix.num_snapshots == 6
    prompts = [list(range(20, 30)), list(range(50, 60)), list(range(80, 90))]
    for sampling in (GREEDY, SEEDED):
        sp = [SamplingParams(max_tokens=20, seed=i, **sampling) for i in range(3)]
        got, ref = on.generate(prompts, sp), off.generate(prompts, sp)
        assert on.engine.scheduler.num_preemptions > 0
        for a, b in zip(got, ref):
            assert_same(result(a), result(b))
    assert on.engine.scheduler.prefix.hits > 0  # a preempted sequence resumed from a snapshot
    assert_all_free(on)


def test_forked_group_under_preemption(ckpt):
    """A group of 2 and a single request in 3 slots and 14 blocks: choices are preempted (a forked choice recomputes
    from a snapshot of its own) and still equal the same requests with caching off; aborting a group before its
    fork ends all of its choices."""
    gib = budget_gib(3, 14, 6)
    kw = dict(max_num_seqs=3, cpu_cache_gib=gib, max_num_batched_tokens=64, **KW)
    on, off = LLM(ckpt, **kw), LLM(ckpt, enable_prefix_caching=False, **kw)
    prompts = [list(range(20, 31)), list(range(50, 59))]
    for sampling in (GREEDY, SEEDED):
        sp = [SamplingParams(max_tokens=20, seed=4, **sampling), SamplingParams(n=2, max_tokens=20, seed=5, **sampling)]
        got, ref = on.generate(prompts, sp), off.generate(prompts, sp)
        assert on.engine.scheduler.num_preemptions > 0
        for a, b in zip(got, ref):
            assert len(a.outputs) == len(b.outputs)
            for i in range(len(a.outputs)):
                assert_same(result(a, i), result(b, i))
    assert_all_free(on)
    eng = on.engine
    eng.add_request("g", A, SamplingParams(n=3, max_tokens=5))
    eng.step()  # the prompt's first chunk: not forked yet
    eng.abort_request("g")
    [out] = eng.step()
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert [c.index for c in out.outputs] == [0, 1, 2] and not eng.has_unfinished_requests()
    assert_all_free(on)


def test_full_cache_evicts_and_keeps_serving(ckpt):
    gib = budget_gib(2, 24, 3)  # 2 slots, 24 blocks, 3 snapshots
    on = LLM(ckpt, max_num_seqs=2, cpu_cache_gib=gib, max_num_batched_tokens=32, **KW)
    off = LLM(ckpt, max_num_seqs=2, cpu_cache_gib=gib, max_num_batched_tokens=32, enable_prefix_caching=False,
              **KW)
    prefix = on.engine.scheduler.prefix
    sp = SamplingParams(max_tokens=6, **GREEDY)
    first = on.generate([A], sp)[0]
    assert on.generate([A], sp)[0].num_cached_tokens == 37
    # many other prompts, more than blocks and snapshots hold: A's prefix is evicted
    others = [[(7 * i + j) % 250 for j in range(30 + i)] for i in range(8)]
    for got, ref in zip(on.generate(others, sp), off.generate(others, sp)):
        assert_same(result(got), result(ref))
    assert prefix.num_cached_snapshots <= 3
    again = on.generate([A], sp)[0]
    assert again.num_cached_tokens < 37  # evicted (in part or whole), recomputed
    assert_same(result(again), result(first))
    assert on.generate([A], sp)[0].num_cached_tokens == 37  # and cached again
    assert_all_free(on)


def test_multi_turn_chat_hit_counts(ckpt):
    """Each turn resends the whole history (prompt + reply + the next user message): it resumes where the
    previous turn ended (its last sampled token is the one not yet computed)."""
    on = LLM(ckpt, max_num_batched_tokens=32, **KW)
    off = LLM(ckpt, max_num_batched_tokens=32, enable_prefix_caching=False, **KW)
    history, expected = list(range(100, 130)), 0
    sp = SamplingParams(max_tokens=9, **GREEDY)
    for turn in range(5):
        got, ref = on.generate([history], sp)[0], off.generate([history], sp)[0]
        assert got.num_cached_tokens == expected, turn
        assert_same(result(got), result(ref))
        reply = got.outputs[0].token_ids
        expected = len(history) + len(reply) - 1
        history = history + reply + [200 + turn, 201, 202 + turn]
    prefix = on.engine.scheduler.prefix
    assert prefix.hits == sum((30 + 12 * t) + 9 - 1 for t in range(4))  # turn t's history is 30 + 12 t tokens


def test_rl_groups_prefill_each_prompt_once(ckpt):
    from ringlinear.hf import load_model
    from ringlinear.rl.rollout import RolloutWorker, partition

    model = load_model(ckpt)
    worker = RolloutWorker(model, byte_level_tokenizer(), "cpu", max_num_seqs=8, max_num_batched_tokens=512,
                           cpu_cache_gib=0.25)  # room for the groups' end-of-sequence snapshots and the prompts'
    assert worker.llm.engine.scheduler.prefix.num_snapshots >= 2 + 8
    engine = worker.llm.engine
    computed = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch, rows, *rest: computed.append(sum(n for _, n in batch)) or execute(
        batch, rows, *rest)
    # prompts of over prefix_state_interval / 8 = 1024 tokens: their end-of-prompt snapshots are kept
    samples = [{"prompt": "Add 2 and 3, then think it over. " * 40}, {"prompt": "What is the capital of Peru? " * 40}]
    prompt_lens = [len(engine.encode(s["prompt"])) for s in samples]
    packs = partition(2 * 4, 1, 0)
    batch = worker.rollout(samples, 4, lambda p, c, s: 0.0, packs, max_tokens=5, seed=7, score=False)
    generated = sum(len(c) for c in batch.completion_ids)
    assert sum(computed) == sum(prompt_lens) + generated - batch.num_seqs  # each prompt computed once
    assert all(len(c) == 5 for c in batch.completion_ids) and batch.prompt_ids[3] == batch.prompt_ids[0]
    # the next step's groups of the same prompts resume from the cache: one token each is computed
    computed.clear()
    again = worker.rollout(samples, 4, lambda p, c, s: 0.0, packs, max_tokens=5, seed=7, score=False)
    assert sum(computed) == len(samples) + generated - batch.num_seqs
    assert again.completion_ids == batch.completion_ids
    for a, b in zip(again.sampling_logprobs, batch.sampling_logprobs):  # batched differently: fp32 rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # new weights: the cache is forgotten, the prompts computed again
    worker.load_weights(init_model(preset("tiny"), seed=2))
    computed.clear()
    worker.rollout(samples, 4, lambda p, c, s: 0.0, packs, max_tokens=5, seed=7, score=False)
    assert sum(computed) == sum(prompt_lens) + generated - batch.num_seqs


def test_trie_bookkeeping():
    """Blocks enter the trie under snapshots; a match needs every block below its snapshot; taking a block for new
    contents drops its node, the nodes below it and their snapshots; snapshots are evicted least recently used."""
    cfg = preset("tiny")
    kv, state = cache_bytes(cfg, torch.float32)
    layout = plan_layout(cfg, budget_bytes(1, 10, 2), BS, 1, torch.float32, INTERVAL)
    assert (layout.num_slots, layout.num_blocks, layout.num_snapshots) == (1, 10, 2)
    cache = HybridCache(cfg, layout, "cpu", torch.float32)
    cache.set_max_model_len(64)
    prefix = cache.prefix = PrefixCache(cache, INTERVAL)
    tokens = list(range(1, 20))

    def run(toks, computed):
        seq = Sequence("s", toks, SamplingParams())
        cache.grow(seq, computed)
        seq.num_computed = computed
        return seq

    seq = run(tokens, 10)
    cache.state_pool[:, seq.slot].normal_()
    for kv_ in cache.kv.values():
        kv_[:, seq.block_table].normal_()
    prefix.take([seq])  # snapshot at 10 tokens: blocks [0, 4) and [4, 8) enter the trie, tokens 8, 9 are its tail
    assert prefix.match(tokens, 18).length == 10 and prefix.match(tokens, 9) is None
    assert prefix.match(tokens[:9] + [99] * 5, 13) is None  # differs inside the tail
    m = prefix.match(tokens, 18)
    assert m.blocks == seq.block_table[:2]
    state = cache.state_pool[:, seq.slot].clone()
    partial = {i: kv_[:, seq.block_table[2]].clone() for i, kv_ in cache.kv.items()}
    cache.release(seq)
    assert len(cache.free_blocks) == 10  # free, yet still indexed
    other = Sequence("t", tokens, SamplingParams())
    cache.grow(other, 12, prefix.match(tokens, 18))
    assert other.num_computed == 10 and other.block_table[:2] == m.blocks and cache.ref[m.blocks[0]] == 1
    assert torch.equal(cache.state_pool[:, other.slot], state)
    for i, kv_ in cache.kv.items():
        assert torch.equal(kv_[:, other.block_table[2], :2], partial[i][:, :2])
    cache.release(other)
    # the blocks are taken for new contents, least recently freed first: the trie forgets them
    taker = run([0] * 40, 40)
    assert prefix.match(tokens, 18) is None and prefix.num_cached_snapshots == 0
    cache.release(taker)
    # LRU over 2 snapshots: a third evicts the least recently used
    seqs = []
    for k in range(3):
        s = run([k * 3 + 1] * 12, 8)
        prefix.take([s])
        seqs.append(s)
        cache.release(s)
        if k == 1:  # a request resumes from the first snapshot: it becomes the most recently used
            user = Sequence("u", [1] * 12, SamplingParams())
            cache.grow(user, 3, prefix.match([1] * 12, 11))
            assert user.num_computed == 8
            cache.release(user)
    assert prefix.num_cached_snapshots == 2
    assert prefix.match([1] * 12, 11) is not None and prefix.match([4] * 12, 11) is None
    assert prefix.match([7] * 12, 11) is not None
    prefix.reset()
    assert prefix.match([7] * 12, 11) is None and prefix.num_cached_snapshots == 0


def test_config_and_flag(ckpt):
    args = build_parser().parse_args(["serve", "--model", ckpt, "--no-enable-prefix-caching",
                                      "--prefix-state-interval", "64"])
    assert args.enable_prefix_caching is False and args.prefix_state_interval == 64
    assert build_parser().parse_args(["serve", "--model", ckpt]).__dict__.get("enable_prefix_caching") in (None, True)
    with pytest.raises(ValueError, match="prefix_state_interval"):
        EngineConfig(model=ckpt, block_size=16, prefix_state_interval=20).validate()
    off = LLM(ckpt, enable_prefix_caching=False, **KW)
    assert off.engine.scheduler.prefix is None and off.engine.scheduler.cache.layout.num_snapshots == 0
