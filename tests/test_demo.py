"""A shortened `ringlinear demo` end to end on the CPU: tokenizer trained on the default corpus, a few training
steps of the tiny hybrid, HF export, engine generation, trainer-vs-engine logprob check, report and plot."""

import json
import os

from ringlinear.cli import main


def test_short_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "4", "--batch", "2", "--seq-len", "64", "--vocab", "300",
               "--max-tokens", "6", "--prompt", "The import system", "--prompt", "x"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("train_tokens_per_s", "generation_tokens_per_s", "cache_bytes_per_token",
                "softmax_twin_cache_bytes_per_token", "max_abs_logprob_diff_trainer_vs_engine"):
        assert report[key] == report[key] and report[key] >= 0, key  # present, not NaN
    assert report["cache_ratio_vs_twin"] < 1.0  # the hybrid caches less per token than its all-softmax twin
    assert report["max_abs_logprob_diff_trainer_vs_engine"] < 1e-3
    assert report["final_loss"] < report["first_loss"]
    assert len(report["samples"]) == 2
    final = report["checkpoint"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(final, name)), name
    assert os.path.exists(report["loss_plot"])
