"""The engine on CUDA (Triton Lightning kernels, paged KV) against the model's own greedy generation with the
PyTorch reference ops, fp32 and bf16. Run on the device: `python -m pytest -q -m gpu tests/engine`."""

import gc

import pytest
import torch

from ringlinear.config import preset
from ringlinear.engine.llm import LLM
from ringlinear.engine.sequence import SamplingParams
from ringlinear.hf import save_model
from ringlinear.model import init_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_cuda_matches_reference(tmp_path, monkeypatch, dtype):
    cfg = preset("small")
    model = init_model(cfg, seed=3)
    save_model(model, str(tmp_path))
    model = model.to("cuda", getattr(torch, dtype)).eval()
    prompts = [list(range(5, 300)), [11, 12, 13], list(range(900, 1000))]
    llm = LLM(str(tmp_path), device="cuda", gpu_memory_utilization=0.3,
              dtype=dtype, max_num_batched_tokens=128, verbose=False)
    outs = [o.outputs[0] for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16,
                                                                        ignore_eos=True, logprobs=0))]
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    worst = 0.0
    for p, out in zip(prompts, outs):
        ids = torch.tensor(p + out.token_ids, device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(model(ids), -1)
        n = len(p)
        ref = logp[n - 1 : n - 1 + len(out.token_ids)].gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])
        got = torch.tensor([lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)])
        worst = max(worst, (ref[:, 0].cpu() - got).abs().max().item())
        # each chosen token is the reference's argmax up to the rounding gap
        top = logp[n - 1 : n - 1 + len(out.token_ids)].max(-1).values
        assert ((top - ref[:, 0]) <= (1e-3 if dtype == "float32" else 0.15)).all()
    assert worst < (1e-3 if dtype == "float32" else 0.15), worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(tmp_path):
    cfg = preset("small")
    save_model(init_model(cfg, seed=4), str(tmp_path))
    prompts = [list(range(5, 40)), [11, 12, 13], list(range(900, 1000)), [7] * 17, [1, 2]]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    graphed = LLM(str(tmp_path), device="cuda", dtype="bfloat16", max_num_seqs=8, gpu_memory_utilization=0.3,
                  verbose=False)
    assert graphed.engine.runner.graphs is not None  # on by default on CUDA
    with_graphs = graphed.generate(prompts, sp)
    del graphed  # one engine at a time: each sizes its cache from the free memory
    gc.collect()
    torch.cuda.empty_cache()
    eager = LLM(str(tmp_path), device="cuda", dtype="bfloat16", max_num_seqs=8, enforce_eager=True,
                gpu_memory_utilization=0.3, verbose=False)
    assert eager.engine.runner.graphs is None
    for a, b in zip(with_graphs, eager.generate(prompts, sp)):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        assert max(abs(x[s].logprob - y[s].logprob) for s, x, y in zip(a.token_ids, a.logprobs, b.logprobs)) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefix_cache_and_fork_on_cuda(tmp_path):
    """bf16 under CUDA graphs: a prompt sent again resumes from its end-of-prompt snapshot (mid-block) and gives the
    same tokens and logprobs, bitwise (the same kernels on the same cache contents); a group of n = 4 forks the
    prompt, and sent again resumes from the cache and forks into the same choices."""
    cfg = preset("small")
    save_model(init_model(cfg, seed=5), str(tmp_path))
    # interval 64: the prompt's end is kept (298 - 256 >= 64 / 8 tokens since the last multiple)
    llm = LLM(str(tmp_path), device="cuda", gpu_memory_utilization=0.3,
              dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=64,
              prefix_state_interval=64, verbose=False)
    assert llm.engine.runner.graphs is not None and llm.engine.scheduler.prefix is not None
    prompt = list(range(7, 306))  # 299 tokens: chunked, its snapshot at 298 lies mid-block
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    cold, hit = llm.generate([prompt], sp)[0], llm.generate([prompt], sp)[0]
    assert cold.num_cached_tokens == 0 and hit.num_cached_tokens == len(prompt) - 1
    a, b = cold.outputs[0], hit.outputs[0]
    assert a.token_ids == b.token_ids and [x[t].logprob for t, x in zip(a.token_ids, a.logprobs)] == \
        [y[t].logprob for t, y in zip(b.token_ids, b.logprobs)]
    seeded = dict(temperature=1.0, top_k=50, max_tokens=12, ignore_eos=True, logprobs=0)
    [group] = llm.generate([prompt], SamplingParams(n=4, seed=9, **seeded))
    [again] = llm.generate([prompt], SamplingParams(n=4, seed=9, **seeded))
    assert again.num_cached_tokens == len(prompt) - 1 and len({tuple(c.token_ids) for c in group.outputs}) > 1
    for c, d in zip(group.outputs, again.outputs):
        assert c.token_ids == d.token_ids and c.cumulative_logprob == d.cumulative_logprob


def _near_bigram_small(seed: int, scale: float):
    """The small preset with an MTP that knows the bigram part of the target (test_spec_decode.near_bigram): drafts
    right often, so verify steps accept and reject."""
    from test_spec_decode import near_bigram  # the tests' folder is on sys.path (pytest's rootdir-relative import)

    return near_bigram(scale, seed, "small")


def _same_up_to_near_ties(spec, ref, gap: float) -> None:
    """Token for token, except that the first difference of a choice may fall where the reference's two best tokens
    are within `gap` in logprob (a near-tie that rounding can flip; the continuations then differ)."""
    for a, b in zip(spec, ref):
        a, b = a.outputs[0], b.outputs[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                top = sorted((lp.logprob for lp in b.logprobs[i].values()), reverse=True)
                assert top[0] - top[1] < gap, (i, x, y, top)
                break


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spec_decode_greedy_equals_graphed_plain_decoding(tmp_path, dtype):
    """Speculative decoding on CUDA (Triton lightning_verify / lightning_commit, paged KV of the MTP layer; in bf16
    its verify-only steps replay CUDA graphs) gives the tokens of plain greedy decoding under CUDA graphs, k = 1 and 3,
    and the same tokens with graphs as eagerly (enforce_eager)."""
    save_model(_near_bigram_small(6, 0.03), str(tmp_path))
    prompts = [list(range(5, 300)), [11, 12, 13], list(range(900, 1000)), [7] * 17, [1, 2]]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    plain = LLM(str(tmp_path), device="cuda", gpu_memory_utilization=0.3,
                dtype=dtype, max_num_seqs=8, max_num_batched_tokens=256,
                verbose=False)
    assert dtype == "float32" or plain.engine.runner.graphs is not None
    ref = plain.generate(prompts, sp)
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    gap = 1e-3 if dtype == "float32" else 0.1
    for k in (1, 3):
        outs = {}
        for eager in (False, True):
            llm = LLM(str(tmp_path), device="cuda", gpu_memory_utilization=0.3,
                      dtype=dtype, max_num_seqs=8, max_num_batched_tokens=256,
                      num_speculative_tokens=k, enforce_eager=eager, verbose=False)
            # MoE in fp32 runs a host-sized expert loop: no graphs there (as for plain decoding)
            assert (llm.engine.runner.verify_graphs is not None) == (dtype == "bfloat16" and not eager)
            outs[eager] = llm.generate(prompts, sp)
            _same_up_to_near_ties(outs[eager], ref, gap)
            st = llm.engine.spec_stats
            assert st.verify_steps > 0 and 0 < st.accepted_tokens <= st.draft_tokens
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        # graphs replay the eager kernels (the logits GEMM may differ in its row count: rounding)
        _same_up_to_near_ties(outs[False], outs[True], gap)
