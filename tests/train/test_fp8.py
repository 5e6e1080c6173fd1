"""FP8 ops: fused Triton kernels equal their PyTorch references (bit-exact e4m3, interpreter on the CPU),
quantization error is within e4m3's precision, the recipe refuses to run without FP8 GEMMs; GPU checks of
the scaled GEMMs and the FP8 linear against BF16 (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from ringlinear.checkpoint import init_model
from ringlinear.config import preset
from ringlinear.ops.fp8 import (
    Fp8Unavailable,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
    quantize_transpose_ref,
    rmsnorm_quantize_ref,
    swiglu_quantize_ref,
)
from ringlinear.ops.fp8.kernels import quantize_transpose, rmsnorm_quantize, swiglu_quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("M,K", [(128, 128), (200, 256), (37, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_transpose_kernel(M, K, dtype):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype).to(DEV)
    x[0, :5] = 0  # zeros and an all-zero tile must not give NaN
    got, ref = quantize_transpose(x), quantize_transpose_ref(x)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert torch.equal(g.float(), r.float()), (g.float() - r.float()).abs().max()
    x8, s = quantize_transpose(x, transpose=False)
    assert torch.equal(x8.float(), ref[0].float()) and torch.equal(s, ref[1])


@pytest.mark.parametrize("M,inter", [(70, 384), (1, 128)])
def test_swiglu_quantize_kernel(M, inter):
    g, u = (torch.randn(2, M, inter) * 3).to(torch.bfloat16).to(DEV)
    (y, s), (ry, rs) = swiglu_quantize(g, u), swiglu_quantize_ref(g, u)
    assert torch.equal(y.float(), ry.float())
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("M,H", [(37, 384), (16, 256)])
def test_rmsnorm_quantize_kernel(M, H):
    x, w = (torch.randn(M, H) * 5).to(torch.bfloat16).to(DEV), torch.randn(H, device=DEV)
    (y, s), (ry, rs) = rmsnorm_quantize(x, w, 1e-6), rmsnorm_quantize_ref(x, w, 1e-6)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    # fp32 sum order differs from torch's mean: allow the rare value one e4m3 step away, nothing more.
    mism = (y.float() != ry.float())
    assert mism.float().mean() < 1e-3
    assert _rel(dequantize_1x128(y, s), dequantize_1x128(ry, rs)) < 1e-3


def test_quantization_error_and_bad_shapes():
    x, w = torch.randn(64, 256), torch.randn(256, 384)
    assert _rel(dequantize_1x128(*quantize_1x128(x)), x) < 0.04  # e4m3: 3 mantissa bits
    assert _rel(dequantize_128x128(*quantize_128x128(w)), w) < 0.04
    with pytest.raises(ValueError, match="% 128"):
        quantize_1x128(torch.randn(4, 100))
    with pytest.raises(ValueError, match="K % 128"):
        quantize_transpose(torch.randn(4, 100))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_recipe_refuses_on_cpu(tmp_path):
    from ringlinear.train.fp8_recipe import apply_fp8_recipe
    from ringlinear.train.trainer import TrainConfig, Trainer

    model = init_model(preset("tiny"), dtype="float32")
    with pytest.raises(Fp8Unavailable, match="CUDA GPU"):
        apply_fp8_recipe(model)
    data = tmp_path / "c.txt"
    data.write_text("hello world " * 200)
    with pytest.raises(Fp8Unavailable, match="BF16"):
        Trainer(TrainConfig.from_dict({"model": "tiny", "data": [str(data)], "fp8": True, "seq_len": 32}))


# ---- GPU (device machine) ------------------------------------------------------------------------
@pytest.mark.gpu
def test_fp8_gemms_gpu():
    from ringlinear.ops.fp8 import fp8_gemm_blockwise, fp8_gemm_rowwise, quantize_rowwise

    x, w = torch.randn(512, 1024, device="cuda"), torch.randn(768, 1024, device="cuda")
    ref = x @ w.t()
    xq, wq = quantize_1x128(x), quantize_128x128(w)
    deq = dequantize_1x128(*xq) @ dequantize_128x128(*wq).t()
    out = fp8_gemm_blockwise(*xq, *wq)
    assert _rel(out, deq) < 1e-2 and _rel(out, ref) < 6e-2
    out_r = fp8_gemm_rowwise(*quantize_rowwise(x), *quantize_rowwise(w))
    assert _rel(out_r, ref) < 6e-2


@pytest.mark.gpu
def test_fp8_linear_gpu():
    from ringlinear.ops.fp8.linear import Fp8GroupedLinearFn, fp8_linear

    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(256, 512, device="cuda") * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = x2 @ w2.t()
    y2.backward(g.float())
    assert _rel(y, y2) < 6e-2 and _rel(x.grad, x2.grad) < 6e-2 and _rel(w.grad, w2.grad) < 2e-2
    # grouped (MoE experts)
    E, T = 4, 256
    xs = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    we = (torch.randn(E, 128, 256, device="cuda") * 0.05).requires_grad_()
    offs = torch.tensor([64, 64, 160, 256], device="cuda", dtype=torch.int32)  # one empty expert
    ys = Fp8GroupedLinearFn.apply(xs, we, offs)
    ys.backward(torch.ones_like(ys))
    starts = [0, 64, 64, 160]
    ref = torch.cat([xs.detach().float()[a:b] @ we.detach()[e].t() for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    assert _rel(ys, ref) < 6e-2 and torch.isfinite(we.grad).all() and we.grad[1].abs().sum() == 0
