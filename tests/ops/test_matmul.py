"""fp32-output products of bf16 operands: the values of the fp32 GEMM of the upcast operands (up to summation
order), and the same gradients (GPU: the tensor-core path and its autograd function)."""

import pytest
import torch

from ringlinear.ops.matmul import mm_fp32_out


def _case(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 96, generator=g).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(96, 130, generator=g).to(device, torch.bfloat16).requires_grad_()
    return a, b


def _check(device):
    a, b = _case(device)
    out = mm_fp32_out(a, b)
    ref = a.detach().float() @ b.detach().float()
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()).item() < 1e-6
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ga, gb = (g @ b.detach().float().t()).to(torch.bfloat16), (a.detach().float().t() @ g).to(torch.bfloat16)
    for got, want in ((a.grad, ga), (b.grad, gb)):
        assert got.dtype == torch.bfloat16 and ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_mm_fp32_out_cpu():
    _check("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mm_fp32_out_gpu():
    _check("cuda")
