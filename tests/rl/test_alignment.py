"""Aligned mode on the CPU with a tiny random model: the engine's scoring logprobs equal the trainer's
(differentiable) forward bit for bit on a ragged batch whose prompts were prefilled in several chunks, the
in-memory weight sync keeps it so after an update, and one RL step moves the policy the expected way."""

import copy

import pytest
import torch

from ringlinear.config import preset
from ringlinear.model import init_model
from ringlinear.rl.policy import PolicyTrainer
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import RolloutWorker, partition
from ringlinear.rl.scoring import completion_logprobs, pack_completions
from ringlinear.tokenizer import byte_level_tokenizer

CHUNK = 24  # engine token budget per step: the long prompts below are prefilled in 2-4 chunks
SAMPLES = [
    {"prompt": "7+5=", "answer": "12"},
    {"prompt": "9:1 " * 10 + "? 9:", "answer": "1"},  # 44 tokens
    {"prompt": "x" * 70 + "3-4=", "answer": "-1"},  # 74 tokens
    {"prompt": "hello, 1+1=", "answer": "2"},
]
GROUP = 2


def first_digit_reward(prompt, completion, sample):  # mixed rewards on a random model's byte soup
    return float(any(c in "02468acegikmoqsuwy" for c in completion[:1]))


@pytest.fixture
def setup():
    tok = byte_level_tokenizer()
    cfg = preset("tiny").replace(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
    policy = init_model(cfg, seed=0)
    worker = RolloutWorker(copy.deepcopy(policy), tok, "cpu", max_num_seqs=8, max_num_batched_tokens=CHUNK,
                           cpu_cache_gib=0.05)
    return policy, worker


def rl_config(**kw):
    base = dict(prompts_per_step=len(SAMPLES), group_size=GROUP, max_tokens=7, lr=1e-3, progress=False, out_dir=None)
    return RLConfig(**{**base, **kw})


def rollout(worker, packs, seed=0):
    return worker.rollout(SAMPLES, GROUP, first_digit_reward, packs, max_tokens=7, seed=seed)


def test_aligned_scoring_equals_trainer_forward_exactly(setup):
    policy, worker = setup
    assert worker.model is not policy
    assert max(len(s["prompt"]) for s in SAMPLES) > CHUNK  # prefill crossed chunk boundaries
    packs = partition(len(SAMPLES) * GROUP, 1, 3)  # ragged packs of 3, 3, 2 sequences
    batch = rollout(worker, packs)
    lens = [len(c) for c in batch.completion_ids]
    assert min(lens) >= 1 and all(len(s) == n for s, n in zip(batch.scoring_logprobs, lens))
    policy.train()
    for mb in packs[0]:
        packed = pack_completions([batch.prompt_ids[i] for i in mb], [batch.completion_ids[i] for i in mb], "cpu")
        logp = completion_logprobs(policy, packed)  # with grad, train mode, the trainer's module
        assert logp.requires_grad
        rollout_lp = torch.cat([batch.scoring_logprobs[i] for i in mb])
        assert torch.equal(logp.detach(), rollout_lp)  # bit-identical, not merely close
        # the sampler's own logprobs (chunked prefill + decode steps) differ by rounding only
        sampled = torch.cat([batch.sampling_logprobs[i] for i in mb])
        assert (logp.detach() - sampled).abs().max() < 1e-4


def test_rl_step_reports_zero_mismatch_and_sync_keeps_it(setup):
    policy, worker = setup
    cfg = rl_config(micro_batch_seqs=3)
    trainer = PolicyTrainer(policy, cfg)
    packs = partition(cfg.prompts_per_step * GROUP, 1, 3)
    batch = rollout(worker, packs)
    assert 0 < batch.rewards.mean() < 1
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    m = trainer.update(batch)
    assert m["mismatch/max_abs_logp_diff"] == 0.0 and m["mismatch/kl"] == 0.0 and m["clip_frac"] == 0.0
    assert m["mismatch/mean_abs_p_diff"] == 0.0
    assert 0.0 <= m["sampling/max_abs_logp_diff"] < 1e-4  # logged, never forced to zero
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # in-memory sync: the engine's copy becomes the trainer's weights exactly, and the next step is aligned too
    assert any(not torch.equal(v, worker.model.state_dict()[k]) for k, v in policy.state_dict().items())
    worker.load_weights(policy)
    assert all(torch.equal(v, worker.model.state_dict()[k]) for k, v in policy.state_dict().items())
    m2 = trainer.update(rollout(worker, packs, seed=100))
    assert m2["mismatch/max_abs_logp_diff"] == 0.0


def test_one_step_moves_logprobs_towards_advantage(setup):
    policy, worker = setup
    cfg = rl_config(lr=3e-4)
    trainer = PolicyTrainer(policy, cfg)
    packs = partition(cfg.prompts_per_step * GROUP, 1, 0)
    batch = rollout(worker, packs)
    from ringlinear.rl.losses import group_advantages

    adv = group_advantages(batch.rewards, GROUP)
    assert (adv > 0).any() and (adv < 0).any()
    old = trainer.recompute(batch)
    trainer.update(batch)
    new = trainer.recompute(batch)
    delta = torch.stack([(n - o).sum() for n, o in zip(new, old)])  # change of log p(completion)
    assert (adv * delta).sum() > 0  # the PPO surrogate (token-mean of A * ratio) went up
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_off_mode_uses_sampler_logprobs_and_importance_weights(setup):
    policy, worker = setup
    cfg = rl_config(aligned=False, tis_mode="mask", tis_cap=1.5)
    assert cfg.scoring_backends == ("torch", None)
    trainer = PolicyTrainer(policy, cfg)
    assert trainer.loss_cfg.tis_cap == 1.5 and trainer.loss_cfg.tis_mode == "mask"
    batch = rollout(worker, partition(cfg.prompts_per_step * GROUP, 1, 0))
    m = trainer.update(batch)
    # PPO's rollout logprobs are now the sampler's: the gap it sees is the decode-path one
    assert m["mismatch/max_abs_logp_diff"] == m["sampling/max_abs_logp_diff"]
    assert "scoring/max_abs_logp_diff" in m and "tis_mask_frac" in m
    with pytest.raises(ValueError, match="aligned mode"):
        rl_config(trainer_backend="torch", engine_backend="triton")
