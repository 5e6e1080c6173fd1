"""Softmax-only -> hybrid conversion: weights carried over, then continued training recovers the loss."""

import json

import pytest
import torch

from ringlinear.config import preset
from ringlinear.convert import convert_softmax_to_hybrid, expand_qkv_heads
from ringlinear.hf import load_model, save_model
from ringlinear.model import init_model

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "pack my box with five dozen liquor jugs. ") * 8


def _batch(seq=96, rows=4, seed=0):
    data = torch.tensor(list(TEXT.encode()))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq, (rows,), generator=g)
    ids = torch.cat([data[s : s + seq] for s in starts.tolist()])
    return ids, torch.arange(0, rows * seq + 1, seq, dtype=torch.int32)


def _fit(model, steps, lr=3e-3, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        loss = model.loss(*_batch(seed=seed + s))["lm_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _eval(model)


@torch.no_grad()
def _eval(model):
    model.eval()
    return sum(model.loss(*_batch(seed=10_000 + i))["lm_loss"].item() for i in range(4)) / 4


def testexpand_qkv_heads_repeats_kv_heads():
    H, Hkv, D, hidden = 4, 2, 3, 5
    w = torch.randn((H + 2 * Hkv) * D, hidden)
    out = expand_qkv_heads(w, H, Hkv, D).view(3, H, D, hidden)
    k = w[H * D : (H + Hkv) * D].view(Hkv, D, hidden)
    assert torch.equal(out[0], w[: H * D].view(H, D, hidden))
    assert torch.equal(out[1, 0], k[0]) and torch.equal(out[1, 1], k[0]) and torch.equal(out[1, 2], k[1])


def test_layout_and_copied_weights(tmp_path):
    src = init_model(preset("tiny", layer_group_size=1, group_norm_size=1), seed=0)
    save_model(src, tmp_path / "src")
    cfg = convert_softmax_to_hybrid(str(tmp_path / "src"), str(tmp_path / "hyb"), layer_group_size=3)
    hyb = load_model(str(tmp_path / "hyb"))
    assert cfg.layer_types == ["linear", "linear", "softmax", "linear", "linear", "softmax"]
    assert torch.equal(hyb.model.layers[2].attention.query_key_value.weight, src.model.layers[2].attention.query_key_value.weight)
    assert torch.equal(hyb.model.layers[4].mlp.gate_proj, src.model.layers[4].mlp.gate_proj)
    assert (hyb.model.layers[0].attention.g_proj.weight == 0).all()


def test_bad_sources_refused(tmp_path):
    hyb = init_model(preset("tiny"), seed=0)
    save_model(hyb, tmp_path / "h")
    with pytest.raises(ValueError, match="already has linear layers"):
        convert_softmax_to_hybrid(str(tmp_path / "h"), str(tmp_path / "o"), 3)
    d = json.loads((tmp_path / "h" / "config.json").read_text())
    d["model_type"] = "llama"
    (tmp_path / "h" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type"):
        convert_softmax_to_hybrid(str(tmp_path / "h"), str(tmp_path / "o"), 3)


@pytest.mark.slow
def test_continued_training_recovers_loss(tmp_path):
    torch.manual_seed(0)
    src = init_model(preset("tiny", layer_group_size=1, group_norm_size=1), seed=0)
    trained = _fit(src, 60)
    save_model(src, tmp_path / "src")
    convert_softmax_to_hybrid(str(tmp_path / "src"), str(tmp_path / "hyb"), layer_group_size=3)
    hyb = load_model(str(tmp_path / "hyb"))
    converted = _eval(hyb)
    recovered = _fit(hyb, 30, seed=500)
    # Margin: within 10% of the softmax model's loss after half as many steps as it was trained for.
    fresh = _fit(init_model(preset("tiny"), seed=0), 30, seed=500)
    assert converted > trained
    assert recovered < trained * 1.10, (trained, converted, recovered)
    assert recovered < fresh, (recovered, fresh)  # the copied weights are worth something
