"""The aligned-numerics ops (ringlinear.ops.batch_invariant): each Triton kernel (interpreter) against its PyTorch
reference, each op's rows bitwise independent of the batch around them (both backends), the recurrent Lightning
form against the reference recurrence with its chunk-form gradient, and the switches' parsing."""

import pytest
import torch

from ringlinear.ops.backend import use_backend
from ringlinear.ops.batch_invariant import (
    ITEMS,
    Alignment,
    aligned_numerics,
    aligned_value,
    bi_attention,
    bi_linear,
    bi_rows_matmul,
    current_alignment,
    packed_key_table,
    packed_recurrent_lightning,
    parse_alignment,
    recurrent_lightning,
    seq_of_tokens,
)
from ringlinear.ops.lightning import naive_chunk_lightning_attn, naive_recurrent_lightning_attn

BACKENDS = ["torch", "triton"]


def test_parse_alignment():
    assert parse_alignment("off") == Alignment() and not parse_alignment(None).any
    assert parse_alignment("all").items == ITEMS and parse_alignment("all").spec() == "all"
    assert parse_alignment("gemm, moe").items == ("gemm", "moe")
    with pytest.raises(ValueError, match="unknown item"):
        parse_alignment("gemm,fast")
    with pytest.raises(ValueError, match="not yet"):
        parse_alignment("gemm,residual_fp32")
    with aligned_numerics("linear_attn") as al:
        assert al.linear_attn and current_alignment().linear_attn
    assert not current_alignment().any


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,N", [(96, 40), (128, 70)])
def test_bi_linear_rows_do_not_depend_on_the_batch(backend, K, N):
    torch.manual_seed(0)
    x, w, b = torch.randn(37, K), torch.randn(N, K), torch.randn(N)
    with use_backend(backend):
        y = bi_linear(x, w, b)
        rows = torch.cat([bi_linear(x[i : i + 1], w, b) for i in range(x.shape[0])])
        assert torch.equal(y, rows)
        assert torch.equal(bi_linear(x[5:12], w, b), y[5:12])
    ref = x.double() @ w.double().t() + b.double()
    assert (y.double() - ref).norm() / ref.norm() < 1e-6


def test_bi_linear_triton_matches_reference_and_has_gradients():
    torch.manual_seed(1)
    x, w = torch.randn(9, 64, requires_grad=True), torch.randn(48, 64, requires_grad=True)
    with use_backend("triton"):
        y = bi_linear(x, w)
    with use_backend("torch"):
        r = bi_linear(x, w)
    assert (y - r).abs().max() < 1e-4
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)
    assert torch.allclose(w.grad, x.detach().sum(0).expand_as(w), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bi_rows_matmul(backend):
    torch.manual_seed(2)
    P = 45  # expert 4 gets 25 rows: two blocks of the kernel's 16
    x, w = torch.randn(P, 80), torch.randn(5, 36, 80)
    e = torch.cat([torch.tensor([4, 0, 2, 2, 1, 0, 3, 4, 4, 1, 0]), torch.full((22,), 4), torch.randint(0, 4, (12,))])
    e = e[torch.randperm(P)]
    with use_backend(backend):
        y = bi_rows_matmul(x, w, e)
        assert torch.equal(torch.cat([bi_rows_matmul(x[i : i + 1], w, e[i : i + 1]) for i in range(P)]), y)
        assert torch.equal(bi_rows_matmul(x[7:30], w, e[7:30]), y[7:30])
    ref = torch.einsum("pk,pnk->pn", x.double(), w.double()[e])
    assert (y.double() - ref).abs().max() < 1e-4


def _attention_ref(q, k, v, bounds, scale):
    out = []
    for s, e in zip(bounds, bounds[1:]):
        for i in range(s, e):
            kk = k[s : i + 1].double().repeat_interleave(q.shape[1] // k.shape[1], 1)
            vv = v[s : i + 1].double().repeat_interleave(q.shape[1] // k.shape[1], 1)
            p = torch.softmax((kk * q[i].double()).sum(-1) * scale, 0)
            out.append((p[..., None] * vv).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bi_attention_packed_and_paged(backend):
    torch.manual_seed(3)
    H, Hkv, D, scale = 4, 2, 32, 0.17
    bounds = [0, 5, 6, 76]  # one sequence crosses the kernel's 64-key tile
    T = bounds[-1]
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    cu = torch.tensor(bounds, dtype=torch.int32)
    seq = seq_of_tokens(cu, T)
    pos = torch.cat([torch.arange(e - s) for s, e in zip(bounds, bounds[1:])])
    ref = _attention_ref(q, k, v, bounds, scale)
    with use_backend(backend):
        o = bi_attention(q, k, v, packed_key_table(bounds, "cpu"), 1, seq, pos + 1, scale)
        assert (o.double() - ref).abs().max() < 1e-5
        # the same keys in pages of 4 (blocks shuffled) give the same bits: one query alone, or the decode row
        bs, n_blocks = 4, 40
        perm = torch.randperm(n_blocks)
        kp, vp = torch.zeros(n_blocks, bs, Hkv, D), torch.zeros(n_blocks, bs, Hkv, D)
        tables = torch.zeros(3, 20, dtype=torch.int32)
        used = 0
        for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
            for j in range(0, e - s, bs):
                blk = int(perm[used])
                used += 1
                tables[n, j // bs] = blk
                c = min(bs, e - s - j)
                kp[blk, :c], vp[blk, :c] = k[s + j : s + j + c], v[s + j : s + j + c]
        paged = bi_attention(q, kp, vp, tables, bs, seq, pos + 1, scale)
        assert torch.equal(paged, o)
        last = bi_attention(q[75:], kp, vp, tables, bs, seq[75:], pos[75:] + 1, scale)
        assert torch.equal(last, o[75:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_lightning_equals_the_recurrence_and_is_split_invariant(backend):
    torch.manual_seed(4)
    H, D = 2, 16
    bounds = [0, 7, 8, 29]
    T = bounds[-1]
    q, k, v = (torch.randn(T, H, D) * 0.5 for _ in range(3))
    g = -torch.rand(H) - 0.05
    init = torch.randn(3, H, D, D) * 0.1
    cu = torch.tensor(bounds, dtype=torch.int32)
    ref, ref_state = naive_recurrent_lightning_attn(q[None].double(), k[None].double(), v[None].double(), g, 0.25,
                                                    init.double(), True, cu)
    with use_backend(backend):
        pool = torch.cat([torch.zeros(1, H, D, D), init])  # slot 0 unused
        o = recurrent_lightning(q, k, v, g, 0.25, pool, torch.tensor([1, 2, 3]), cu, bounds)
        assert (o.double() - ref[0]).abs().max() < 1e-5 and (pool[1:].double() - ref_state).abs().max() < 1e-5
        # sequence 2 alone, token by token (decode) and in two pieces (chunked prefill): the same bits
        for cuts in ([8, 29], [8, 15, 29], list(range(8, 30))):
            p2 = torch.cat([torch.zeros(3, H, D, D), init[2:]])
            parts = []
            for s, e in zip(cuts, cuts[1:]):
                parts.append(recurrent_lightning(q[s:e], k[s:e], v[s:e], g, 0.25, p2, torch.tensor([3]),
                                                 torch.tensor([0, e - s], dtype=torch.int32), [0, e - s]))
            assert torch.equal(torch.cat(parts), o[8:])
            assert torch.equal(p2[3], pool[3])
        # a padding slot: output 0, nothing written
        pad = pool.clone()
        o_pad = recurrent_lightning(q[:7], k[:7], v[:7], g, 0.25, pad, torch.tensor([-1]),
                                    torch.tensor([0, 7], dtype=torch.int32), [0, 7])
        assert torch.equal(o_pad, torch.zeros_like(o_pad)) and torch.equal(pad, pool)


def test_packed_recurrent_gradient_is_the_chunk_forms():
    torch.manual_seed(5)
    H, D = 2, 16
    bounds = [0, 9, 30]
    T = bounds[-1]
    g = -torch.rand(H) - 0.05
    cu = torch.tensor(bounds, dtype=torch.int32)
    x = [(torch.randn(T, H, D) * 0.5).requires_grad_() for _ in range(3)]
    o = packed_recurrent_lightning(*x, g, 0.25, cu, bounds)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum(), x)
    y = [t.detach().requires_grad_() for t in x]
    r, _ = naive_chunk_lightning_attn(*(t[None] for t in y), g, 0.25, cu_seqlens=cu)
    ref = torch.autograd.grad((r[0] * w).sum(), y)
    assert (o - r[0]).abs().max() < 1e-5
    for a, b in zip(grads, ref):
        assert (a - b).norm() / b.norm() < 1e-5


def test_aligned_value_takes_values_from_one_function_and_gradients_from_the_other():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = aligned_value(lambda t: t * 3 + 0.5, lambda t: t * 3, x)
    assert torch.equal(y, torch.tensor([3.5, 6.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 3.0]))


def test_rope_switch_reads_the_fp64_table():
    from ringlinear.layers.rotary import RotaryEmbedding

    r = RotaryEmbedding(16, 10000.0, None, 4096)
    pos = torch.arange(4096)
    angles = (pos.float()[:, None] * r.inv_freq[None]).double()
    with aligned_numerics("rope"):
        c, s = r.cos_sin(pos)
    assert torch.equal(c, angles.cos().float()) and torch.equal(s, angles.sin().float())
    c32, _ = r.cos_sin(pos)  # the switch off: fp32 evaluation, which rounds some angles differently
    assert not torch.equal(c32, c)
