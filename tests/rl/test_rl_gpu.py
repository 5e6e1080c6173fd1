"""Aligned mode on CUDA (Triton Lightning kernels, bf16 and fp32): the engine's scoring logprobs equal the
trainer's differentiable forward bit for bit on ragged batches whose prompts were prefilled in several chunks;
the trainer on the PyTorch reference path does not. Run on the device: `python -m pytest -q -m gpu tests/rl`."""

import copy

import pytest
import torch

from ringlinear.config import preset
from ringlinear.model import init_model
from ringlinear.rl.policy import PolicyTrainer
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import RolloutWorker, partition
from ringlinear.rl.tasks import RetrievalTask
from ringlinear.tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_aligned_zero_on_cuda_off_mode_not(dtype):
    tok = byte_level_tokenizer()
    mcfg = preset("small").replace(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
    task = RetrievalTask(num_pairs=40, seed=0)  # ~290-token prompts
    samples = [task.sample() for _ in range(3)] + [{"prompt": "1+2=", "answer": "3"}]
    group = 4
    cfg = RLConfig(prompts_per_step=len(samples), group_size=group, max_tokens=12, micro_batch_seqs=5, lr=1e-4,
                   compute_dtype=dtype, progress=False, out_dir=None)
    policy = init_model(mcfg, seed=0, device="cuda", dtype="float32")
    trainer = PolicyTrainer(policy, cfg, torch.bfloat16 if dtype == "bf16" else torch.float32)
    worker = RolloutWorker(copy.deepcopy(trainer.model), tok, "cuda", max_num_seqs=16, max_num_batched_tokens=128)
    packs = partition(len(samples) * group, 1, 5)  # ragged packs 5, 5, 5, 1
    reward = lambda p, c, s: float(len(c) % 2)
    batch = worker.rollout(samples, group, reward, packs, max_tokens=12, seed=0)
    assert max(len(p) for p in batch.prompt_ids) > 128  # chunked prefill
    off = torch.cat(trainer.recompute(batch, backend="torch"))
    m = trainer.update(batch)
    print(f"\n{dtype}: sampling gap max {m['sampling/max_abs_logp_diff']:.3e} mean |dp| "
          f"{m['sampling/mean_abs_p_diff']:.3e}; reference path vs engine scoring max "
          f"{(off.cpu() - torch.cat(batch.scoring_logprobs)).abs().max():.3e}")
    assert m["mismatch/max_abs_logp_diff"] == 0.0 and m["mismatch/kl"] == 0.0
    assert (off.cpu() - torch.cat(batch.scoring_logprobs)).abs().max() > 0  # different kernels, different rounding
    worker.load_weights(trainer.model)
    m2 = trainer.update(worker.rollout(samples, group, reward, packs, max_tokens=12, seed=99))
    assert m2["mismatch/max_abs_logp_diff"] == 0.0
