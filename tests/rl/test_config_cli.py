"""RLConfig validation, the reward-callable interface and `ringlinear rl --config FILE` end to end (2 steps)."""

import json

import pytest

from ringlinear.cli import main
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import partition
from ringlinear.rl.tasks import load_reward


def test_config_refuses_unknown_and_bad_fields(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        RLConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="group_size"):
        RLConfig(group_size=1)
    with pytest.raises(ValueError, match="minibatches"):
        RLConfig(prompts_per_step=3, group_size=2, minibatches=4)
    with pytest.raises(ValueError, match="normalization"):
        RLConfig(normalization="batch")
    path = tmp_path / "rl.json"
    path.write_text(json.dumps({"task": "retrieval", "betas": [0.9, 0.95], "aligned": False}))
    cfg = RLConfig.from_json(str(path))
    assert cfg.betas == (0.9, 0.95) and cfg.scoring_backends == ("torch", None)


def test_partition_is_fixed_and_covers_every_sequence():
    packs = partition(8, 2, 3)
    assert packs == [[[0, 1, 2], [3]], [[4, 5, 6], [7]]]
    assert partition(4, 1, 0) == [[[0, 1, 2, 3]]]


def test_cli_runs_with_a_user_reward(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_reward.py").write_text(
        "def reward(prompt, completion, sample):\n    return float(len(completion) % 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_reward:reward")("1+1=", "ab", {"answer": "2"}) == 0.0
    with pytest.raises(ValueError, match="no callable"):
        load_reward("my_reward:missing")
    cfg = {"model": "tiny", "task": "arithmetic", "task_kwargs": {"max_operand": 9}, "reward": "my_reward:reward",
           "steps": 2, "prompts_per_step": 2, "group_size": 2, "max_tokens": 3, "sft_warmup_steps": 2, "sft_batch": 4,
           "eval_every": 1, "eval_prompts": 2, "progress": False, "engine_cpu_cache_gib": 0.05}
    (tmp_path / "rl.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["rl", "--config", str(tmp_path / "rl.json"), "--out", str(out), "--set", "lr=0.001"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in hist["steps"]] == [1, 2] and len(hist["sft_losses"]) == 2
    assert [e["step"] for e in hist["evals"]] == [0, 1, 2]
    assert all(h["mismatch/max_abs_logp_diff"] == 0.0 for h in hist["steps"])
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    assert (out / "reward.png").stat().st_size > 0
    assert "reward_mean" in capsys.readouterr().out


def test_eval_prompts_are_distinct_held_out_samples():
    from ringlinear.rl.loop import RLRun
    from ringlinear.rl.rl_config import RLConfig

    run = RLRun(RLConfig.from_dict({"model": "tiny", "task": "arithmetic", "task_kwargs": {"max_operand": 30},
                                    "steps": 1, "prompts_per_step": 2, "group_size": 2, "sft_warmup_steps": 0,
                                    "eval_every": 1, "eval_prompts": 16, "progress": False, "out_dir": None,
                                    "engine_cpu_cache_gib": 0.05}))
    prompts = [s["prompt"] for s in run.eval_samples]
    assert len(set(prompts)) >= 12  # 16 draws from ~1900 problems
    train = {run.task.sample()["prompt"] for _ in range(16)}
    assert train != set(prompts)  # a different stream from the training prompts
