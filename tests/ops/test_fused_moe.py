"""Fused decode MoE (Triton; the interpreter here, compiled on a GPU machine) vs `naive_moe` and the grouped-GEMM
path: odd H and I, unused experts, many tokens on one expert (several blocks), a repeated id in a row, fp32 and
bf16; the device-side alignment on its own; every buffer written (poisoned allocations); the same bits for a
token whatever batch it is in; NaN kept visible; bad arguments; and, on a GPU, capture in a CUDA graph."""

import pytest
import torch

from ringlinear.ops.moe import fused_moe as fm
from ringlinear.ops.moe import routed_experts
from ringlinear.ops.moe.fused_moe import FusedMoEConfig, align_by_expert, fused_moe, max_blocks
from ringlinear.ops.moe.naive import naive_moe

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles in the interpreter: several K steps, K and N tails
SMALL = FusedMoEConfig(gate_up_block_n=16, gate_up_block_k=32, down_block_n=32, down_block_k=16)


def rel(out, ref):
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _weights(E, H, ff, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wg = torch.randn(E, ff, H, generator=g) / H**0.5
    wu = torch.randn(E, ff, H, generator=g) / H**0.5
    wd = torch.randn(E, H, ff, generator=g) / ff**0.5
    return [t.to(DEV, dtype) for t in (wg, wu, wd)]


def _routing(T, H, E, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).sort(-1).values.to(DEV)
    w = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
    return x, idx, w


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# (T, H, ff, E, k): one token; unused experts; 17 tokens on 4 experts (blocks of several experts, more than
# block_m pairs on one); H and ff off every tile size; default tiles larger than H and ff
@pytest.mark.parametrize("T,H,ff,E,k,config", [
    (1, 64, 32, 16, 4, SMALL),
    (3, 48, 40, 64, 8, SMALL),
    (17, 100, 24, 4, 2, SMALL),
    (5, 72, 56, 16, 4, None),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(T, H, ff, E, k, config, dtype):
    wg, wu, wd = _weights(E, H, ff, dtype)
    x, idx, w = _routing(T, H, E, k, dtype)
    out = fused_moe(x, idx, w, wg, wu, wd, config=config)
    ref = naive_moe(x, idx, w, wg, wu, wd)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel(out, ref) < TOL[dtype]
    if dtype == torch.float32:  # the grouped-GEMM path it replaces
        assert rel(out, routed_experts(x, idx, w, wg, wu, wd)) < TOL[dtype]


def test_fused_moe_repeated_id_and_int32_ids():
    wg, wu, wd = _weights(8, 40, 24, torch.float32)
    x, _, w = _routing(3, 40, 8, 3, torch.float32)
    idx = torch.tensor([[2, 2, 5], [0, 7, 7], [5, 5, 5]], device=DEV)
    out = fused_moe(x, idx.int(), w, wg, wu, wd, config=SMALL)
    assert rel(out, naive_moe(x, idx, w, wg, wu, wd)) < 1e-5


@pytest.mark.parametrize("T,k,E,bm", [(1, 4, 16, 16), (17, 2, 4, 16), (9, 8, 64, 32), (6, 3, 5, 16), (256, 8, 256, 16)])
def test_alignment(T, k, E, bm):
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, E, (T, k), generator=g)
    if T == 6:
        idx[1, 2] = E  # out of range: left out
    sorted_ids, block_expert = align_by_expert(idx.to(DEV), E, bm)
    sorted_ids, block_expert = sorted_ids.cpu().long(), block_expert.cpu().long()
    nb = max_blocks(T, k, E, bm)
    assert block_expert.shape == (nb,) and sorted_ids.shape == (nb * bm,)
    flat = idx.view(-1)
    used = block_expert >= 0
    assert used.long().cumprod(0).sum() == used.sum()  # the used blocks come first
    n_used = int(used.sum())
    for e in range(E):
        mine = (flat == e).nonzero().view(-1)
        blocks = (block_expert == e).nonzero().view(-1)
        assert len(blocks) == -(-len(mine) // bm)  # whole blocks, no spare one
        if len(blocks):
            assert (blocks.diff() == 1).all()
            slots = sorted_ids.view(nb, bm)[blocks].view(-1)
            assert torch.equal(slots[: len(mine)], mine)  # this expert's pairs, ascending
            assert (slots[len(mine) :] == T * k).all()  # then padding
    assert sorted(block_expert[:n_used].tolist()) == block_expert[:n_used].tolist()


def test_fused_moe_writes_every_buffer(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    wg, wu, wd = _weights(16, 48, 40, torch.float32)
    x, idx, w = _routing(17, 48, 16, 4, torch.float32)
    ref = naive_moe(x, idx, w, wg, wu, wd)
    monkeypatch.setattr(fm, "_empty", poisoned)
    assert rel(fused_moe(x, idx, w, wg, wu, wd, config=SMALL), ref) < 1e-5
    out = torch.full((17, 48), float("nan"), device=DEV)
    assert fused_moe(x, idx, w, wg, wu, wd, out=out, config=SMALL) is out
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_is_batch_invariant(dtype):
    T, H, ff, E, k = 19, 48, 40, 8, 4
    wg, wu, wd = _weights(E, H, ff, dtype)
    x, idx, w = _routing(T, H, E, k, dtype)
    out = fused_moe(x, idx, w, wg, wu, wd, config=SMALL)
    for t in (0, 11, 18):  # alone, and at other rows of other blocks
        assert torch.equal(fused_moe(x[t : t + 1], idx[t : t + 1], w[t : t + 1], wg, wu, wd, config=SMALL),
                           out[t : t + 1])
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(2)).to(DEV)[:7]
    assert torch.equal(fused_moe(x[perm], idx[perm], w[perm], wg, wu, wd, config=SMALL), out[perm])


def test_fused_moe_nan_token_stays_nan_and_alone():
    wg, wu, wd = _weights(4, 32, 24, torch.float32)
    x, idx, w = _routing(6, 32, 4, 2, torch.float32)
    clean = fused_moe(x, idx, w, wg, wu, wd, config=SMALL)
    x[3, 5] = float("nan")
    out = fused_moe(x, idx, w, wg, wu, wd, config=SMALL)
    assert torch.isnan(out[3]).all()
    keep = torch.tensor([0, 1, 2, 4, 5], device=DEV)
    assert torch.equal(out[keep], clean[keep])


def test_fused_moe_empty_batch():
    wg, wu, wd = _weights(4, 32, 24, torch.float32)
    x, idx, w = torch.zeros(0, 32, device=DEV), torch.zeros(0, 2, dtype=torch.long, device=DEV), torch.zeros(0, 2)
    assert fused_moe(x, idx, w.to(DEV), wg, wu, wd).shape == (0, 32)


def test_fused_moe_bad_arguments():
    wg, wu, wd = _weights(4, 32, 24, torch.float32)
    x, idx, w = _routing(2, 32, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(x, idx, w, wg, wu, wd.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="w_gate is torch.bfloat16"):
        fused_moe(x, idx, w, wg.bfloat16(), wu, wd)
    with pytest.raises(ValueError, match="w_up needs a unit stride"):
        fused_moe(x, idx, w, wg, wu.transpose(1, 2).contiguous().transpose(1, 2), wd)
    with pytest.raises(ValueError, match="topk_weight"):
        fused_moe(x, idx, w[:, :1], wg, wu, wd)
    with pytest.raises(ValueError, match="topk_idx must be int32 or int64"):
        fused_moe(x, idx.float(), w, wg, wu, wd)
    with pytest.raises(ValueError, match="config.gate_up_block_k"):
        fused_moe(x, idx, w, wg, wu, wd, config=FusedMoEConfig(gate_up_block_k=48))
    with pytest.raises(ValueError, match="MAX_PAIRS"):
        fused_moe(x.new_zeros(2049, 32), idx.new_zeros(2049, 4), w.new_zeros(2049, 4), wg, wu, wd)
    with pytest.raises(ValueError, match="out must be"):
        fused_moe(x, idx, w, wg, wu, wd, out=torch.empty(2, 31, device=DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_router_and_moe_replay_in_a_cuda_graph():
    from ringlinear.ops.moe.fused_routing import fused_router_topk, router_counters

    T, H, ff, E = 8, 256, 128, 64
    wg, wu, wd = _weights(E, H, ff, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    rw = (torch.randn(E, H, generator=g) / H**0.5).cuda()
    bias = (0.1 * torch.randn(E, generator=g)).cuda()
    x = torch.randn(T, H, generator=g).cuda().bfloat16()
    counters = router_counters(T, "cuda")

    def step():
        idx, w = fused_router_topk(x, rw, bias, 8, 8, 4, True, 2.5, counters=counters)
        return fused_moe(x, idx, w, wg, wu, wd)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (6, 7):
        x.copy_(torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).cuda().bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())
