"""RoPE scaling (linear, dynamic NTK, YaRN): against transformers' `ROPE_INIT_FUNCTIONS` and by hand."""

import math

import pytest
import torch

from ringlinear.layers.rotary import RotaryEmbedding, rope_frequencies

YARN_CASES = [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072, "beta_fast": 16, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 65536, "mscale": 1.0,
     "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072, "attention_factor": 1.25},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 131072},  # max_position / original
    {"rope_type": "linear", "factor": 2.0},
]


def _transformers_rope(scaling: dict, rotary_dim: int, head_dim: int, theta: float, max_pos: int,
                       seq_len: int | None = None):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = scaling.get("rope_type", scaling.get("type"))
    fields = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
    common = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos)
    if hasattr(transformers.modeling_rope_utils, "RopeParameters"):  # transformers >= 5: one rope_parameters dict
        cfg = transformers.LlamaConfig(**common, rope_parameters={**fields, "rope_type": kind, "rope_theta": theta,
                                                                  "partial_rotary_factor": rotary_dim / head_dim})
    else:
        cfg = transformers.LlamaConfig(**common, rope_theta=theta, partial_rotary_factor=rotary_dim / head_dim,
                                       rope_scaling={**fields, "rope_type": kind})
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len) if seq_len else ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")


@pytest.mark.parametrize("scaling", YARN_CASES)
def test_frequencies_and_factor_equal_transformers(scaling):
    """Partial rotary as Ring-mini (64 of 128 dims, theta 1e6, 512K context): inv_freq to the last bits of fp32
    (transformers computes in fp32, we in fp64 rounded once), the attention factor exactly, and cos/sin as
    transformers' rotary embedding builds them (`cos(pos * inv_freq) * attention_scaling`)."""
    if scaling.get("factor", 1) is None and not hasattr(pytest.importorskip("transformers").modeling_rope_utils,
                                                         "RopeParameters"):
        pytest.skip("transformers < 5 has no yarn factor derived from original_max_position_embeddings")
    inv_ref, factor_ref = _transformers_rope(scaling, 64, 128, 1e6, 524288)
    rope = RotaryEmbedding(64, 1e6, scaling, 524288)
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.shape == inv_ref.shape
    assert ((rope.inv_freq - inv_ref).abs() / inv_ref).max() < 4e-7
    assert rope.attention_factor == pytest.approx(factor_ref, rel=1e-15)
    pos = torch.arange(33)
    cos, sin = rope.cos_sin(pos)
    angles = pos.float()[:, None] * inv_ref[None, :]
    torch.testing.assert_close(cos, angles.cos() * factor_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, angles.sin() * factor_ref, rtol=0, atol=2e-5)


def test_dynamic_is_transformers_at_the_extended_length():
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    inv_ref, _ = _transformers_rope(scaling, 64, 128, 1e6, 131072, seq_len=4 * 131072)
    inv, factor = rope_frequencies(64, 1e6, scaling, 131072)
    assert factor == 1.0 and ((inv - inv_ref).abs() / inv_ref).max() < 4e-7
    # by hand: theta' = theta * (s^2 - s + 1)^(r / (r - 2))
    base = 1e6 * (16 - 3) ** (64 / 62)
    want = torch.tensor([base ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(inv.double(), want, rtol=1e-7, atol=0)


def test_yarn_by_hand():
    """rotary_dim 16, theta 1e4, 256 original positions, factor 4: the ramp runs from dim floor(0.21) = 0 to
    ceil(3.22) = 4, so pair i keeps theta^(-2i/16) at i = 0, is divided by 4 from i = 4 on, and blends linearly
    between; cos and sin are scaled by 0.1 ln 4 + 1."""
    theta, s = 1e4, 4.0
    low = 16 * math.log(256 / (32 * 2 * math.pi)) / (2 * math.log(theta))
    high = 16 * math.log(256 / (1 * 2 * math.pi)) / (2 * math.log(theta))
    assert (math.floor(low), math.ceil(high)) == (0, 4)
    ramp = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    want = [theta ** (-2 * i / 16) * ((1 - r) + r / s) for i, r in enumerate(ramp)]
    rope = RotaryEmbedding(16, theta, {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": 256})
    torch.testing.assert_close(rope.inv_freq, torch.tensor(want, dtype=torch.float32), rtol=1e-7, atol=0)
    m = 0.1 * math.log(4) + 1
    assert rope.attention_factor == pytest.approx(m)
    # the rotated dims are a rotation scaled by m; the others pass through unchanged
    torch.manual_seed(0)
    x = torch.randn(3, 2, 24)
    y = rope(x, torch.tensor([0, 100, 5000]))
    pairs = lambda t: torch.stack([t[..., :8], t[..., 8:16]], -1).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(y), m * pairs(x))
    assert torch.equal(y[..., 16:], x[..., 16:])
    angle = torch.atan2(y[1, 0, 8:16], y[1, 0, :8]) - torch.atan2(x[1, 0, 8:16], x[1, 0, :8])
    torch.testing.assert_close(torch.remainder(angle - 100 * rope.inv_freq, 2 * math.pi).sin(), torch.zeros(8),
                               atol=1e-4, rtol=0)


def test_default_and_linear():
    inv, m = rope_frequencies(8, 1e4)
    assert m == 1.0
    torch.testing.assert_close(inv, torch.tensor([1e4 ** (-i / 4) for i in range(4)]), rtol=1e-7, atol=0)
    lin, _ = rope_frequencies(8, 1e4, {"type": "linear", "factor": 2.5})
    torch.testing.assert_close(lin, inv / 2.5)
    assert torch.equal(rope_frequencies(8, 1e4, {"rope_type": "default"})[0], inv)
    with pytest.raises(ValueError, match="longrope"):
        rope_frequencies(8, 1e4, {"rope_type": "longrope"})
