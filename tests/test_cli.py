import json

import pytest
import torch

from ringlinear.cli import main
from ringlinear.hf import load_model


@pytest.mark.parametrize("name,total,active", [("ring-mini-linear-2.0", 16.4e9, 957e6),
                                               ("ring-flash-linear-2.0", 104e9, 6.1e9)])
def test_info_matches_published_counts(capsys, name, total, active):
    assert main(["info", "--preset", name, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert abs(s["total_params"] / total - 1) < 0.02
    assert abs(s["active_params"] / active - 1) < 0.02
    assert s["kv_bytes_per_token"] == 4 * 2 * 4 * 128 * 2
    assert len(s["layer_types"]) in (20, 32)


def test_info_with_yarn_512k(capsys):
    """The model card's 512K context: RoPE extended 4x with YaRN from 128K; same parameters and cache figures."""
    assert main(["info", "--preset", "ring-mini-linear-2.0", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    yarn = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}'
    assert main(["info", "--preset", "ring-mini-linear-2.0", "--set", f"rope_scaling={yarn}",
                 "--set", "max_position_embeddings=524288", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plain
    with pytest.raises(SystemExit, match=r"rope_scaling\.rope_type='ntk'"):
        main(["info", "--preset", "ring-mini-linear-2.0", "--set", 'rope_scaling={"rope_type": "ntk", "factor": 2}'])


def test_ring_mini_memory_figures(capsys):
    main(["info", "--preset", "ring-mini-linear-2.0", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["kv_bytes_per_token"] == 8 * 1024 and s["state_bytes_per_sequence"] == 16 * 2**20


def test_info_text_and_overrides(capsys):
    assert main(["info", "--preset", "tiny", "--set", "num_hidden_layers=9"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "total parameters" in out and out.count("moe") >= 8


def test_init_writes_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "7", "--dtype", "fp32"]) == 0
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    m = load_model(str(out))
    assert m(torch.tensor([[5, 6, 7]])).shape == (1, 3, 320)


def test_bad_usage_is_a_clear_error():
    with pytest.raises(SystemExit, match="exactly one"):
        main(["info"])
    with pytest.raises(SystemExit, match="n_group"):
        main(["info", "--preset", "tiny", "--set", "n_group=3"])


def test_info_per_gpu_tensor_parallel_fp8(capsys):
    """What one GPU holds: bf16 Ring-flash does not fit one H200 (141 GB), FP8 does, and 2 ranks halve it."""
    sizes = {}
    for tp, q in ((1, None), (1, "fp8"), (2, "fp8")):
        args = ["info", "--preset", "ring-flash-linear-2.0", "--tensor-parallel-size", str(tp), "--json"]
        assert main(args + (["--quantization", q] if q else [])) == 0
        sizes[tp, q] = json.loads(capsys.readouterr().out)["per_gpu"]
    assert sizes[1, None]["weight_bytes"] > 141e9 > sizes[1, "fp8"]["weight_bytes"]
    assert 0.49 < sizes[1, "fp8"]["weight_bytes"] / sizes[1, None]["weight_bytes"] < 0.53  # + scales, bf16 embeddings
    assert 0.49 < sizes[2, "fp8"]["weight_bytes"] / sizes[1, "fp8"]["weight_bytes"] < 0.51
    assert sizes[2, "fp8"]["kv_bytes_per_token"] * 2 == sizes[1, "fp8"]["kv_bytes_per_token"]
    assert sizes[2, "fp8"]["state_bytes_per_sequence"] * 2 == sizes[1, "fp8"]["state_bytes_per_sequence"]
    assert main(["info", "--preset", "ring-flash-linear-2.0", "--tensor-parallel-size", "2", "--quantization",
                 "fp8"]) == 0
    assert "per GPU, tensor_parallel_size 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="group_norm_size=4 is not divisible"):
        main(["info", "--preset", "ring-mini-linear-2.0", "--tensor-parallel-size", "8"])
