import json

import pytest

from ringlinear.cli import main


def _args(tmp_path, *extra):
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_text(("alpha beta gamma delta. " * 40 + "\n\n\n") * 6)
    return ["study", "ratio", "--corpus", str(corpus), "--out", str(tmp_path / "s"), "--group-sizes", "1,0",
            "--widths", "64", "--layers", "2", "--steps", "2", "--batch", "2", "--seq-len", "64",
            "--recall-pairs", "4,8", "--recall-queries", "4", *extra]


def test_ratio_study_runs_resumes_and_plots(tmp_path, capsys):
    args = _args(tmp_path, "--save-every", "1")
    assert main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "s").glob("run-*.json"))
    assert runs == ["run-w64-g0.json", "run-w64-g1.json"]
    assert not list((tmp_path / "s").glob("ckpt-*"))  # mid-run checkpoints are removed once a run is saved
    r = json.loads((tmp_path / "s" / "run-w64-g0.json").read_text())
    assert r["layer_types"] == ["linear", "linear"] and set(r["recall"]) == {"16", "24"}
    assert r["lm_loss"] > 0 and r["text_loss"] > 0 and r["setup"]["steps"] == 2
    assert (tmp_path / "s" / "ratio_study.png").exists()
    # a second call finds every run done and only re-reports
    p = tmp_path / "s" / "run-w64-g1.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "lm_loss": 123.0}))
    capsys.readouterr()
    assert main(args) == 0
    assert "123.000" in capsys.readouterr().out
    # other settings never mix with the saved runs
    assert main(_args(tmp_path, "--lr", "0.01")) == 2
    assert "differing: ['lr']" in capsys.readouterr().err
    # the corpus counts by content: a moved copy resumes, another text does not
    assert r["setup"]["corpus"].startswith("sha256:")
    moved = tmp_path / "elsewhere.txt"
    moved.write_bytes((tmp_path / "c.txt").read_bytes())
    args[args.index("--corpus") + 1] = str(moved)
    assert main(args) == 0 and "123.000" in capsys.readouterr().out
    moved.write_text("other text. " * 500)
    assert main(args) == 2
    assert "differing: ['corpus']" in capsys.readouterr().err


def test_recall_eval_pairs_are_measured_but_not_trained(tmp_path, capsys, monkeypatch):
    from ringlinear.study.ratio import build_dataset
    from ringlinear.study.recall import RecallTask
    from ringlinear.study.study_config import StudyConfig

    assert main(_args(tmp_path, "--group-sizes", "0", "--recall-eval-pairs", "12,8")) == 0
    r = json.loads((tmp_path / "s" / "run-w64-g0.json").read_text())
    assert list(r["recall"]) == ["16", "24", "32"]  # 2P + 2Q for P = 4, 8 (trained) and 12 (eval only)
    out = capsys.readouterr().out
    assert "rec@  32*" in out and "rec@  24 " in out and "no training sequence had" in out
    # the training data holds only the trained pair counts
    seen = []
    sample = RecallTask.sample
    monkeypatch.setattr(RecallTask, "sample", lambda self, p, q, gen: seen.append(p) or sample(self, p, q, gen))
    build_dataset(StudyConfig(corpus=str(tmp_path / "c.txt"), recall_pairs=[4, 8], recall_eval_pairs=[12],
                              recall_queries=4, seq_len=64, steps=4, micro_batch=2))
    assert seen and set(seen) == {4, 8}
    assert main(_args(tmp_path, "--recall-eval-pairs", "40")) == 2  # more pairs than distinct keys (32)
    assert "recall_eval_pairs=[40]: each must lie in 1..recall_keys=32" in capsys.readouterr().err
    assert main(_args(tmp_path, "--recall-eval-pairs", "30")) == 2  # 2*30 + 8 > seq_len 64
    assert "seq_len=64: must hold the longest recall sequence" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(tmp_path, "--recall-eval-pairs", "12,x"))
    assert "expected comma-separated integers (e.g. 4,8,16), got '12,x'" in capsys.readouterr().err


def test_ratio_study_rejects_bad_settings(tmp_path, capsys):
    assert main(_args(tmp_path, "--recall-pairs", "4,40")) == 2  # more pairs than distinct keys (32)
    assert "each must lie in 1..recall_keys=32" in capsys.readouterr().err
    assert main(_args(tmp_path, "--recall-pairs", "4,30")) == 2  # 2*30 + 8 > seq_len 64
    assert "seq_len=64: must hold the longest recall sequence" in capsys.readouterr().err
    assert main(_args(tmp_path, "--group-sizes", "1,3", "--layers", "2")) == 2
    assert "group_sizes=[1, 3]: each must be in 0..num_layers=2" in capsys.readouterr().err
    assert main(_args(tmp_path, "--jobs", "0")) == 2
    assert "jobs=0: must be >= 1" in capsys.readouterr().err
    assert main(_args(tmp_path, "--save-every", "-1")) == 2
    assert "save_every=-1: must be >= 0" in capsys.readouterr().err
    assert main(_args(tmp_path, "--recall-values", "-1")) == 2
    assert "recall_values=-1: must be >= 0" in capsys.readouterr().err
    assert main(_args(tmp_path, "--head-dim", "24")) == 2
    assert "head_dim=24: must be a multiple of 16" in capsys.readouterr().err
    assert main(_args(tmp_path, "--heads", "3")) == 2
    assert "heads=3: must be 0 (width // 32) or an even count" in capsys.readouterr().err
    assert main(_args(tmp_path, "--eval-every", "-2")) == 2
    assert "eval_every=-2: must be >= 0" in capsys.readouterr().err


def test_recall_values_set_the_value_vocabulary():
    import torch

    from ringlinear.study.ratio import model_config
    from ringlinear.study.recall import RecallTask
    from ringlinear.study.study_config import RECALL_FIRST_TOKEN, StudyConfig

    sc = StudyConfig(corpus="x", recall_keys=64, recall_values=16)
    assert sc.num_values == 16 and sc.vocab_size == RECALL_FIRST_TOKEN + 80
    assert model_config(sc, 64, 1).vocab_size == sc.vocab_size
    small = model_config(StudyConfig(corpus="x", head_dim=16), 128, 0)
    assert (small.head_dim, small.num_attention_heads) == (16, 4)  # heads stay width / 32: less linear state
    assert StudyConfig(corpus="x", recall_keys=48).vocab_size == RECALL_FIRST_TOKEN + 96  # 0: as many as keys
    task = RecallTask(sc.vocab_size, 64, 16, RECALL_FIRST_TOKEN)
    ids, labels = task.sample(64, 8, torch.Generator().manual_seed(0))
    keys, vals = ids[:128:2], ids[1:128:2]
    assert sorted(keys.tolist()) == list(range(RECALL_FIRST_TOKEN, RECALL_FIRST_TOKEN + 64))
    assert vals.min() >= RECALL_FIRST_TOKEN + 64 and vals.max() < sc.vocab_size


def test_ratio_study_parallel_jobs(tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    assert main(_args(tmp_path, "--jobs", "2")) == 0
    assert len(list((tmp_path / "s").glob("run-*.json"))) == 2
    assert torch.get_num_threads() == threads  # the parent keeps its threads; workers take cores // jobs
    from ringlinear.study import ratio

    seen = []
    monkeypatch.setattr(ratio, "run_one", lambda *a: seen.append(torch.get_num_threads()) or {"ok": 1})
    monkeypatch.setattr(ratio, "build_dataset", lambda sc: ())
    monkeypatch.setattr(ratio.os, "cpu_count", lambda: 16)
    sc = ratio.StudyConfig(corpus="x", out=str(tmp_path / "j"), jobs=4)
    (tmp_path / "j").mkdir()
    try:
        ratio._job(sc, 64, 0)
    finally:
        torch.set_num_threads(threads)
    assert seen == [4]


def test_ratio_study_heads_and_recall_curve(tmp_path):
    """--heads sets every layer's heads (KV heads half); --eval-every records recall during training in the run's
    JSON, its progress log and a fourth plot panel."""
    from ringlinear.study.ratio import model_config
    from ringlinear.study.study_config import StudyConfig

    cfg = model_config(StudyConfig(corpus="x", heads=8, head_dim=16), 64, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 16)
    assert main(_args(tmp_path, "--steps", "4", "--eval-every", "2", "--heads", "4", "--head-dim", "16",
                      "--group-sizes", "2", "--layers", "2")) == 0
    r = json.loads((tmp_path / "s" / "run-w64-g2.json").read_text())
    assert [h["step"] for h in r["recall_history"]] == [2, 4] and r["recall_history"][-1]["recall"] == r["recall"]
    assert r["setup"]["heads"] == 4 and "eval_every" not in r["setup"]  # curves do not change a run's result
    log = (tmp_path / "s" / "run-w64-g2.log").read_text().splitlines()
    assert log[0].startswith("step 2/4 lm_loss") and "recall" in log[0] and log[-1].startswith("step 4/4")


def test_study_init_scales_with_width_and_rejects_bad_values(tmp_path, capsys):
    import math

    from ringlinear.study.ratio import model_config
    from ringlinear.study.study_config import StudyConfig

    sc = StudyConfig(corpus="x")
    for w in (64, 256):
        assert math.isclose(model_config(sc, w, 2).initializer_range, math.sqrt(2 / (5 * w)))
    assert model_config(StudyConfig(corpus="x", init_std=0.05), 64, 2).initializer_range == 0.05
    assert main(_args(tmp_path, "--embedding-init-std", "0")) == 2
    assert "embedding_init_std=0.0: must be > 0" in capsys.readouterr().err
    assert main(_args(tmp_path, "--init-std", "-1")) == 2
    assert "init_std=-1.0: must be >= 0" in capsys.readouterr().err


def test_study_seeds_report_combines_seed_folders(tmp_path, capsys):
    from ringlinear.study import seeds as mod

    outs = []
    for seed in (0, 1):
        args = _args(tmp_path, "--group-sizes", "0", "--seed", str(seed), "--recall-eval-pairs", "12")
        args[args.index("--out") + 1] = str(tmp_path / f"s{seed}")
        assert main(args) == 0
        outs.append(str(tmp_path / f"s{seed}"))
    capsys.readouterr()
    assert mod.main([*outs, "--png", str(tmp_path / "seeds.png"), "--json", str(tmp_path / "seeds.json")]) == 0
    out = capsys.readouterr().out
    assert "all linear    0" in out and "all linear    1" in out and "rec@  32*" in out
    rep = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in rep["runs"]] == [0, 1] and rep["trained"] == ["16", "24"]
    assert (tmp_path / "seeds.png").stat().st_size > 0
    # a folder trained under other settings is refused, naming the difference
    args = _args(tmp_path, "--group-sizes", "0", "--lr", "0.01")
    args[args.index("--out") + 1] = str(tmp_path / "other")
    assert main(args) == 0
    with pytest.raises(SystemExit, match=r"differs .* in \['lr'"):
        mod.main([outs[0], str(tmp_path / "other")])
    # so is one trained on another text (the setups hold the corpus digest)
    other_text = tmp_path / "other.txt"
    other_text.write_text(("epsilon zeta eta theta. " * 40 + "\n\n\n") * 6)
    args = _args(tmp_path, "--group-sizes", "0", "--seed", "1", "--recall-eval-pairs", "12")
    args[args.index("--out") + 1], args[args.index("--corpus") + 1] = str(tmp_path / "text2"), str(other_text)
    assert main(args) == 0
    with pytest.raises(SystemExit, match=r"differs .* in \['corpus'\]"):
        mod.main([outs[0], str(tmp_path / "text2")])
