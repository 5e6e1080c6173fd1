"""Aligned numerics on CUDA (compiled Triton kernels, bf16 `small` model, decode under CUDA graphs): the logprobs of
the same sampled tokens are bitwise equal at batch 1 and batch 8, equal to the prompt logprobs of a prefill of the
same tokens, the same as eager decode, and equal to the trainer's packed forward under the same switches. Run on the device:
`python -m pytest -q -m gpu tests/rl/test_aligned_sampler_gpu.py`."""

import copy

import pytest
import torch

from ringlinear.config import preset
from ringlinear.engine.llm import LLM
from ringlinear.engine.sequence import SamplingParams
from ringlinear.model import init_model
from ringlinear.ops.batch_invariant import aligned_numerics
from ringlinear.rl.scoring import completion_logprobs, pack_completions

pytestmark = pytest.mark.gpu


def _lp(choice):
    return torch.tensor([lp[t].logprob for t, lp in zip(choice.token_ids, choice.logprobs)], dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_aligned_engine_under_cuda_graphs_is_batch_invariant_and_equals_trainer():
    model = init_model(preset("small"), seed=0, device="cuda", dtype="bfloat16").eval()
    llm = LLM(live_model=copy.deepcopy(model), device="cuda", max_num_seqs=8, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3, aligned_numerics="all", verbose=False)
    assert llm.engine.runner.graphs is not None  # decode replays CUDA graphs
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 2000, (n,), generator=g).tolist() for n in (3, 17, 40, 64, 100, 130, 200, 300)]
    params = [SamplingParams(temperature=1.0, max_tokens=48, logprobs=0, seed=i, ignore_eos=True) for i in range(8)]
    batch = [o.outputs[0] for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], [sp])[0].outputs[0] for p, sp in zip(prompts, params)]
    for a, b in zip(alone, batch):
        assert a.token_ids == b.token_ids
        assert torch.equal(_lp(a), _lp(b))  # batch 1 == batch 8, bitwise
    p, c = prompts[5], batch[5].token_ids
    out = llm.generate([p + c], [SamplingParams(max_tokens=1, prompt_logprobs=0)])[0]
    pre = torch.tensor([out.prompt_logprobs[len(p) + j][t].logprob for j, t in enumerate(c)], dtype=torch.float64)
    assert torch.equal(pre, _lp(batch[5]))  # prefill == decode
    eager = LLM(live_model=copy.deepcopy(model), device="cuda", max_num_seqs=8, max_num_batched_tokens=128,
                gpu_memory_utilization=0.3, aligned_numerics="all", verbose=False, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    for a, b in zip(eager.generate(prompts, params), batch):  # CUDA graphs vs eager
        assert a.outputs[0].token_ids == b.token_ids and torch.equal(_lp(a.outputs[0]), _lp(b))
    with aligned_numerics("all"), torch.no_grad():
        for mb in ([0, 1, 2], [3, 4, 5, 6, 7]):
            lp = completion_logprobs(model, pack_completions([prompts[i] for i in mb],
                                                             [batch[i].token_ids for i in mb], "cuda"))
            want = torch.cat([_lp(batch[i]) for i in mb])
            assert torch.equal(lp.double().cpu(), want)  # sampler == trainer forward
