"""Paged prefill attention: the Triton kernel (interpreter on CPU) against the gather + SDPA reference, and the
reference against dense causal attention over each sequence's concatenated keys. Prefixes 0, 1, 15, 16, 17, 100+;
chunks 1 (decode rows), 7, 64+; shuffled block tables; GQA 1/2/4; block sizes 16 and others; fp32 and bf16;
every output element written (the output buffer starts as NaN)."""

import pytest
import torch

from ringlinear.ops.attention import causal_attention
from ringlinear.ops.paged_attention.naive import naive_paged_prefill_attention
from ringlinear.ops.paged_attention.prefill import PrefillConfig
from ringlinear.ops.paged_attention.prefill import fused_paged_prefill_attention as paged_prefill_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(prefixes, chunks, H, Hkv, D, bs, dtype, seed=0):
    """Caches holding every sequence's prefix + chunk keys on shuffled pages (plus spare pages of noise), the
    packed queries of the chunks, and the kernel's int32 metadata."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + c for p, c in zip(prefixes, chunks)]
    W = max(1, max(-(-n // bs) for n in lens)) + 1  # one spare table column: entries past a sequence are junk
    nb = len(lens) * W + 3
    k_cache = torch.randn(nb, bs, Hkv, D, generator=g).to(DEV, dtype)
    v_cache = torch.randn(nb, bs, Hkv, D, generator=g).to(DEV, dtype)
    bt = torch.randperm(nb, generator=g)[: len(lens) * W].view(len(lens), W).to(DEV, torch.int32)
    q = torch.randn(sum(chunks), H, D, generator=g).to(DEV, dtype)
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, bt, cu, torch.tensor(lens, dtype=torch.int32, device=DEV)


def rel(a, b):
    """||a - b|| / ||b||; NaN anywhere in a gives NaN, which fails every `<` bound."""
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


CASES = [
    # prefixes, chunks, H, Hkv, D, block_size, dtype, config (None = default)
    ([0, 1, 15, 16, 17, 130], [7, 1, 64, 1, 9, 70], 4, 1, 16, 16, torch.float32, PrefillConfig(32, 16, 4, 1)),
    ([0, 17, 100], [70, 7, 1], 8, 4, 32, 16, torch.float32, PrefillConfig(16, 32, 4, 1)),
    ([16, 0, 3], [65, 1, 7], 2, 2, 16, 4, torch.float32, None),
    ([1, 16, 40], [17, 64, 1], 6, 2, 16, 8, torch.float32, PrefillConfig(16, 16, 4, 1)),  # REP 3: 5 queries a tile
    ([100, 0], [9, 20], 4, 2, 32, 16, torch.float16, PrefillConfig(32, 32, 4, 1)),
    ([15, 120, 1], [1, 66, 16], 8, 2, 64, 32, torch.bfloat16, PrefillConfig(32, 16, 4, 1)),
    ([0, 0], [0, 33], 4, 1, 16, 1, torch.float32, PrefillConfig(16, 16, 4, 1)),  # an empty chunk, block_size 1
]


@pytest.mark.parametrize("prefixes,chunks,H,Hkv,D,bs,dtype,cfg", CASES)
def test_kernel_matches_reference(prefixes, chunks, H, Hkv, D, bs, dtype, cfg):
    q, kc, vc, bt, cu, sl = _setup(prefixes, chunks, H, Hkv, D, bs, dtype)
    ref = naive_paged_prefill_attention(q, kc, vc, bt, cu, sl, D**-0.5)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(q, kc, vc, bt, cu, sl, D**-0.5, max_seqlen_q=max(chunks), out=out, config=cfg)
    assert got is out and got.dtype == q.dtype
    assert torch.isfinite(out).all(), "some output rows were not written"
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol
    for n in range(len(chunks)):  # every sequence on its own, not only the batch norm
        a, b = cu[n].item(), cu[n + 1].item()
        if b > a:
            assert rel(out[a:b], ref[a:b]) < tol, f"sequence {n}"


def test_default_config_and_no_max_seqlen():
    """The default tile (no `max_seqlen_q`, own output buffer, int64 metadata) on Ring-mini's head layout, bf16,
    with K pages laid out [num_blocks, Hkv, block_size, D] and V rows padded: K and V strides all differ."""
    q, kc, vc, bt, cu, sl = _setup([40, 0], [20, 1], 16, 4, 128, 16, torch.bfloat16, seed=1)
    ref = naive_paged_prefill_attention(q, kc, vc, bt, cu, sl, 0.1)
    nb, bs, Hkv, D = kc.shape
    k_strided = torch.empty(nb, Hkv, bs, D, dtype=kc.dtype, device=DEV).transpose(1, 2).copy_(kc)
    v_strided = torch.empty(nb, bs, Hkv, D + 16, dtype=vc.dtype, device=DEV)[..., :D].copy_(vc)
    out = paged_prefill_attention(q, k_strided, v_strided, bt.long(), cu.long(), sl.long(), 0.1)
    assert rel(out, ref) < 1e-2


def test_kernel_sees_the_chunk_causally():
    """Changing a chunk's later keys changes no earlier query row (and does change the last one)."""
    q, kc, vc, bt, cu, sl = _setup([20], [24], 2, 1, 16, 16, torch.float32, seed=2)
    cfg = PrefillConfig(16, 16, 4, 1)
    before = paged_prefill_attention(q, kc, vc, bt, cu, sl, 0.25, config=cfg)
    page = bt[0, 43 // 16].long()
    kc[page, 43 % 16] += 3.0  # key 43 = the chunk's last position
    after = paged_prefill_attention(q, kc, vc, bt, cu, sl, 0.25, config=cfg)
    assert torch.equal(after[:-1], before[:-1])
    assert not torch.allclose(after[-1], before[-1])


def test_reference_matches_dense_attention():
    prefixes, chunks = [0, 5, 33], [6, 1, 9]
    H, Hkv, D, bs = 4, 2, 16, 4
    q, kc, vc, bt, cu, sl = _setup(prefixes, chunks, H, Hkv, D, bs, torch.float32, seed=3)
    out = naive_paged_prefill_attention(q, kc, vc, bt, cu, sl, 0.3)
    for n, L in enumerate(sl.tolist()):
        a, b = cu[n].item(), cu[n + 1].item()
        k = kc[bt[n].long()].flatten(0, 1)[:L]
        v = vc[bt[n].long()].flatten(0, 1)[:L]
        want = causal_attention(q[a:b], k, v, 0.3)
        assert rel(out[a:b], want) < 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(D=24), "head dim D"),
    (dict(D=512), "head dim D"),
    (dict(bs=12), "block_size"),
    (dict(H=6, Hkv=4), "multiple of KV heads"),
])
def test_bad_arguments_are_named(change, match):
    args = dict(H=4, Hkv=2, D=16, bs=16) | change
    q, kc, vc, bt, cu, sl = _setup([3], [5], args["H"], args["Hkv"], args["D"], args["bs"], torch.float32)
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, kc, vc, bt, cu, sl, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,D,bs", [(torch.bfloat16, 128, 16), (torch.float16, 64, 64), (torch.float32, 128, 16),
                                        (torch.bfloat16, 256, 8)])
def test_compiled_kernel_at_engine_sizes(dtype, D, bs):
    """Compiled (pipelined) loops over thousands of keys: a long chunk, chunks after long prefixes, decode rows."""
    prefixes, chunks = [0, 3000, 5003, 17, 900], [2500, 1024, 1, 333, 1]
    q, kc, vc, bt, cu, sl = _setup(prefixes, chunks, 16, 4, D, bs, dtype, seed=4)
    ref = naive_paged_prefill_attention(q, kc, vc, bt, cu, sl, D**-0.5)
    out = paged_prefill_attention(q, kc, vc, bt, cu, sl, D**-0.5, max_seqlen_q=max(chunks),
                                  out=torch.full_like(q, float("nan")))
    assert rel(out, ref) < (2e-5 if dtype == torch.float32 else 1e-2)
