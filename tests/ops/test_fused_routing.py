"""Fused router kernel (Triton; the interpreter here, compiled on a GPU machine) vs `naive_router_topk`: the same
experts on fresh random inputs, weights to fp32 rounding, exact agreement on exact ties (lower index wins), the
same bits for a token whatever batch it is in, every output element written, NaN kept visible, bad arguments."""

import pytest
import torch

from ringlinear.ops.moe import fused_routing
from ringlinear.ops.moe.fused_routing import RouterConfig, fused_router_topk, router_counters
from ringlinear.ops.moe.naive import naive_router_topk
from ringlinear.ops.moe.routing import grouped_topk

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(T, H, E, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    w = (torch.randn(E, H, generator=g) / H**0.5).to(DEV)
    b = (0.1 * torch.randn(E, generator=g)).to(DEV) if bias else None
    return x, w, b


def _check_weights(wt, ref):
    assert torch.isfinite(wt).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(wt, ref, rtol=2e-6, atol=1e-7)


# (T, H, E, top_k, n_group, topk_group): the tiny preset, Ring-mini's routing, odd H (not a multiple of the H tile,
# more than one H split), E not a power of two with groups not a power of two, top_k 1, one group, 512 experts
CASES = [
    (1, 64, 16, 4, 4, 2),
    (17, 100, 16, 4, 4, 2),
    (3, 300, 256, 8, 8, 4),
    (20, 96, 48, 6, 6, 3),
    (5, 40, 24, 1, 1, 1),
    (4, 48, 40, 3, 1, 1),
    (2, 32, 512, 8, 8, 4),
]


@pytest.mark.parametrize("T,H,E,k,G,TG", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_reference(T, H, E, k, G, TG, dtype):
    x, w, b = _inputs(T, H, E, dtype, bias=(E % 3 != 0))
    idx, wt = fused_router_topk(x, w, b, k, G, TG, True, 2.5)
    ref_idx, ref_wt = naive_router_topk(x, w, b, k, G, TG, True, 2.5)
    assert idx.dtype == torch.int64 and wt.dtype == torch.float32 and idx.shape == wt.shape == (T, k)
    assert torch.equal(idx, ref_idx)
    assert (idx.diff(dim=1) > 0).all()
    _check_weights(wt, ref_wt)
    if k == 1:  # renormalised even for one expert: the weight is the scale
        assert torch.equal(wt, torch.full_like(wt, 2.5))
    else:  # random scores: the existing torch path picks the same experts
        assert torch.equal(idx, grouped_topk(x.float() @ w.T, b, k, G, TG, True, 2.5)[0])


def test_router_without_renormalisation():
    x, w, b = _inputs(9, 64, 32, torch.float32)
    idx, wt = fused_router_topk(x, w, b, 4, 4, 2, False, 1.5)
    ref_idx, ref_wt = naive_router_topk(x, w, b, 4, 4, 2, False, 1.5)
    assert torch.equal(idx, ref_idx)
    _check_weights(wt, ref_wt)
    torch.testing.assert_close(wt, 1.5 * torch.sigmoid(x @ w.T).gather(1, idx), rtol=2e-6, atol=1e-7)


def test_router_ties_go_to_the_lower_index():
    E, G, TG, k = 16, 4, 2, 4
    x = torch.zeros(3, 32, device=DEV)  # every score is sigmoid(0) = 0.5 exactly
    w = torch.randn(E, 32, device=DEV)
    idx, wt = fused_router_topk(x, w, None, k, G, TG, True, 1.0)
    assert (idx == torch.arange(k, device=DEV)).all()  # all tied: group 0, its experts in order
    assert (wt == 0.25).all()
    # dyadic biases: choice and group sums are exact, with ties inside and across groups
    b = torch.tensor([0, .5, .5, 0, .25, .5, .5, .25, .5, 0, .5, .5, .25, .25, .25, .25], device=DEV)
    for n_group, topk_group, top_k in ((4, 2, 4), (4, 1, 3), (1, 1, 5), (8, 3, 4)):
        idx, _ = fused_router_topk(x, w, b, top_k, n_group, topk_group, True, 1.0)
        assert torch.equal(idx, naive_router_topk(x, w, b, top_k, n_group, topk_group)[0])
    # biased scores (0.5 + b): groups 0, 1, 2 have top-2 sums 1 + 1 = 2, group 3 has 1.5; the tie keeps groups 0 and 1,
    # whose four experts at 1.0 are 1, 2, 5, 6
    assert (fused_router_topk(x, w, b, 4, 4, 2)[0] == torch.tensor([1, 2, 5, 6], device=DEV)).all()


def test_router_ties_between_integer_logits():
    # one-hot tokens and integer weights give integer logits in {0, 1, 2}, identical in any summation order: the
    # scores of equal logits are equal bits in either implementation and unequal ones are far apart
    T, H, E = 24, 8, 32
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.one_hot(torch.randint(0, H, (T,), generator=g), H).float().to(DEV)
    w = torch.randint(0, 3, (E, H), generator=g).float().to(DEV)
    for n_group, topk_group, top_k in ((8, 4, 8), (4, 2, 6), (1, 1, 8)):
        idx, wt = fused_router_topk(x, w, None, top_k, n_group, topk_group, True, 2.5)
        ref_idx, ref_wt = naive_router_topk(x, w, None, top_k, n_group, topk_group, True, 2.5)
        assert torch.equal(idx, ref_idx)
        _check_weights(wt, ref_wt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_is_batch_invariant(dtype):
    T, H, E = 37, 300, 64
    x, w, b = _inputs(T, H, E, dtype)
    idx, wt = fused_router_topk(x, w, b, 8, 8, 4, True, 2.5)
    for t in (0, 16, 36):  # alone, at a different position of its tile
        i1, w1 = fused_router_topk(x[t : t + 1], w, b, 8, 8, 4, True, 2.5)
        assert torch.equal(i1, idx[t : t + 1]) and torch.equal(w1, wt[t : t + 1])
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1)).to(DEV)
    i2, w2 = fused_router_topk(x[perm][:20], w, b, 8, 8, 4, True, 2.5)  # other neighbours, another batch size
    assert torch.equal(i2, idx[perm][:20]) and torch.equal(w2, wt[perm][:20])


def test_router_counters_are_left_zero_for_reuse():
    x, w, b = _inputs(40, 64, 16, torch.float32)
    counters = router_counters(64, DEV)
    first = fused_router_topk(x, w, b, 4, 4, 2, counters=counters)
    assert (counters == 0).all()
    second = fused_router_topk(x[:7], w, b, 4, 4, 2, counters=counters)
    assert (counters == 0).all()
    assert torch.equal(second[0], first[0][:7]) and torch.equal(second[1], first[1][:7])


def test_router_writes_every_output(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, -7 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=device)

    x, w, b = _inputs(19, 96, 32, torch.float32)
    ref_idx, ref_wt = naive_router_topk(x, w, b, 4, 4, 2, True, 2.5)
    monkeypatch.setattr(fused_routing, "_empty", poisoned)
    idx, wt = fused_router_topk(x, w, b, 4, 4, 2, True, 2.5, config=RouterConfig(block_h=32, split_h=64))
    assert torch.equal(idx, ref_idx)
    _check_weights(wt, ref_wt)


def test_router_nan_token_stays_nan_and_alone():
    x, w, b = _inputs(5, 64, 16, torch.float32)
    clean = fused_router_topk(x, w, b, 4, 4, 2)
    x[2, 7] = float("nan")
    idx, wt = fused_router_topk(x, w, b, 4, 4, 2)
    assert torch.isnan(wt[2]).all()
    assert ((idx[2] >= 0) & (idx[2] < 16)).all()
    keep = torch.tensor([0, 1, 3, 4], device=DEV)
    assert torch.equal(idx[keep], clean[0][keep]) and torch.equal(wt[keep], clean[1][keep])


def test_router_empty_batch():
    x, w, b = _inputs(0, 64, 16, torch.float32)
    idx, wt = fused_router_topk(x, w, b, 4, 4, 2)
    assert idx.shape == wt.shape == (0, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), "top_k"),  # more than topk_group * group size = 8
    (dict(n_group=3), "n_group"),
    (dict(n_group=16, topk_group=8, top_k=4), "n_group"),  # one expert per group
    (dict(topk_group=5), "topk_group"),
    (dict(bias=torch.zeros(15)), "expert_bias"),
    (dict(counters=torch.zeros(1, dtype=torch.int64)), "counters"),
    (dict(config=RouterConfig(block_e=24)), "block_e"),
    (dict(config=RouterConfig(split_h=100)), "split_h"),
])
def test_router_bad_arguments(kwargs, match):
    x, w, b = _inputs(3, 64, 16, torch.float32)
    args = dict(top_k=4, n_group=4, topk_group=2, bias=b)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=match):
        fused_router_topk(x, w, args["bias"], args["top_k"], args["n_group"], args["topk_group"], **kwargs)


@pytest.mark.parametrize("T,H,E,k,G,TG", CASES[:4])
def test_router_gemm_logits_mode_matches_reference(T, H, E, k, G, TG):
    """The "gemm" mode (logits from one fp32 GEMM, then the choice kernel) chooses as the reference does."""
    from ringlinear.ops.moe.fused_routing import RouterConfig

    x, w, b = _inputs(T, H, E, torch.float32, bias=True)
    idx, wt = fused_router_topk(x, w, b, k, G, TG, True, 2.5, config=RouterConfig(logits="gemm"))
    ref_idx, ref_wt = naive_router_topk(x, w, b, k, G, TG, True, 2.5)
    assert torch.equal(idx, ref_idx)
    _check_weights(wt, ref_wt)
    with pytest.raises(ValueError, match="config.logits='cublas' must be 'fused', 'split' or 'gemm'"):
        fused_router_topk(x, w, b, k, G, TG, True, 2.5, config=RouterConfig(logits="cublas"))


@pytest.mark.parametrize("mode", ["gemm", "split"])
@pytest.mark.parametrize("T,H,E,k,G,TG", CASES)
def test_router_choice_kernel_modes_full_contract(T, H, E, k, G, TG, mode, monkeypatch):
    """The one-token-per-program choice after cuBLAS logits ("gemm") or split-H partials ("split", batch-invariant):
    the reference's experts and weights on every case (poisoned outputs: every slot written), ties to the lower
    index, a NaN token picks distinct experts with NaN weights."""
    from ringlinear.ops.moe.fused_routing import RouterConfig

    cfg = RouterConfig(logits=mode, block_h=32, split_h=64)

    def poisoned(shape, dtype, device):
        return torch.full(shape, -7 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused_routing, "_empty", poisoned)
    x, w, b = _inputs(T, H, E, torch.float32, bias=(E % 3 != 0))
    idx, wt = fused_router_topk(x, w, b, k, G, TG, True, 2.5, config=cfg)
    ref_idx, ref_wt = naive_router_topk(x, w, b, k, G, TG, True, 2.5)
    assert torch.equal(idx, ref_idx)
    _check_weights(wt, ref_wt)
    xt = torch.zeros(3, H, device=DEV)  # every score 0.5: all ties
    idx, _ = fused_router_topk(xt, w, None, k, G, TG, True, 2.5, config=cfg)
    assert torch.equal(idx, naive_router_topk(xt, w, None, k, G, TG, True, 2.5)[0])
    x[0, 0] = float("nan")
    idx, wt = fused_router_topk(x, w, b, k, G, TG, True, 2.5, config=cfg)
    assert torch.isnan(wt[0]).all() and idx[0].unique().numel() == k and ((idx[0] >= 0) & (idx[0] < E)).all()


def test_router_split_mode_is_batch_invariant():
    from ringlinear.ops.moe.fused_routing import RouterConfig

    cfg = RouterConfig(logits="split", block_h=32, split_h=64)
    x, w, b = _inputs(37, 300, 64, torch.float32)
    idx, wt = fused_router_topk(x, w, b, 8, 8, 4, True, 2.5, config=cfg)
    for t in (0, 16, 36):
        i1, w1 = fused_router_topk(x[t : t + 1], w, b, 8, 8, 4, True, 2.5, config=cfg)
        assert torch.equal(i1, idx[t : t + 1]) and torch.equal(w1, wt[t : t + 1])
