import json
import os

import pytest
import safetensors.torch
import torch

from ringlinear import hf as ck
from ringlinear.config import preset
from ringlinear.hf import CheckpointError, check_checkpoint, load_model, save_model
from ringlinear.model import build_model, init_model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_bit_identical(tmp_path, dtype):
    m = init_model(preset("tiny"), seed=3, dtype=dtype)
    save_model(m, tmp_path / "ck", max_shard_bytes=1_500_000)
    files = os.listdir(tmp_path / "ck")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    m2 = load_model(str(tmp_path / "ck"))
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    assert m2.model.layers[1].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, 320, (1, 12))
    assert torch.equal(m(ids), m2(ids))


def test_official_names_and_shapes(tmp_path):
    m = init_model(preset("tiny"), seed=0)
    save_model(m, tmp_path / "ck")
    names = safetensors.torch.load_file(tmp_path / "ck" / "model.safetensors").keys()
    for want in ["model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                 "model.layers.0.attention.g_proj.weight", "model.layers.0.attention.g_norm.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.experts.15.down_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.2.attention.dense.weight",
                 "model.norm.weight", "lm_head.weight"]:
        assert want in names, want
    want = ck.expected_tensors(build_model(preset("ring-mini-linear-2.0")))
    assert want["model.layers.0.attention.query_key_value.weight"][0] == (6144, 2048)
    assert want["model.layers.4.attention.query_key_value.weight"][0] == (3072, 2048)
    assert want["model.layers.1.mlp.experts.255.down_proj.weight"][0] == (2048, 512)


def test_mismatch_refused_with_list(tmp_path):
    m = init_model(preset("tiny"), seed=0)
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape.*experts"):
        load_model(str(tmp_path / "ck"))
    sd = safetensors.torch.load_file(tmp_path / "ck" / "model.safetensors")
    sd.pop("model.norm.weight")
    sd["model.layers.0.attention.extra.weight"] = torch.zeros(1)
    cfg["moe_intermediate_size"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(sd, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: model\.norm\.weight; 1 unexpected: model\.layers\.0\.attention\.extra"):
        check_checkpoint(str(tmp_path / "ck"), build_model(preset("tiny")))


def test_alias_names_load(tmp_path):
    m = init_model(preset("tiny"), seed=5)
    save_model(m, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    sd = safetensors.torch.load_file(f)
    sd = {k.replace("mlp.gate.weight", "mlp.gate.gate_proj.weight"): v for k, v in sd.items()}
    safetensors.torch.save_file(sd, f)
    m2 = load_model(str(tmp_path / "ck"))
    assert torch.equal(m2.model.layers[3].mlp.gate.weight, m.model.layers[3].mlp.gate.weight)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = init_model(preset("tiny"), seed=0)
    save_model(m, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(init_model(preset("tiny"), seed=9), tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_init_model_embedding_std():
    cfg = preset("tiny")
    a = init_model(cfg, seed=3, embedding_std=1.0)
    b = init_model(cfg, seed=3)
    emb = a.model.word_embeddings.weight
    assert abs(emb.std().item() - 1.0) < 0.05
    assert abs(b.model.word_embeddings.weight.std().item() - cfg.initializer_range) < 0.002
    # every other tensor is initialised exactly as without the option
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "word_embeddings" not in k)
    assert torch.equal(emb, init_model(cfg, seed=3, embedding_std=1.0).model.word_embeddings.weight)
