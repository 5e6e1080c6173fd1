"""Fused RMSNorm / group RMSNorm kernels (Triton; the interpreter here, compiled under `-m gpu`) vs the PyTorch
reference: values and gradients of x and the weight, odd sizes, several groups, empty input, bad shapes."""

import pytest
import torch

from ringlinear.layers.norms import GroupRMSNorm, RMSNorm
from ringlinear.ops.rmsnorm import naive_rmsnorm, rmsnorm

# the compiled kernels on a GPU machine, the interpreter (conftest) elsewhere
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _run(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", [((7, 48), 1), ((3, 5, 40), 4), ((9, 96), 3), ((2, 130), 2), ((0, 32), 1),
                                          ((2100, 16), 1)])  # 33 tiles over 16 programs: the tile loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_reference(monkeypatch, device, shape, groups, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).to(device)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).to(device)
    dy = torch.randn(shape, generator=g).to(dtype).to(device)
    ref = _run(lambda a, b: naive_rmsnorm(a, b, 1e-6, groups), x, w, dy)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    out = _run(lambda a, b: rmsnorm(a, b, 1e-6, groups), x, w, dy)
    # fp32: summation order only; bf16: outputs rounded once from fp32 values that agree to ~1e-6 (one ulp; the
    # interpreter truncates to bf16), the weight gradient summed over rows in another order
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    for a, b, name in zip(out, ref, ("y", "dx", "dw")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, b.float().abs().max().item()) if name == "dw" else 1.0
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def test_modules_use_the_kernel_and_agree(fused_path):
    """RMSNorm / GroupRMSNorm take the fused path under the Triton backend, with the same values."""
    torch.manual_seed(0)
    for mod, x in ((RMSNorm(64), torch.randn(5, 64)), (GroupRMSNorm(64, 4), torch.randn(2, 3, 64))):
        mod, x = mod.to(DEVICES[0]), x.to(DEVICES[0])
        with torch.no_grad():
            mod.weight.uniform_(0.5, 1.5)
        fused, ref = fused_path(lambda m=mod, x=x: m(x), "ringlinear.ops.rmsnorm.fused._RMSNorm.apply", naive_rmsnorm)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rmsnorm_bad_shapes(monkeypatch, backend):
    monkeypatch.setenv("RINGLINEAR_BACKEND", backend)
    x = torch.randn(4, 48, device=DEVICES[0])
    with pytest.raises(ValueError, match=r"weight must be \[48\]"):
        rmsnorm(x, torch.ones(32, device=x.device), 1e-6)
    with pytest.raises(ValueError, match="groups=5 must be >= 1 and divide the last dim 48"):
        rmsnorm(x, torch.ones(48, device=x.device), 1e-6, groups=5)
