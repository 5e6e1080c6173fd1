"""MoE dispatch / combine kernels (Triton, in the interpreter here; compiled under `-m gpu`) vs the PyTorch
sequences they replace: values and gradients, odd sizes, hidden sizes over one block, empty batches."""

import pytest
import torch

from ringlinear.ops.moe import routed_experts
from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert
from ringlinear.ops.moe.naive import naive_moe_combine, naive_moe_dispatch

# the compiled kernels on a GPU machine, the interpreter (conftest) elsewhere
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _inputs(T, k, H, E, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g) + 0.1
    ys = torch.randn(T * k, H, generator=g).to(dtype)
    return [t.to(device) for t in (idx, x, w, ys)]


def _grads(fn, *leaves, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,k,H,E", [(13, 3, 37, 5), (9, 2, 1100, 4), (1, 1, 16, 1), (0, 2, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_and_dispatch_match_reference(monkeypatch, device, T, k, H, E, dtype):
    idx, x, w, ys = _inputs(T, k, H, E, dtype, device)
    order, inv = sort_by_expert(idx)
    assert torch.equal(order[inv], torch.arange(T * k, device=device))

    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    ref_y, (ref_dys, ref_dw) = _grads(lambda a, b: naive_moe_combine(a, order, b), ys, w)
    ref_xs, (ref_dx,) = _grads(lambda a: naive_moe_dispatch(a, order, k), x)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    out_y, (dys, dw) = _grads(lambda a, b: moe_combine(a, order, inv, b), ys, w)
    out_xs, (dx,) = _grads(lambda a: moe_dispatch(a, order, inv, k), x)

    # fp32 sums in a different order; bf16: one rounding of the same fp32 sum, at most one ulp apart (Triton's
    # interpreter truncates fp32 -> bf16 where the GPU and torch round to nearest)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 or device == "cuda" else tol
    assert out_y.dtype == dtype and out_y.shape == (T, H)
    torch.testing.assert_close(out_y, ref_y, **tol)
    torch.testing.assert_close(dys, ref_dys, **exact)  # w * dy rounded once, either way
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-4)
    assert torch.equal(out_xs, ref_xs)
    torch.testing.assert_close(dx, ref_dx, **tol)


def test_combine_output_dtype_and_bad_shapes(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    idx, x, w, ys = _inputs(6, 2, 24, 4, torch.float32, DEVICES[0])
    order, inv = sort_by_expert(idx)
    out = moe_combine(ys, order, inv, w, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, naive_moe_combine(ys, order, w, torch.bfloat16), rtol=8e-3, atol=8e-3)
    with pytest.raises(ValueError, match=r"ys \[T\*k, H\] and weight \[T, k\]"):
        moe_combine(ys[:-1], order, inv, w)
    with pytest.raises(ValueError, match=r"order and inv must be \[T\*k\] = \[12\]"):
        moe_combine(ys, order[:-1], inv, w)
    with pytest.raises(ValueError, match="moe_dispatch: order and inv"):
        moe_dispatch(x, order, inv, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_routed_experts_same_with_either_backend(monkeypatch, device):
    """The whole expert block (dispatch, per-expert SwiGLU, combine): values and every gradient agree."""
    T, k, H, inter, E = 11, 2, 32, 16, 4
    idx, x, w, _ = _inputs(T, k, H, E, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    wg, wu = (torch.randn(E, inter, H, generator=g).to(device) / 6 for _ in range(2))
    wd = torch.randn(E, H, inter, generator=g).to(device) / 4

    def run(backend):
        monkeypatch.setenv("RINGLINEAR_BACKEND", backend)
        return _grads(lambda *a: routed_experts(a[0], idx, *a[1:], use_grouped_mm=False), x, w, wg, wu, wd)

    ref, ref_grads = run("torch")
    out, grads = run("triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
