"""Fused SwiGLU forward/backward (Triton; the interpreter here, compiled under `-m gpu`) vs PyTorch: values and
gradients, odd sizes, row views into one [M, 2I] buffer (the FP8 recipes' layout), empty input, bad shapes."""

import pytest
import torch

from ringlinear.layers.moe import SwiGLU
from ringlinear.ops.swiglu import naive_swiglu, naive_swiglu_backward, swiglu, swiglu_backward

# the compiled kernels on a GPU machine, the interpreter (conftest) elsewhere
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype):  # bf16: one rounding of fp32 values vs PyTorch's two (silu, then the product): ~1 ulp
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 130), (0, 16), (40, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_autograd_matches_reference(monkeypatch, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    g, u, dh = ((torch.randn(shape, generator=gen) * 3).to(dtype).to(DEV) for _ in range(3))

    def run(fn):
        a, b = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        h = fn(a, b)
        h.backward(dh)
        return h.detach(), a.grad, b.grad

    ref = run(naive_swiglu)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    out = run(swiglu)
    for a, b, name in zip(out, ref, ("h", "dg", "du")):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **_tol(dtype), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_into_halves_of_one_buffer(monkeypatch, dtype):
    """The FP8 recipes read g, u as the halves of one GEMM output and write dg, du as the halves of one buffer."""
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    gen = torch.Generator().manual_seed(1)
    M, n_i = 21, 70
    gu = (torch.randn(M, 2 * n_i, generator=gen) * 2).to(dtype).to(DEV)
    dh = torch.randn(M, n_i, generator=gen).to(dtype).to(DEV)
    dgu = torch.full((M, 2 * n_i), float("nan"), dtype=dtype, device=DEV)
    h = torch.empty(M, n_i, dtype=dtype, device=DEV)
    swiglu_backward(gu[:, :n_i], gu[:, n_i:], dh, dgu[:, :n_i], dgu[:, n_i:], h)
    rh, rdg, rdu = naive_swiglu_backward(gu[:, :n_i], gu[:, n_i:], dh)
    tol = _tol(dtype) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)  # fp32 rounded once on each side
    torch.testing.assert_close(h.float(), rh, **tol)
    torch.testing.assert_close(dgu[:, :n_i].float(), rdg, **tol)
    torch.testing.assert_close(dgu[:, n_i:].float(), rdu, **tol)


def test_swiglu_module_takes_the_fused_path(fused_path):
    torch.manual_seed(0)
    mlp = SwiGLU(32, 48).to(DEV)
    x = torch.randn(9, 32, device=DEV)
    fused, ref = fused_path(lambda: mlp(x), "ringlinear.ops.swiglu.fused._SwiGLU.apply", naive_swiglu)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_swiglu_bad_shapes(monkeypatch, backend):
    monkeypatch.setenv("RINGLINEAR_BACKEND", backend)
    g = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="swiglu: g and u must match"):
        swiglu(g, torch.randn(4, 9, device=DEV))
    with pytest.raises(ValueError, match="unit column stride"):
        swiglu_backward(g.t(), g.t(), g.t(), g.t(), g.t())
