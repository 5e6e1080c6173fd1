"""The two PyTorch forms of Lightning attention agree with each other and with first principles."""

import math

import pytest
import torch

from ringlinear.ops.lightning import (
    alibi_slopes,
    decay_slopes,
    layer_decay_factor,
    naive_chunk_lightning_attn,
    naive_lightning_decode,
    naive_recurrent_lightning_attn,
)


def rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def test_slopes_pinned():
    s16 = alibi_slopes(16)
    assert s16[0] == pytest.approx(2**-0.5) and s16[15] == pytest.approx(2**-8)
    s8 = alibi_slopes(8)
    assert s8 == pytest.approx([2 ** -(h + 1) for h in range(8)])
    # 12 heads: the 8 slopes of H=8, then every other slope of H=16 (first 4).
    assert alibi_slopes(12) == pytest.approx(s8 + alibi_slopes(16)[0::2][:4])


def test_layer_factor_pinned():
    # Official reading: 1 - (i - 1) / (L - 1) + 1e-5 (README: "Decay").
    assert layer_decay_factor(0, 20) == pytest.approx(1 + 1 / 19 + 1e-5)
    assert layer_decay_factor(1, 20) == pytest.approx(1 + 1e-5)
    assert layer_decay_factor(19, 20) == pytest.approx(1 - 18 / 19 + 1e-5)
    assert layer_decay_factor(0, 1) == pytest.approx(1 + 1e-5)
    assert layer_decay_factor(7, 20, layerwise=False) == pytest.approx(1 + 1e-5)
    g = decay_slopes(16, 3, 20)
    assert g.dtype == torch.float32 and (g < 0).all()
    assert g[0].item() == pytest.approx(-(2**-0.5) * (1 - 2 / 19 + 1e-5), rel=1e-6)


def test_recurrence_from_first_principles():
    torch.manual_seed(0)
    T, H, D = 5, 2, 3
    q, k, v = torch.randn(1, T, H, D), torch.randn(1, T, H, D), torch.randn(1, T, H, D)
    g = torch.tensor([-0.3, -1.2])
    o, _ = naive_recurrent_lightning_attn(q, k, v, g, scale=1.0)
    for t in range(T):
        for h in range(H):
            want = sum(math.exp(g[h].item() * (t - j)) * (q[0, t, h] @ k[0, j, h]).item() * v[0, j, h] for j in range(t + 1))
            assert torch.allclose(o[0, t, h], want, atol=1e-5)


@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, chunk, with_state):
    torch.manual_seed(T + chunk)
    B, H, D, Dv = 2, 3, 16, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    v = torch.randn(B, T, H, Dv)
    g = decay_slopes(H, 2, 8)
    s0 = torch.randn(B, H, D, Dv) if with_state else None
    o1, s1 = naive_recurrent_lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True)
    o2, s2 = naive_chunk_lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk)
    assert rel(o2, o1) < 1e-5 and rel(s2, s1) < 1e-5


def test_varlen_equals_per_sequence_loop():
    torch.manual_seed(1)
    lens, H, D = [5, 1, 33, 70], 2, 16
    T = sum(lens)
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    g = decay_slopes(H, 0, 4)
    s0 = torch.randn(len(lens), H, D, D)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o, s = naive_chunk_lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for n in range(len(lens)):
        a, b = cu[n].item(), cu[n + 1].item()
        on, sn = naive_recurrent_lightning_attn(q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=s0[n : n + 1],
                                          output_final_state=True)
        assert rel(o[:, a:b], on) < 1e-5 and rel(s[n : n + 1], sn) < 1e-5


def test_bf16_inputs_fp32_state():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    g = decay_slopes(2, 1, 4)
    ref, sref = naive_recurrent_lightning_attn(q, k, v, g, output_final_state=True)
    o, s = naive_chunk_lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(o, ref) < 2e-2 and rel(s, sref) < 2e-2


def test_gradients_agree():
    torch.manual_seed(3)
    B, T, H, D = 1, 23, 2, 8
    base = [torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3)] + [torch.randn(B, H, D, D, dtype=torch.float64)]
    g = decay_slopes(H, 1, 3).double()
    grads = []
    for fn, kw in ((naive_recurrent_lightning_attn, {}), (naive_chunk_lightning_attn, {"chunk_size": 8})):
        xs = [x.clone().requires_grad_() for x in base]
        o, s = fn(*xs[:3], g, initial_state=xs[3], output_final_state=True, **kw)
        (o.pow(2).sum() + s.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-5


def test_decode_matches_recurrent_step_and_skips_padding():
    torch.manual_seed(4)
    N, H, D, S = 3, 2, 8, 6
    pool = torch.randn(S, H, D, D)
    before = pool.clone()
    slots = torch.tensor([4, -1, 1])
    q, k, v = (torch.randn(N, H, D) for _ in range(3))
    g = decay_slopes(H, 0, 2)
    o = naive_lightning_decode(q, k, v, g, pool, slots)
    for n, s in enumerate(slots.tolist()):
        if s < 0:
            assert (o[n] == 0).all()
            continue
        want, st = naive_recurrent_lightning_attn(q[n][None, None], k[n][None, None], v[n][None, None], g,
                                            initial_state=before[s][None], output_final_state=True)
        assert rel(o[n], want[0, 0]) < 1e-6 and rel(pool[s], st[0]) < 1e-6
    untouched = [i for i in range(S) if i not in (4, 1)]
    assert torch.equal(pool[untouched], before[untouched])


def test_bad_inputs_raise():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="g must"):
        naive_chunk_lightning_attn(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        naive_chunk_lightning_attn(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), torch.zeros(2),
                               cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state"):
        naive_chunk_lightning_attn(q, q, q, torch.zeros(2), initial_state=torch.zeros(1, 2, 8, 4))
