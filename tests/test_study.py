import json

from ringlinear.cli import main


def test_ratio_study_runs_resumes_and_plots(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(("alpha beta gamma delta. " * 40 + "\n\n\n") * 6)
    args = ["study", "ratio", "--corpus", str(corpus), "--out", str(tmp_path / "s"), "--group-sizes", "1,0",
            "--widths", "64", "--layers", "2", "--steps", "2", "--batch", "2", "--seq-len", "64"]
    assert main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "s").glob("run-*.json"))
    assert runs == ["run-w64-g0.json", "run-w64-g1.json"]
    r = json.loads((tmp_path / "s" / "run-w64-g0.json").read_text())
    assert r["layer_types"] == ["linear", "linear"] and set(r["recall"]) and r["lm_loss"] > 0
    assert (tmp_path / "s" / "ratio_study.png").exists()
    # a second call finds every run done and only re-reports
    (tmp_path / "s" / "run-w64-g1.json").write_text(json.dumps({**json.loads((tmp_path / "s" / "run-w64-g1.json").read_text()), "lm_loss": 123.0}))
    assert main(args) == 0
    assert "123.000" in capsys.readouterr().out
