"""Paged decode attention: the Triton kernel (interpreter on CPU) against the gather + SDPA reference, and the
reference against dense causal attention of the last position. Odd lengths, lengths past SPLITS x TILE keys,
GQA, padding rows (length 0), shuffled block tables."""

import pytest
import torch

from ringlinear.ops.attention import causal_attention
from ringlinear.ops.paged_attention import naive_paged_decode_attention
from ringlinear.ops.paged_attention.decode import fused_paged_decode_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(lens, H, Hkv, D, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = max(1, max(-(-n // bs) for n in lens))
    nb = len(lens) * W + 3
    k_cache = torch.randn(nb, bs, Hkv, D, generator=g).to(DEV, dtype)
    v_cache = torch.randn(nb, bs, Hkv, D, generator=g).to(DEV, dtype)
    perm = torch.randperm(nb, generator=g)
    bt = perm[: len(lens) * W].view(len(lens), W).to(DEV, torch.int32)
    q = torch.randn(len(lens), H, D, generator=g).to(DEV, dtype)
    return q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32, device=DEV)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("lens,H,Hkv,D,bs,dtype", [
    ([1, 7, 64, 100], 4, 1, 16, 16, torch.float32),
    ([1100, 3, 0, 65], 8, 2, 32, 16, torch.float32),
    ([37, 1030], 4, 4, 64, 8, torch.bfloat16),
    ([2000], 16, 4, 128, 16, torch.bfloat16),
])
def test_triton_matches_reference(lens, H, Hkv, D, bs, dtype):
    q, kc, vc, bt, sl = _setup(lens, H, Hkv, D, bs, dtype)
    ref = naive_paged_decode_attention(q, kc, vc, bt, sl, D**-0.5)
    out = fused_paged_decode_attention(q, kc, vc, bt, sl, D**-0.5)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (2e-5 if dtype == torch.float32 else 1e-2)
    assert (out[sl == 0] == 0).all()


def test_reference_matches_dense_attention():
    lens = [5, 33]
    H, Hkv, D, bs = 4, 2, 16, 4
    q, kc, vc, bt, sl = _setup(lens, H, Hkv, D, bs, torch.float32)
    out = naive_paged_decode_attention(q, kc, vc, bt, sl, 0.3)
    for n, L in enumerate(lens):
        k = kc[bt[n].long()].flatten(0, 1)[:L]
        v = vc[bt[n].long()].flatten(0, 1)[:L]
        want = causal_attention(q[n : n + 1], k, v, 0.3)[0]
        assert rel(out[n], want) < 1e-5
