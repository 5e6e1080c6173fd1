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


YARN_4X = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}


@pytest.mark.parametrize("scaling", [YARN_4X, {"type": "yarn", "factor": 4, "original_max_position_embeddings": 131072},
                                     {"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "default"},
                                     {**YARN_4X, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 1.0,
                                      "truncate": False, "attention_factor": 1.1, "rope_theta": 1e6,
                                      "partial_rotary_factor": 0.5}])
def test_rope_scaling_accepted_and_round_trips(tmp_path, scaling):
    cfg = preset("ring-mini-linear-2.0", rope_scaling=scaling, max_position_embeddings=524288)
    cfg.save(tmp_path)
    assert RingLinearConfig.load(tmp_path).rope_scaling == scaling


@pytest.mark.parametrize("scaling,needle", [
    ({"rope_type": "longrope", "factor": 4.0}, r"rope_scaling\.rope_type='longrope': allowed types: 'default', "
                                               r"'linear', 'dynamic', 'yarn'"),
    ({"type": "su"}, r"rope_scaling\.type='su'"),
    ({"factor": 4.0}, r"rope_scaling=.*rope_type one of"),
    ("yarn", r"rope_scaling='yarn'"),
    ({"type": "yarn", "rope_type": "linear", "factor": 2.0}, r"rope_scaling\.type='yarn': differs"),
    ({"rope_type": "linear"}, r"rope_scaling\.factor=None: required"),
    ({"rope_type": "linear", "factor": 0.5}, r"rope_scaling\.factor=0\.5: must be a number >= 1"),
    ({"rope_type": "dynamic", "factor": True}, r"rope_scaling\.factor=True"),
    ({"rope_type": "yarn", "factor": None}, r"rope_scaling\.factor=None: required"),
    ({**YARN_4X, "low_freq_factor": 1.0}, r"rope_scaling\.low_freq_factor=1\.0: not a field of rope_type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, r"rope_scaling\.beta_fast=32: not a field"),
    ({**YARN_4X, "original_max_position_embeddings": 1.5e5}, r"original_max_position_embeddings=150000\.0"),
    ({**YARN_4X, "beta_fast": 1, "beta_slow": 2}, r"rope_scaling\.beta_fast=1: must be >= beta_slow=2"),
    ({**YARN_4X, "attention_factor": 0.0}, r"rope_scaling\.attention_factor=0\.0: must be a number > 0"),
    ({**YARN_4X, "truncate": "yes"}, r"rope_scaling\.truncate='yes': must be true or false"),
    ({**YARN_4X, "rope_theta": 1e4}, r"rope_scaling\.rope_theta=10000\.0: must equal the top-level rope_theta"),
])
def test_bad_rope_scaling_names_the_field(scaling, needle):
    with pytest.raises(ConfigError, match=needle):
        preset("ring-mini-linear-2.0", rope_scaling=scaling)


def test_shared_expert_size_falls_back_to_moe_intermediate_size():
    d = preset("ring-mini-linear-2.0", moe_intermediate_size=384).to_dict()
    del d["moe_shared_expert_intermediate_size"]
    cfg = RingLinearConfig.from_dict(d)
    assert cfg.moe_shared_expert_intermediate_size is None and cfg.shared_expert_intermediate_size == 384
    assert RingLinearConfig().moe_shared_expert_intermediate_size is None
    for name, size in (("ring-mini-linear-2.0", 512), ("ring-flash-linear-2.0", 1024), ("tiny", 64), ("small", 128)):
        assert preset(name).moe_shared_expert_intermediate_size == size  # presets say it explicitly
    assert preset("tiny", num_shared_experts=2).shared_expert_intermediate_size == 128
    with pytest.raises(ConfigError, match="moe_shared_expert_intermediate_size=0"):
        preset("tiny", moe_shared_expert_intermediate_size=0)


@pytest.mark.parametrize("field,neutral,other", [
    ("linear_rope", True, False), ("rotary_dim", 64, 128), ("use_linear_silu", False, True),
    ("num_linear_key_value_heads", 16, 4), ("full_attention_type", None, "mla"),
    ("layers_block_type", ["attention" if (i + 1) % 5 == 0 else "linear_attention" for i in range(20)],
     ["attention"] * 20),
    ("layer_types", ["full_attention" if (i + 1) % 5 == 0 else "linear_attention" for i in range(20)],
     ["linear_attention"] * 20),
    ("using_split_qkv_in_self_attention", False, True), ("rope_traditional", False, True), ("norm_head", False, True),
    ("norm_softmax", False, True), ("moe_router_enable_routed_scaling", True, False),
    ("moe_router_enable_shared_expert", True, False), ("scoring_func", "sigmoid", "softmax"),
    ("topk_method", "noaux_tc", "group_limited_greedy"), ("embedding_dropout", 0.0, 0.1),
    ("attention_dropout", 0.0, 0.1), ("output_dropout", 0, 0.05),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1000000, "partial_rotary_factor": 0.5},
     {"rope_type": "default", "rope_theta": 600000}),
])
def test_unimplemented_fields_refused_unless_neutral(tmp_path, field, neutral, other):
    """Fields other implementations read and we have no switch for: the value that means what we compute is kept
    verbatim (load -> save returns it), any other is a ConfigError naming the field."""
    d = preset("ring-mini-linear-2.0").to_dict()
    d[field] = neutral
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = RingLinearConfig.load(tmp_path)
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == d
    d[field] = other
    with pytest.raises(ConfigError, match=f"config field {field}=.*only"):
        RingLinearConfig.from_dict(d)


def test_rope_parameters_and_top_level_original_agree_with_rope_scaling():
    base = preset("ring-mini-linear-2.0", rope_scaling=YARN_4X, max_position_embeddings=524288).to_dict()
    ok = {**YARN_4X, "rope_theta": 1000000, "partial_rotary_factor": 0.5}
    RingLinearConfig.from_dict({**base, "rope_parameters": ok, "original_max_position_embeddings": 131072})
    with pytest.raises(ConfigError, match="rope_parameters"):
        RingLinearConfig.from_dict({**base, "rope_parameters": {**ok, "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_parameters"):  # yarn there, nothing in rope_scaling
        RingLinearConfig.from_dict({**base, "rope_scaling": None, "rope_parameters": ok})
    with pytest.raises(ConfigError, match="original_max_position_embeddings=65536"):  # transformers would prefer it
        RingLinearConfig.from_dict({**base, "original_max_position_embeddings": 65536})
    # without yarn a top-level original_max_position_embeddings means nothing anywhere
    RingLinearConfig.from_dict({**preset("tiny").to_dict(), "original_max_position_embeddings": 1024})
