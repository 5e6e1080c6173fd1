"""Speculative decoding's linear-layer passes: verify (L tokens, state read only) and commit (state advanced by the
accepted tokens), Triton (interpreter on the CPU) against the references, and both against L plain decode steps:
the same outputs and, after commit, the same states, bit for bit in fp32."""

import pytest
import torch

from ringlinear.ops.lightning import (
    lightning_commit,
    lightning_verify,
    naive_lightning_commit,
    naive_lightning_decode,
    naive_lightning_verify,
)
from ringlinear.ops.lightning.fused_recurrent import (
    fused_recurrent_lightning_commit,
    fused_recurrent_lightning_decode,
    fused_recurrent_lightning_verify,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, L, H, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, L, H, D, generator=g).to(DEV, dtype) for _ in range(2))
    v = torch.randn(N, L, H, Dv, generator=g).to(DEV, dtype)
    decay = -torch.rand(H, generator=g).to(DEV) * 0.5
    pool = torch.randn(N + 3, H, D, Dv, generator=g).to(DEV)
    slots = torch.randperm(N + 3, generator=g)[:N].to(DEV)
    if N > 1:
        slots[1] = -1  # padding row
    return q, k, v, decay, pool, slots


@pytest.mark.parametrize("N,L,H,D,Dv,dtype", [(3, 4, 2, 16, 32, torch.float32), (2, 1, 3, 32, 16, torch.float32),
                                              (4, 3, 2, 64, 64, torch.bfloat16), (1, 5, 1, 16, 16, torch.float32)])
def test_verify_and_commit_equal_decode_steps(N, L, H, D, Dv, dtype):
    q, k, v, g, pool, slots = _inputs(N, L, H, D, Dv, dtype)
    accepted = torch.randint(0, L + 1, (N,), generator=torch.Generator().manual_seed(1)).to(DEV)
    for verify, commit, decode in ((naive_lightning_verify, naive_lightning_commit, naive_lightning_decode),
                                   (fused_recurrent_lightning_verify, fused_recurrent_lightning_commit,
                                    fused_recurrent_lightning_decode)):
        vpool, cpool = pool.clone(), pool.clone()
        o = verify(q, k, v, g, vpool, slots)
        assert torch.equal(vpool, pool)  # verify never writes
        commit(k, v, g, vpool, slots, accepted)
        steps = []
        for t in range(L):  # plain decode steps; a row stops once its accepted tokens are applied
            live = torch.where(accepted > t, slots, torch.full_like(slots, -1))
            steps.append(decode(q[:, t], k[:, t], v[:, t], g, cpool, live))
            assert torch.equal(o[:, t][accepted > t], steps[-1][accepted > t])
        assert torch.equal(vpool, cpool)
        if N > 1:
            assert (o[1] == 0).all()  # the padding row outputs 0
        assert torch.isfinite(o.float()).all()


def test_triton_matches_reference_and_dispatch():
    q, k, v, g, pool, slots = _inputs(3, 4, 2, 32, 32, torch.float32, seed=3)
    acc = torch.tensor([4, 0, 2], device=DEV)
    ref, got = naive_lightning_verify(q, k, v, g, pool, slots), fused_recurrent_lightning_verify(q, k, v, g, pool, slots)
    assert ((ref - got).norm() / ref.norm()).item() < 1e-5
    p1, p2 = pool.clone(), pool.clone()
    naive_lightning_commit(k, v, g, p1, slots, acc)
    fused_recurrent_lightning_commit(k, v, g, p2, slots, acc)
    assert ((p1 - p2).norm() / p1.norm()).item() < 1e-6
    assert torch.equal(lightning_verify(q, k, v, g, pool, slots), naive_lightning_verify(q, k, v, g, pool, slots)) \
        if DEV == "cpu" else True
    p3 = pool.clone()
    lightning_commit(k, v, g, p3, slots, acc)
    assert torch.allclose(p3, p1)
    with pytest.raises(ValueError, match="accepted"):
        fused_recurrent_lightning_commit(k, v, g, pool, slots, acc[:2])
    with pytest.raises(ValueError, match=r"\[N, L, H, D\]"):
        fused_recurrent_lightning_verify(q[:, 0], k, v, g, pool, slots)
