"""Fused chunked lm_head + cross entropy vs the fp32 reference: loss and both gradients, odd sizes, ragged
last chunk, ignored labels, bf16 inputs, bad input."""

import math

import pytest
import torch

from ringlinear.ops.cross_entropy import linear_cross_entropy, naive_linear_cross_entropy
from ringlinear.ops.cross_entropy.chunked import default_chunk_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton paths: the interpreter on the CPU


def _case(T, H, V, dtype, ignore_frac, seed, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    lab = torch.randint(0, V, (T,), generator=g)
    lab[torch.rand(T, generator=g) < ignore_frac] = -100
    return h.to(dev), w.to(dev), lab.to(dev)


def _grads(fn, h, w, lab, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, lab, **kw)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T,H,V,chunk", [(37, 24, 101, 8), (64, 32, 257, 64), (5, 16, 33, 1000), (129, 8, 7, 16)])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_reference_fp32(T, H, V, chunk, ignore_frac, fused):
    h, w, lab = _case(T, H, V, torch.float32, ignore_frac, seed=T + V, dev=DEV if fused else "cpu")
    ref = _grads(naive_linear_cross_entropy, h, w, lab)
    out = _grads(linear_cross_entropy, h, w, lab, chunk_rows=chunk, fused=fused)
    assert abs(out[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    assert _rel(out[1], ref[1]) < 1e-5
    assert _rel(out[2], ref[2]) < 1e-5


def test_bf16_inputs():
    h, w, lab = _case(50, 64, 300, torch.bfloat16, 0.2, seed=3, dev=DEV)
    ref = _grads(naive_linear_cross_entropy, h, w, lab)
    out = _grads(linear_cross_entropy, h, w, lab, chunk_rows=16, fused=True)
    # the loss uses the same bf16 values in fp32: equal to summation order; gradients rounded to bf16
    assert abs(out[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    assert _rel(out[1], ref[1]) < 1e-2
    assert _rel(out[2], ref[2]) < 1e-2


def test_all_ignored_is_nan_like_reference():
    h, w, lab = _case(9, 8, 11, torch.float32, 1.1, seed=1)
    assert math.isnan(linear_cross_entropy(h, w, lab).item())
    assert math.isnan(naive_linear_cross_entropy(h, w, lab).item())


def test_no_grad_path():
    h, w, lab = _case(20, 8, 30, torch.float32, 0.0, seed=2)
    with torch.no_grad():
        a = linear_cross_entropy(h, w, lab, chunk_rows=7)
    torch.testing.assert_close(a, naive_linear_cross_entropy(h, w, lab), rtol=1e-5, atol=0)


def test_bad_input():
    h, w, lab = _case(6, 8, 10, torch.float32, 0.0, seed=0)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(h, w, lab[:5])
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h, w[:, :4], lab)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, lab, chunk_rows=-1)


def test_default_chunk():
    assert default_chunk_rows(157184) == 1536
    assert default_chunk_rows(10) % 256 == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(20011, 512, device="cuda", generator=g) * 0.05).bfloat16()
    lab = torch.randint(0, 20011, (3000,), device="cuda", generator=g)
    lab[::7] = -100
    ref = _grads(naive_linear_cross_entropy, h, w, lab)
    out = _grads(linear_cross_entropy, h, w, lab, chunk_rows=1024)
    assert abs(out[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    assert _rel(out[1], ref[1]) < 1e-2 and _rel(out[2], ref[2]) < 1e-2


@pytest.mark.parametrize("R,V,gdt", [(7, 33, torch.float32), (5, 3000, torch.bfloat16), (3, 1, torch.float32)])
def test_softmax_ce_grad_kernel(R, V, gdt):
    from ringlinear.ops.cross_entropy.kernel import fused_softmax_ce_grad
    from ringlinear.ops.cross_entropy.naive import naive_softmax_ce_grad

    dev = DEV
    g = torch.Generator().manual_seed(R * V)
    x = (torch.randn(R, V, generator=g) * 4).to(dev)
    lab = torch.randint(0, V, (R,), generator=g).to(dev)
    lab[1] = -100
    scale = torch.tensor([0.37], device=dev)
    (l1, g1), (l2, g2) = fused_softmax_ce_grad(x, lab, scale, -100, gdt), naive_softmax_ce_grad(x, lab, scale, -100, gdt)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-2 if gdt == torch.bfloat16 else 1e-5, atol=1e-6)
    assert l1[1] == 0 and (g1[1] == 0).all()
    lo, none = fused_softmax_ce_grad(x, lab, scale, -100, None)
    assert none is None and torch.equal(lo, l1)
