import pytest
import torch

from ringlinear.rl.losses import PolicyLossConfig, group_advantages, mismatch_metrics, policy_loss
from ringlinear.rl.tasks import ArithmeticTask, RetrievalTask


def test_group_advantages_normalise_within_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(a[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 4)


def _inputs():
    torch.manual_seed(0)
    logp_old = -torch.rand(10)
    seq = torch.tensor([0] * 4 + [1] * 6)
    adv = torch.tensor([1.0] * 4 + [-1.0] * 6)
    mask = torch.ones(10)
    return logp_old, seq, adv, mask


def test_on_policy_gradient_is_vanilla_policy_gradient():
    logp_old, seq, adv, mask = _inputs()
    logp = logp_old.clone().requires_grad_()
    loss, m = policy_loss(logp, logp_old, adv, mask, seq, 2, PolicyLossConfig())
    loss.backward()
    assert m["clip_frac"] == 0.0
    assert torch.allclose(logp.grad, -adv / 10)  # ratio 1: d/dlogp of -(r A) = -A, token mean


def test_clipping_stops_gradient_beyond_trust_region():
    logp_old, seq, adv, mask = _inputs()
    logp = (logp_old + 0.5).requires_grad_()  # ratio e^0.5 > 1.2 for every token
    loss, m = policy_loss(logp, logp_old, adv, mask, seq, 2, PolicyLossConfig())
    loss.backward()
    assert torch.equal(logp.grad[:4], torch.zeros(4))  # positive advantage, clipped
    assert (logp.grad[4:] > 0).all()  # negative advantage keeps pushing down
    assert m["clip_frac"] == pytest.approx(0.4)


def test_sequence_normalisation_weights_sequences_equally():
    logp_old, seq, adv, mask = _inputs()
    logp = logp_old.clone().requires_grad_()
    policy_loss(logp, logp_old, adv, mask, seq, 2, PolicyLossConfig(normalization="sequence"))[0].backward()
    assert torch.allclose(logp.grad[:4], torch.full((4,), -1 / 8)) and torch.allclose(logp.grad[4:], torch.full((6,), 1 / 12))


def test_kl_needs_reference_and_is_zero_on_reference():
    logp_old, seq, adv, mask = _inputs()
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(logp_old.clone(), logp_old, adv, mask, seq, 2, PolicyLossConfig(kl_coef=0.1))
    _, m = policy_loss(logp_old.clone(), logp_old, adv, mask, seq, 2, PolicyLossConfig(kl_coef=0.1), logp_ref=logp_old)
    assert m["kl_ref"] == pytest.approx(0.0, abs=1e-7)


def test_mismatch_metrics():
    a = torch.log(torch.tensor([0.5, 0.25, 0.9]))
    assert mismatch_metrics(a, a.clone(), torch.ones(3)) == {
        "mean_abs_logp_diff": 0.0, "max_abs_logp_diff": 0.0, "mean_abs_p_diff": 0.0, "kl": 0.0}
    b = torch.log(torch.tensor([0.4, 0.25, 0.9]))
    m = mismatch_metrics(a, b, torch.tensor([1, 1, 0]))
    assert m["mean_abs_p_diff"] == pytest.approx(0.05) and m["max_abs_logp_diff"] == pytest.approx(abs(a[0] - b[0]).item())


def test_tasks_reward_their_own_answers():
    for task in (ArithmeticTask(seed=1), RetrievalTask(num_pairs=8, seed=2)):
        for _ in range(20):
            s = task.sample()
            assert task.reward(s["prompt"], f" {s['answer']} and more", s) == 1.0
            assert task.reward(s["prompt"], "no number", s) == 0.0
            assert task.reward(s["prompt"], f"{s['answer']}0", s) == 0.0
    s = ArithmeticTask(seed=3).sample()
    assert eval(s["prompt"][:-1]) == int(s["answer"])


def test_truncated_and_masked_importance_sampling():
    logp_old, seq, adv, mask = _inputs()
    logp_rollout = logp_old.clone()
    logp_rollout[0] -= 2.0  # p_old / p_rollout = e^2 on token 0
    logp_rollout[5] += 2.0  # e^-2 on token 5
    grads = {}
    for mode in ("truncate", "mask"):
        logp = logp_old.clone().requires_grad_()
        cfg = PolicyLossConfig(tis_cap=2.0, tis_mode=mode)
        policy_loss(logp, logp_old, adv, mask, seq, 2, cfg, logp_rollout=logp_rollout)[0].backward()
        grads[mode] = logp.grad
    plain = -adv / 10
    assert torch.allclose(grads["truncate"][0], plain[0] * 2.0)  # capped at 2
    assert torch.allclose(grads["truncate"][5], plain[5] * torch.exp(torch.tensor(-2.0)))
    assert grads["mask"][0] == 0 and grads["mask"][5] == 0  # outside [1/2, 2]: dropped
    others = [i for i in range(10) if i not in (0, 5)]
    assert torch.allclose(grads["mask"][others], plain[others]) and torch.allclose(grads["truncate"][others], plain[others])
    _, m = policy_loss(logp_old.clone(), logp_old, adv, mask, seq, 2, PolicyLossConfig(tis_cap=2.0, tis_mode="mask"),
                       logp_rollout=logp_rollout)
    assert m["tis_mask_frac"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="tis_mode"):
        PolicyLossConfig(tis_mode="clip")


def test_kl_term_pulls_towards_reference():
    logp_old, seq, adv, mask = _inputs()
    logp = logp_old.clone().requires_grad_()
    ref = logp_old + 0.3  # reference gives more mass: the KL gradient raises logp
    policy_loss(logp, logp_old, torch.zeros(10), mask, seq, 2, PolicyLossConfig(kl_coef=1.0), logp_ref=ref)[0].backward()
    assert (logp.grad < 0).all()  # descent raises logp
