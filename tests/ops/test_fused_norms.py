"""Fused inference norms (Triton; the interpreter here, compiled on a GPU machine) vs their PyTorch references:
qk_norm_rope over GQA and MHA, partial and full rotary, odd head counts and widths, with and without QK-norm
weights, with SiLU, positions up to 500K (YaRN's context) and mixed, YaRN's cos/sin factor, fp32 and bf16 in and
out; group_rmsnorm_gate and add_rmsnorm over odd widths; T = 0, 1 and off the tile; every output element written
(poisoned allocations); NaN where the reference has it; batch invariance; the references pinned bit for bit to the
layers' own forward; a decoder-layer step composed of the three equal to the layer; autograd keeps the reference;
bad arguments; and, on a GPU, replay in a CUDA graph."""

import pytest
import torch

from ringlinear.config import preset
from ringlinear.device import cast_for_compute
from ringlinear.layers.linear_attention import LightningAttention
from ringlinear.layers.softmax_attention import SoftmaxAttention
from ringlinear.model import DecoderLayer
from ringlinear.ops.backend import use_backend
from ringlinear.ops.fused_norms import (
    add_rmsnorm,
    fused,
    group_rmsnorm_gate,
    naive_add_rmsnorm,
    naive_group_rmsnorm_gate,
    naive_qk_norm_rope,
    qk_norm_rope,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6


def rel(out, ref):
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def bf16_ulps(out, ref):
    """|out - ref| in units of the bf16 spacing at ref (8 significant bits)."""
    _, e = torch.frexp(ref.float())
    return (out.float() - ref.float()).abs() / torch.ldexp(torch.ones_like(ref, dtype=torch.float32), e - 8)


def assert_matches(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    if out.numel() == 0:
        return
    assert rel(out, ref) < TOL.get(ref.dtype, 1e-2)
    if ref.dtype == torch.bfloat16:
        # the same fp32 values (up to a few fp32 ulps) rounded at the same points: one ulp apart at rounding
        # boundaries at most, nearly all bits equal (rounding group_rmsnorm_gate once instead of as the layer
        # does would leave only ~65% equal)
        assert (bf16_ulps(out, ref) <= 1).float().mean() >= 0.99
        assert (out == ref).float().mean() >= 0.98


def inv_freq(rotary_dim, theta=1e6):
    return (1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).float().to(DEV)


def positions(T, kind, g, dtype=torch.int64):
    if kind == "large":  # the far end of YaRN's 500K context
        p = torch.randint(400_000, 500_000, (T,), generator=g)
    else:  # decode steps of sequences at very different lengths
        p = torch.tensor([0, 499_999, 1, 131_071, 37, 262_144, 4095, 77_777, 12][:T] + [5] * max(0, T - 9))
    return p.to(DEV, dtype)


def qk_inputs(T, H, Hkv, D, norm, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (H + 2 * Hkv) * D, generator=g) * 2 + 0.3).to(DEV, dtype)
    qw = (torch.rand(D, generator=g) + 0.5).to(DEV, dtype) if norm in ("both", "q") else None
    kw = (torch.rand(D, generator=g) + 0.5).to(DEV, dtype) if norm == "both" else None
    return qkv, qw, kw, g


# (T, H, Hkv, D, rotary_dim, norm weights, silu, positions, attention_scaling, out_dtype)
QK_CASES = [
    (5, 4, 2, 64, 32, "both", False, "mixed", 1.0, None),  # GQA, partial rotary, mixed positions
    (1, 2, 2, 32, 32, "both", True, "large", 1.0, None),  # one token, MHA, full rotary, SiLU (linear layer)
    (0, 4, 2, 64, 32, "both", True, "mixed", 1.0, None),
    (7, 3, 1, 48, 20, "none", False, "mixed", 1.25, torch.float32),  # odd heads, half of 10, no norm, YaRN factor
    (9, 16, 4, 128, 64, "q", True, "large", 1.0, None),  # Ring-mini softmax heads, T off the token tile
    (3, 2, 2, 256, 256, "both", False, "large", 1.0, torch.bfloat16),  # head_dim 256, full rotary
    (4, 8, 8, 64, 32, "both", True, "mixed", 1.0, None),  # linear layer: MHA, 4 heads a program, SiLU
]


@pytest.mark.parametrize("T,H,Hkv,D,rot,norm,silu,pos,scaling,out_dtype", QK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_reference(T, H, Hkv, D, rot, norm, silu, pos, scaling, out_dtype, dtype):
    qkv, qw, kw, g = qk_inputs(T, H, Hkv, D, norm, dtype)
    p = positions(T, pos, g, torch.int32 if T % 2 else torch.int64)
    args = (qkv, H, Hkv, D, qw, kw, EPS, p, inv_freq(rot), rot, scaling, silu, out_dtype)
    ref = naive_qk_norm_rope(*args)
    with use_backend("triton"):
        out = qk_norm_rope(*args)
    for o, r, n in zip(out, ref, (H, Hkv, Hkv)):
        assert o.shape == (T, n, D)
        assert_matches(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_rmsnorm_gate_and_add_rmsnorm_match_reference(dtype):
    g = torch.Generator().manual_seed(1)
    for T, W, groups in ((7, 96, 3), (1, 40, 1), (0, 64, 4), (19, 64, 4), (3, 2048, 4)):
        o = (torch.randn(T, W, generator=g) * 3).to(DEV, dtype)
        gate = (torch.randn(T, W, generator=g) * 2).to(DEV, dtype)
        w = (torch.rand(W, generator=g) + 0.5).to(DEV, dtype)
        with use_backend("triton"):
            out = group_rmsnorm_gate(o, w, groups, EPS, gate)
        assert_matches(out, naive_group_rmsnorm_gate(o, w, groups, EPS, gate))
    for shape in ((5, 40), (1, 2048), (0, 64), (2, 9, 24), (33, 130)):
        x, r = (torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(2))
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV, dtype)
        with use_backend("triton"):
            out = add_rmsnorm(x, r, w, EPS)
        for a, b in zip(out, naive_add_rmsnorm(x, r, w, EPS)):
            assert_matches(a, b)
        assert torch.equal(out[1], r + x)  # the residual stream: exactly the dtype's add


def test_strided_rows():
    """qkv, o, gate and x may be row views of wider buffers (columns contiguous)."""
    qkv, qw, kw, g = qk_inputs(5, 4, 2, 32, "both", torch.float32, seed=9)
    wide = torch.randn(5, qkv.shape[1] + 24, generator=g).to(DEV)
    wide[:, 8 : 8 + qkv.shape[1]] = qkv
    view = wide[:, 8 : 8 + qkv.shape[1]]
    args = (4, 2, 32, qw, kw, EPS, positions(5, "mixed", g), inv_freq(32), 32)
    with use_backend("triton"):
        for a, b in zip(qk_norm_rope(view, *args), naive_qk_norm_rope(qkv, *args)):
            assert_matches(a, b)
        w = torch.rand(40, generator=g).to(DEV) + 0.5
        assert_matches(group_rmsnorm_gate(wide[:, :40], w, 2, EPS, wide[:, 50:90]),
                       naive_group_rmsnorm_gate(wide[:, :40], w, 2, EPS, wide[:, 50:90]))
        for a, b in zip(add_rmsnorm(wide[:, :40], wide[:, 50:90], w, EPS),
                        naive_add_rmsnorm(wide[:, :40], wide[:, 50:90], w, EPS)):
            assert_matches(a, b)


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(monkeypatch, dtype):
    monkeypatch.setattr(fused, "_empty", _poisoned)
    for T, H, Hkv, D, rot in ((9, 16, 4, 128, 64), (5, 3, 1, 48, 20)):
        qkv, qw, kw, g = qk_inputs(T, H, Hkv, D, "both", dtype, seed=2)
        args = (qkv, H, Hkv, D, qw, kw, EPS, positions(T, "mixed", g), inv_freq(rot), rot, 1.0, True)
        for o, r in zip(fused.fused_qk_norm_rope(*args), naive_qk_norm_rope(*args)):
            assert_matches(o, r)  # finite everywhere
    o, gate = (torch.randn(11, 96, generator=g).to(DEV, dtype) for _ in range(2))
    w = torch.rand(96, generator=g).to(DEV, dtype) + 0.5
    assert_matches(fused.fused_group_rmsnorm_gate(o, w, 3, EPS, gate), naive_group_rmsnorm_gate(o, w, 3, EPS, gate))
    for a, b in zip(fused.fused_add_rmsnorm(o, gate, w, EPS), naive_add_rmsnorm(o, gate, w, EPS)):
        assert_matches(a, b)


def test_nan_stays_where_the_reference_has_it():
    H, Hkv, D, rot, T = 4, 2, 32, 16, 5
    qkv, qw, kw, g = qk_inputs(T, H, Hkv, D, "both", torch.float32, seed=3)
    qkv[1, 1 * D + 20] = float("nan")  # a q head's pass-through dim: the norm spreads it over the head
    qkv[3, (H + 2) * D + 3] = float("nan")  # a v element stays one element
    p = positions(T, "mixed", g)
    args = (qkv, H, Hkv, D, qw, kw, EPS, p, inv_freq(rot), rot)
    with use_backend("triton"):
        out = qk_norm_rope(*args)
    ref = naive_qk_norm_rope(*args)
    for o, r in zip(out, ref):
        assert torch.equal(o.isnan(), r.isnan())
        torch.testing.assert_close(o, r, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert out[0][1, 1].isnan().all() and out[2].isnan().sum() == 1
    o, gate = torch.randn(3, 64, device=DEV), torch.randn(3, 64, device=DEV)
    o[1, 17] = float("nan")
    w = torch.ones(64, device=DEV)
    with use_backend("triton"):
        y = group_rmsnorm_gate(o, w, 4, EPS, gate)
        normed, h = add_rmsnorm(o, gate, w, EPS)
    assert torch.equal(y.isnan(), naive_group_rmsnorm_gate(o, w, 4, EPS, gate).isnan())
    assert y[1, 16:32].isnan().all() and y.isnan().sum() == 16  # its group only
    assert normed[1].isnan().all() and normed.isnan().sum() == 64 and h.isnan().sum() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant(dtype):
    """A token's outputs are the same bits whatever batch it is in (tiles do not depend on T)."""
    T, H, Hkv, D, rot = 11, 16, 4, 128, 64
    qkv, qw, kw, g = qk_inputs(T, H, Hkv, D, "both", dtype, seed=4)
    p, f = positions(T, "mixed", g), inv_freq(rot)
    o = torch.randn(T, 512, generator=g).to(DEV, dtype)
    w = torch.rand(512, generator=g).to(DEV, dtype) + 0.5
    with use_backend("triton"):
        full = qk_norm_rope(qkv, H, Hkv, D, qw, kw, EPS, p, f, rot, silu=True)
        gated = group_rmsnorm_gate(o, w, 4, EPS, o.flip(0))
        added = add_rmsnorm(o, o.flip(0), w, EPS)
        for idx in ([4], [10, 0, 7]):
            i = torch.tensor(idx, device=DEV)
            part = qk_norm_rope(qkv[i], H, Hkv, D, qw, kw, EPS, p[i], f, rot, silu=True)
            assert all(torch.equal(a, b[i]) for a, b in zip(part, full))
            assert torch.equal(group_rmsnorm_gate(o[i], w, 4, EPS, o.flip(0)[i]), gated[i])
            assert all(torch.equal(a, b[i]) for a, b in zip(add_rmsnorm(o[i], o.flip(0)[i], w, EPS), added))


class StandInContext:
    """An attention context whose attention is a cheap deterministic function of q, k, v (it records them). A
    training-style context (`inference` False): the layers take their PyTorch composition."""

    inference = False
    is_decode = False

    def __init__(self, positions):
        self.positions = positions

    def _attend(self, q, k, v, scale):
        self.seen = (q, k, v)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
        return (torch.tanh((q.float() * k).sum(-1, keepdim=True) * scale) * v + 0.1 * q.float()).to(q.dtype)

    def linear_attention(self, layer_idx, q, k, v, g, scale):
        return self._attend(q, k, v, scale)

    def softmax_attention(self, layer_idx, q, k, v, scale):
        return self._attend(q, k, v, scale)


def _randomize(module, g):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module


@pytest.mark.parametrize("softmax,silu", [(False, False), (False, True), (True, False)])  # softmax: no SiLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_the_layers(monkeypatch, softmax, silu, dtype):
    """naive_qk_norm_rope gives the q, k, v the layers hand to attention, and naive_group_rmsnorm_gate the linear
    layer's gated output, bit for bit."""
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    cfg = preset("tiny", linear_silu=silu)
    g = torch.Generator().manual_seed(5)
    layer = (SoftmaxAttention if softmax else LightningAttention)(cfg, 2 if softmax else 0)
    layer = cast_for_compute(_randomize(layer, g), dtype).to(DEV)
    T, H, Hkv, D = 6, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Hkv = Hkv if softmax else H
    x = torch.randn(T, cfg.hidden_size, generator=g).to(DEV, dtype)
    ctx = StandInContext(positions(T, "mixed", g))
    with torch.no_grad():
        y = layer(x, ctx)
        qkv = layer.query_key_value(x)
        ref = naive_qk_norm_rope(qkv, H, Hkv, D, layer.query_layernorm.weight, layer.key_layernorm.weight,
                                 cfg.rms_norm_eps, ctx.positions, layer.rotary.inv_freq, cfg.rotary_dim,
                                 silu=silu)
        assert all(torch.equal(a, b) for a, b in zip(ctx.seen, ref))
        if not softmax:
            o = ctx._attend(*ref, layer.scale).reshape(T, -1)
            gated = naive_group_rmsnorm_gate(o, layer.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps,
                                             layer.g_proj(x))
            assert torch.equal(layer.dense(gated), y)


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layer_step_from_the_fused_ops(monkeypatch, softmax, dtype):
    """add_rmsnorm -> qkv -> qk_norm_rope -> attention -> [group_rmsnorm_gate] -> dense -> add_rmsnorm -> MLP ->
    add equals the DecoderLayer's forward on the previous layer's residual + output."""
    cfg = preset("tiny", linear_silu=not softmax)
    g = torch.Generator().manual_seed(6)
    layer = DecoderLayer(cfg, 2 if softmax else 0, softmax=softmax, moe=False)
    layer = cast_for_compute(_randomize(layer, g), dtype).to(DEV)
    attn, eps = layer.attention, cfg.rms_norm_eps
    T, H, D = 5, cfg.num_attention_heads, cfg.head_dim
    Hkv = cfg.num_key_value_heads if softmax else H
    x0, m = (torch.randn(T, cfg.hidden_size, generator=g).to(DEV, dtype) for _ in range(2))
    ctx = StandInContext(positions(T, "large", g))
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    with torch.no_grad():
        ref = layer(x0 + m, ctx)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    calls = []
    for name in ("fused_qk_norm_rope", "fused_group_rmsnorm_gate", "fused_add_rmsnorm"):
        fn = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    with torch.no_grad():
        h, res = add_rmsnorm(m, x0, layer.input_layernorm.weight, eps)
        q, k, v = qk_norm_rope(attn.query_key_value(h), H, Hkv, D, attn.query_layernorm.weight,
                               attn.key_layernorm.weight, eps, ctx.positions, attn.rotary.inv_freq, cfg.rotary_dim,
                               silu=cfg.linear_silu and not softmax)
        o = ctx._attend(q, k, v, attn.scale).reshape(T, -1)
        if not softmax:
            o = group_rmsnorm_gate(o, attn.g_norm.weight, cfg.group_norm_size, eps, attn.g_proj(h))
        h, res = add_rmsnorm(attn.dense(o), res, layer.post_attention_layernorm.weight, eps)
        out = res + layer.mlp(h)
    assert sorted(set(calls)) == sorted(["fused_qk_norm_rope", "fused_add_rmsnorm"]
                                        + ([] if softmax else ["fused_group_rmsnorm_gate"]))
    assert out.dtype == ref.dtype and rel(out, ref) < TOL[dtype]


def test_autograd_keeps_the_reference(monkeypatch):
    """Forward-only kernels: a call autograd records takes the differentiable reference, whatever the backend."""
    monkeypatch.setattr(fused, "fused_qk_norm_rope", None)  # would fail if called
    monkeypatch.setattr(fused, "fused_add_rmsnorm", None)
    qkv, qw, kw, g = qk_inputs(3, 2, 1, 32, "both", torch.float32, seed=7)
    qw.requires_grad_(True)
    x = torch.randn(3, 16, device=DEV, requires_grad=True)
    with use_backend("triton"):
        q, _, _ = qk_norm_rope(qkv, 2, 1, 32, qw, kw, EPS, positions(3, "mixed", g), inv_freq(16), 16)
        normed, _ = add_rmsnorm(x, x.detach(), torch.ones(16, device=DEV), EPS)
    (q.sum() + normed.sum()).backward()
    assert qw.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_arguments(backend):
    qkv, qw, kw, g = qk_inputs(2, 4, 2, 64, "both", torch.float32)
    p, f = positions(2, "mixed", g), inv_freq(32)
    good = dict(qkv=qkv, num_heads=4, num_kv_heads=2, head_dim=64, q_weight=qw, k_weight=kw, eps=EPS, positions=p,
                inv_freq=f, rotary_dim=32)
    bad = [
        (dict(head_dim=63), "head_dim=63"), (dict(rotary_dim=80), "rotary_dim=80"), (dict(rotary_dim=31), "rotary_dim"),
        (dict(num_kv_heads=3), "qkv must be"), (dict(q_weight=qw[:32]), "q_weight must be"),
        (dict(k_weight=kw[:32]), "k_weight must be"), (dict(positions=p.float()), "positions must be"),
        (dict(positions=p[:1]), "positions must be"), (dict(inv_freq=f[:8]), "inv_freq must be"),
        (dict(qkv=qkv.int()), "qkv must be float32"), (dict(out_dtype=torch.int8), "out_dtype"),
    ]
    o = torch.randn(3, 64, device=DEV)
    with use_backend(backend):
        qk_norm_rope(**good)
        for change, msg in bad:
            with pytest.raises(ValueError, match=msg):
                qk_norm_rope(**{**good, **change})
        with pytest.raises(ValueError, match="gate must match o"):
            group_rmsnorm_gate(o, torch.ones(64, device=DEV), 4, EPS, o.bfloat16())
        with pytest.raises(ValueError, match="groups=5"):
            group_rmsnorm_gate(o, torch.ones(64, device=DEV), 5, EPS, o)
        with pytest.raises(ValueError, match=r"weight must be \[64\]"):
            group_rmsnorm_gate(o, torch.ones(32, device=DEV), 4, EPS, o)
        with pytest.raises(ValueError, match="residual must match x"):
            add_rmsnorm(o, o[:2], torch.ones(64, device=DEV), EPS)
        with pytest.raises(ValueError, match=r"weight must be \[64\]"):
            add_rmsnorm(o, o, torch.ones(63, device=DEV), EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_in_a_cuda_graph():
    T, H, Hkv, D, rot = 8, 16, 4, 128, 64
    qkv, qw, kw, g = qk_inputs(T, H, Hkv, D, "both", torch.bfloat16, seed=8)
    p, f = positions(T, "large", g), inv_freq(rot)
    o = torch.randn(T, 2048, device=DEV).bfloat16()
    w = torch.rand(2048, device=DEV).bfloat16() + 0.5

    def step():
        q, k, v = qk_norm_rope(qkv, H, Hkv, D, qw, kw, EPS, p, f, rot, silu=True)
        y = group_rmsnorm_gate(o, w, 4, EPS, o * 0.5)
        return (q, k, v, y, *add_rmsnorm(y, o, w, EPS))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (9, 10):
        gen = torch.Generator().manual_seed(seed)
        qkv.copy_(torch.randn(qkv.shape, generator=gen).to(DEV).bfloat16())
        p.copy_(torch.randint(0, 500_000, (T,), generator=gen).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, step()))
