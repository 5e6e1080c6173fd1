"""Triton Lightning kernels (chunked prefill fwd/bwd, decode) against the PyTorch references.

On the CPU they run under TRITON_INTERPRET=1 (tests/ops/conftest.py) at small sizes; `-m gpu` checks run
the compiled kernels at realistic sizes on a CUDA device.
"""

import os

import pytest
import torch

from ringlinear.ops.lightning import (
    decay_slopes,
    lightning_attn,
    lightning_decode,
    naive_chunk_lightning_attn,
    naive_lightning_decode,
    naive_recurrent_lightning_attn,
)
from ringlinear.ops.lightning.chunk import chunk_lightning_attn
from ringlinear.ops.lightning.fused_recurrent import fused_recurrent_lightning_decode

needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
pytestmark = needs_kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the kernel's result"
    assert torch.isfinite(ref).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, D, Dv, dtype, with_state, n_states=None, device=DEV, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=gen) * 0.5 for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen)
    s0 = torch.randn(n_states or B, H, D, Dv, generator=gen) if with_state else None
    cast = lambda x: x.to(device=device, dtype=dtype)
    return cast(q), cast(k), cast(v), (s0.to(device) if s0 is not None else None)


def _fwd_bwd(fn, q, k, v, g, s0, cu=None, **kw):
    """Run fn on fresh leaves; loss weights o and the final state by fixed random tensors."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s0l = s0.detach().clone().requires_grad_() if s0 is not None else None
    o, s = fn(*leaves, g, initial_state=s0l, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(123)
    wo = torch.randn(o.shape, generator=gen).to(o.device)
    ws = torch.randn(s.shape, generator=gen).to(s.device)
    ((o.float() * wo).sum() + (s * ws).sum()).backward()
    grads = [x.grad for x in leaves] + ([s0l.grad] if s0l is not None else [])
    return o.detach(), s.detach(), grads


CASES = [  # B, T, H, D, Dv, dtype, with_state, seg_chunks
    (1, 1, 2, 16, 16, torch.float32, False, None),
    (2, 37, 1, 16, 32, torch.float32, True, 1),
    (1, 64, 3, 32, 16, torch.float32, True, None),
    (2, 130, 2, 32, 32, torch.float32, False, 1),
    (1, 257, 2, 16, 16, torch.float32, True, 2),
    (2, 200, 2, 32, 32, torch.float32, True, 3),
    (1, 1, 1, 32, 32, torch.bfloat16, True, None),
    (2, 100, 2, 32, 32, torch.bfloat16, True, None),
    (1, 190, 3, 16, 32, torch.bfloat16, False, 1),
]


@pytest.mark.parametrize("B,T,H,D,Dv,dtype,with_state,seg_chunks", CASES)
def test_chunk_matches_reference(B, T, H, D, Dv, dtype, with_state, seg_chunks):
    q, k, v, s0 = _inputs(B, T, H, D, Dv, dtype, with_state, seed=T + D)
    g = decay_slopes(H, 1, 4).to(DEV)
    o, s, grads = _fwd_bwd(chunk_lightning_attn, q, k, v, g, s0, seg_chunks=seg_chunks)
    ro, rs, rgrads = _fwd_bwd(naive_chunk_lightning_attn, q, k, v, g, s0)
    assert o.dtype == dtype and o.shape == (B, T, H, Dv) and s.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(o, ro) < tol and rel(s, rs) < tol
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), grads, rgrads):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < tol, name


def test_strong_decay_and_custom_scale():
    # Steep decay (exp(g * 63) ~ 1e-55 underflows) and an explicit scale: no inf/nan, matches the recurrence.
    q, k, v, s0 = _inputs(1, 150, 2, 16, 16, torch.float32, True, seed=5)
    g = torch.tensor([-2.0, -0.01], device=DEV)
    o, s = chunk_lightning_attn(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True)
    ro, rs = naive_recurrent_lightning_attn(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True)
    assert rel(o, ro) < 1e-4 and rel(s, rs) < 1e-4


def test_final_state_only_gradient_and_no_final_state():
    q, k, v, s0 = _inputs(1, 70, 2, 16, 16, torch.float32, True, seed=6)
    g = decay_slopes(2, 0, 4).to(DEV)
    o, s = chunk_lightning_attn(q, k, v, g, initial_state=s0)
    assert s is None
    grads = []
    for fn in (chunk_lightning_attn, naive_chunk_lightning_attn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
        _, st = fn(*leaves[:3], g, initial_state=leaves[3], output_final_state=True)
        st.pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    assert grads[0][0] is None and grads[1][0] is None  # q reaches the loss only through o
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_matches_per_sequence_loop(dtype):
    lens = [5, 0, 70, 1, 131]
    T, H, D = sum(lens), 2, 16
    q, k, v, s0 = _inputs(1, T, H, D, D, dtype, True, n_states=len(lens), seed=7)
    g = decay_slopes(H, 2, 4).to(DEV)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    o, s, grads = _fwd_bwd(chunk_lightning_attn, q, k, v, g, s0, cu=cu, seg_chunks=1)
    tol = TOL[dtype]
    for n in range(len(lens)):
        a, b = cu[n].item(), cu[n + 1].item()
        on, sn = naive_chunk_lightning_attn(q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=s0[n : n + 1],
                                        output_final_state=True)
        assert rel(s[n : n + 1], sn) < tol
        if b > a:
            assert rel(o[:, a:b], on) < tol
    # gradients: the packed call against the packed reference (itself a per-sequence loop)
    _, _, rgrads = _fwd_bwd(naive_chunk_lightning_attn, q, k, v, g, s0, cu=cu)
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < tol


def test_dispatcher_forced_triton(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    q, k, v, s0 = _inputs(1, 40, 2, 16, 16, torch.float32, True, seed=8)
    g = decay_slopes(2, 1, 4).to(DEV)
    o, s = lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True)
    ro, rs = naive_recurrent_lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True)
    assert rel(o, ro) < 1e-4 and rel(s, rs) < 1e-4
    pool = torch.randn(3, 2, 16, 16, device=DEV)
    ref_pool = pool.clone()
    slots = torch.tensor([2, 0], device=DEV)
    od = lightning_decode(q[0, :2], k[0, :2], v[0, :2], g, pool, slots)
    rd = naive_lightning_decode(q[0, :2], k[0, :2], v[0, :2], g, ref_pool, slots)
    assert rel(od, rd) < 1e-5 and rel(pool, ref_pool) < 1e-6


@pytest.mark.parametrize("dtype,D,Dv", [(torch.float32, 16, 16), (torch.float32, 32, 16), (torch.bfloat16, 32, 64)])
def test_decode_matches_torch_with_padding(dtype, D, Dv):
    gen = torch.Generator().manual_seed(D + Dv)
    N, H, S = 5, 3, 8
    x = torch.randn(N, H, 3 * D + Dv, generator=gen).to(DEV, dtype)
    q, k, v = x[..., :D], x[..., D : 2 * D], x[..., 2 * D : 2 * D + Dv]  # strided views, as in a fused qkv
    pool = torch.randn(S, H, D, Dv, generator=gen).to(DEV)
    ref_pool = pool.clone()
    slots = torch.tensor([6, -1, 0, 3, -5], device=DEV)
    g = decay_slopes(H, 3, 8).to(DEV)
    o = fused_recurrent_lightning_decode(q, k, v, g, pool, slots)
    ro = naive_lightning_decode(q, k, v, g, ref_pool, slots)
    assert o.dtype == dtype and o.shape == (N, H, Dv)
    assert (o[1] == 0).all() and (o[4] == 0).all()
    assert rel(o, ro) < TOL[dtype]
    assert rel(pool[[6, 0, 3]], ref_pool[[6, 0, 3]]) < 1e-6
    untouched = [i for i in range(S) if i not in (6, 0, 3)]
    assert torch.equal(pool[untouched], ref_pool[untouched])


def test_prefill_equals_decode_steps():
    # T single-token decode steps from a state equal one prefill from that state (outputs and state).
    T, H, D = 9, 2, 16
    q, k, v, s0 = _inputs(1, T, H, D, D, torch.float32, True, seed=9)
    g = decay_slopes(H, 1, 4).to(DEV)
    o, s = chunk_lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True)
    pool = s0.clone()
    slots = torch.tensor([0], device=DEV)
    steps = [fused_recurrent_lightning_decode(q[:, t], k[:, t], v[:, t], g, pool, slots) for t in range(T)]
    assert rel(torch.stack(steps, 1), o) < 1e-5 and rel(pool, s) < 1e-5


def test_bad_inputs_raise():
    q = torch.randn(1, 4, 2, 16, device=DEV)
    g = torch.full((2,), -0.1, device=DEV)
    with pytest.raises(ValueError, match="g must"):
        chunk_lightning_attn(q, q, q, torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_lightning_attn(q, q, q, g, initial_state=torch.zeros(1, 2, 16, 8, device=DEV))
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_lightning_attn(q, q, q, g, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="float64"):
        chunk_lightning_attn(q.double(), q.double(), q.double(), g)
    big = torch.randn(1, 2, 1, 512, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        chunk_lightning_attn(big, big, big, torch.full((1,), -0.1, device=DEV))
    with pytest.raises(ValueError, match="g must not require grad"):
        chunk_lightning_attn(q, q, q, g.clone().requires_grad_())
    pool = torch.zeros(2, 2, 16, 16, device=DEV)
    with pytest.raises(ValueError, match="float32"):
        fused_recurrent_lightning_decode(q[0], q[0], q[0], g, pool.bfloat16(), torch.tensor([0, 1, 0, 1], device=DEV))
    with pytest.raises(ValueError, match="slots"):
        fused_recurrent_lightning_decode(q[0], q[0], q[0], g, pool, torch.tensor([0], device=DEV))


# ---------------------------------------------------------------------------------------------------------
# Device checks at realistic sizes (compiled kernels, autotuned configs).
# ---------------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_chunk_fwd_bwd_realistic(dtype):
    B, T, H, D = 2, 4096 + 17, 16, 128
    q, k, v, s0 = _inputs(B, T, H, D, D, dtype, True, device="cuda", seed=11)
    g = decay_slopes(H, 1, 20).cuda()
    o, s, grads = _fwd_bwd(chunk_lightning_attn, q, k, v, g, s0)
    ro, rs, rgrads = _fwd_bwd(naive_chunk_lightning_attn, q, k, v, g, s0)
    tol = TOL[dtype]
    assert rel(o, ro) < tol and rel(s, rs) < tol
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), grads, rgrads):
        assert rel(a, b) < tol, name


@gpu
@needs_cuda
def test_gpu_varlen_realistic():
    lens = [1, 3000, 64, 777, 0, 4096]
    T, H, D = sum(lens), 16, 128
    q, k, v, s0 = _inputs(1, T, H, D, D, torch.bfloat16, True, n_states=len(lens), device="cuda", seed=12)
    g = decay_slopes(H, 5, 20).cuda()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    o, s, grads = _fwd_bwd(chunk_lightning_attn, q, k, v, g, s0, cu=cu)
    ro, rs, rgrads = _fwd_bwd(naive_chunk_lightning_attn, q, k, v, g, s0, cu=cu)
    assert rel(o, ro) < 1e-2 and rel(s, rs) < 1e-2
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < 1e-2


@gpu
@needs_cuda
def test_gpu_decode_realistic():
    N, H, D, S = 256, 16, 128, 300
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(N, H, D, generator=gen).cuda().bfloat16() for _ in range(3))
    pool = torch.randn(S, H, D, D, generator=gen).cuda()
    ref_pool = pool.clone()
    slots = torch.randperm(S, generator=gen)[:N].cuda()
    slots[::17] = -1
    g = decay_slopes(H, 1, 20).cuda()
    o = fused_recurrent_lightning_decode(q, k, v, g, pool, slots)
    ro = naive_lightning_decode(q, k, v, g, ref_pool, slots)
    assert rel(o, ro) < 1e-2 and rel(pool, ref_pool) < 1e-6
    assert (o[::17] == 0).all()


def test_host_bounds_and_cached_segment_plan():
    """cu_seqlens given also as a host list: same outputs and gradients, no read-back; the segment plan is reused
    across calls (one copy per batch) and equals the plain construction; a host list that disagrees in length fails."""
    from ringlinear.ops.lightning import chunk

    q, k, v, _ = _inputs(1, 150, 2, 16, 16, torch.float32, False)
    g = decay_slopes(2, 0, 4).to(DEV)
    bounds = [0, 7, 7, 90, 150]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    ref = _fwd_bwd(chunk_lightning_attn, q, k, v, g, None, cu)
    chunk._PLANS.clear()
    out = _fwd_bwd(lambda *a, **kw: chunk_lightning_attn(*a, cu_seqlens_host=bounds, **kw), q, k, v, g, None, cu)
    for a, b in zip([out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]]):
        assert torch.equal(a, b)
    assert len(chunk._PLANS) == 1  # forward and backward shared one plan
    first, seq, n = chunk._segment_plan(tuple(bounds), 64, torch.device(DEV))
    counts = [-(-(b - a) // 64) for a, b in zip(bounds, bounds[1:])]
    assert first.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()] and n == sum(counts)
    assert seq.tolist() == [i for i, c in enumerate(counts) for _ in range(c)]
    with pytest.raises(ValueError, match="cu_seqlens_host has 3 bounds"):
        chunk_lightning_attn(q, k, v, g, cu_seqlens=cu, cu_seqlens_host=[0, 7, 150])
