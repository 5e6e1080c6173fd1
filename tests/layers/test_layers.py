import itertools

import pytest
import torch

from ringlinear.layers.norms import GroupRMSNorm, RMSNorm
from ringlinear.layers.rotary import RotaryEmbedding
from ringlinear.ops.moe import grouped_topk, routed_experts


def test_group_norm_normalises_each_group_and_differs_from_plain():
    torch.manual_seed(0)
    x = torch.randn(5, 4 * 8) * torch.tensor([1.0, 10.0, 0.1, 3.0]).repeat_interleave(8)
    gn, plain = GroupRMSNorm(32, groups=4, eps=1e-6), RMSNorm(32, eps=1e-6)
    y = gn(x)
    for j in range(4):
        part = x[:, j * 8 : (j + 1) * 8]
        assert torch.allclose(y[:, j * 8 : (j + 1) * 8], part / part.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), atol=1e-6)
    assert not torch.allclose(y, plain(x), atol=1e-3)


def test_rope_identity_at_zero_and_relative():
    torch.manual_seed(1)
    rope = RotaryEmbedding(rotary_dim=8, theta=10000.0)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    assert torch.allclose(rope(q, torch.tensor([0])), q)
    # Rotated dims: the dot product depends only on the offset; untouched dims pass through.
    def dot(m, n):
        return (rope(q, torch.tensor([m]))[..., :8] * rope(k, torch.tensor([n]))[..., :8]).sum()
    assert torch.allclose(dot(5, 2), dot(13, 10), atol=1e-4)
    assert torch.equal(rope(q, torch.tensor([7]))[..., 8:], q[..., 8:])


def _routing_by_hand(logits, bias, k, n_group, topk_group, scale):
    T, E = logits.shape
    s = torch.sigmoid(logits)
    b = s + bias
    per = E // n_group
    idx_all, w_all = [], []
    for t in range(T):
        gscore = [sorted(b[t, g * per : (g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(gscore[g]))[:topk_group]
        cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(sorted(cand, key=lambda e: -b[t, e].item())[:k])
        w = s[t, chosen]
        idx_all.append(chosen)
        w_all.append(w / w.sum() * scale)
    return torch.tensor(idx_all), torch.stack(w_all)


def test_grouped_topk_matches_definition():
    torch.manual_seed(2)
    logits, bias = torch.randn(50, 16), torch.randn(16) * 0.3
    idx, w = grouped_topk(logits, bias, top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    ridx, rw = _routing_by_hand(logits, bias, 4, 4, 2, 2.5)
    assert torch.equal(idx, ridx)
    assert torch.allclose(w, rw, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((50,), 2.5))


def test_bias_changes_choice_not_weights():
    torch.manual_seed(3)
    logits = torch.randn(8, 16)
    bias = torch.zeros(16)
    bias[3] = 100.0
    idx, w = grouped_topk(logits, bias, 4, 4, 2, True, 1.0)
    assert (idx == 3).any(-1).all()
    s = torch.sigmoid(logits)
    assert torch.allclose(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True))


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (37, 8, 3)])
def test_routed_experts_match_token_loop(T, E, k):
    torch.manual_seed(T)
    H, Iw = 12, 20
    x = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:k].sort().values for _ in range(T)])
    w = torch.rand(T, k)
    wg, wu, wd = torch.randn(E, Iw, H), torch.randn(E, Iw, H), torch.randn(E, H, Iw)
    out = routed_experts(x, idx, w, wg, wu, wd)
    for t, j in itertools.product(range(T), range(1)):
        ref = sum(w[t, j] * (wd[e] @ (torch.nn.functional.silu(wg[e] @ x[t]) * (wu[e] @ x[t])))
                  for j, e in enumerate(idx[t].tolist()))
        assert torch.allclose(out[t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lens", [[5, 1, 23, 8], [16], [0, 7, 3]])
def test_padded_causal_attention_matches_per_sequence(lens):
    """The padded single-call attention (used on the GPU for fp32 packed batches) == one SDPA call per sequence,
    values and gradients, GQA, a length-1 and an empty sequence."""
    from ringlinear.ops.attention import causal_attention, padded_causal_attention

    torch.manual_seed(0)
    T, H, Hkv, D = sum(lens), 4, 2, 16
    q, k, v = (torch.randn(T, h, D, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    do = torch.randn(T, H, D, dtype=torch.float64)
    b = [0, *torch.tensor(lens).cumsum(0).tolist()]
    o = padded_causal_attention(q, k, v, b, max(lens), D**-0.5)
    ref = torch.cat([causal_attention(q[x:y], k[x:y], v[x:y], D**-0.5) for x, y in zip(b, b[1:]) if y > x])
    torch.testing.assert_close(o, ref)
    for a, r in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, r)


def test_moe_decode_path_takes_the_fused_kernels_and_matches(monkeypatch):
    """A decode step's MoE (no grad, Triton backend) runs the fused router + experts and equals the grouped path."""
    import ringlinear.ops.moe.fused_moe as fm
    from ringlinear.config import preset
    from ringlinear.layers.moe import MoE
    from ringlinear.ops.backend import use_backend

    cfg = preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg).float()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.expert_bias.normal_(0, 0.1)
    x = torch.randn(5, cfg.hidden_size)
    calls = []
    real = fm.fused_moe
    monkeypatch.setattr(fm, "fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), use_backend("triton"):
        fused = moe(x, decode=True)
        grouped = moe(x)
    assert calls == [1]
    assert ((fused - grouped).norm() / grouped.norm()).item() < 1e-5


@pytest.mark.parametrize("norm", [True, False])
def test_top1_routing_renormalises_when_norm_topk_prob(norm):
    """k = 1 follows norm_topk_prob as SGLang and vLLM do: renormalised, the one weight is routed_scaling_factor;
    otherwise it is the chosen expert's sigmoid score times the factor."""
    torch.manual_seed(4)
    logits = torch.randn(20, 16)
    idx, w = grouped_topk(logits, None, 1, 4, 2, norm, 2.5)
    want = torch.full((20, 1), 2.5) if norm else torch.sigmoid(logits).gather(1, idx) * 2.5
    torch.testing.assert_close(w, want)
