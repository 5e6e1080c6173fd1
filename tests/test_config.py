import json

import pytest

from ringlinear.config import ConfigError, RingLinearConfig, preset


def test_ring_mini_layout_matches_spec():
    cfg = preset("ring-mini-linear-2.0")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "softmax"] == [4, 9, 14, 19]
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_trailing_and_short_stacks_are_softmax():
    cfg = preset("tiny", num_hidden_layers=7, layer_group_size=3)
    assert cfg.layer_types == ["linear", "linear", "softmax", "linear", "linear", "softmax", "softmax"]
    short = preset("tiny", num_hidden_layers=2, layer_group_size=3)
    assert short.layer_types == ["softmax", "softmax"]


@pytest.mark.parametrize(
    "field,value,needle",
    [("num_key_value_heads", 3, "num_key_value_heads=3"), ("group_norm_size", 3, "group_norm_size=3"),
     ("n_group", 5, "n_group=5"), ("topk_group", 9, "topk_group=9"), ("score_function", "softmax", "sigmoid"),
     ("partial_rotary_factor", 0.0, "partial_rotary_factor"), ("rope_scaling", {"type": "yarn"}, "rope_scaling")],
)
def test_bad_fields_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        preset("tiny", **{field: value})


def test_roundtrip_keeps_unknown_fields(tmp_path):
    d = preset("ring-mini-linear-2.0").to_dict()
    d["auto_map"] = {"AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config"}
    d["embedding_dropout"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = RingLinearConfig.load(tmp_path)
    cfg.save(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    assert again == d
    assert again["architectures"] == ["BailingMoeLinearV2ForCausalLM"] and again["model_type"] == "bailing_moe_linear"


def test_wrong_model_type_refused():
    with pytest.raises(ConfigError, match="model_type"):
        RingLinearConfig.from_dict({"model_type": "llama"})
