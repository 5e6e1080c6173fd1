"""FP8 ops: fused Triton kernels equal their PyTorch references (bit-exact e4m3, interpreter on the CPU),
quantization error is within e4m3's precision; GPU checks of the scaled GEMMs and the FP8 linear against BF16
(marked gpu)."""

from __future__ import annotations

import pytest
import torch

from ringlinear.ops.fp8 import (
    dequantize_1x128,
    dequantize_128x128,
    naive_quantize_transpose,
    naive_rmsnorm_quantize,
    naive_swiglu_quantize,
    quantize_1x128,
    quantize_128x128,
    quantize_rowwise,
)
from ringlinear.ops.fp8.kernels import (
    quantize_blocks,
    quantize_rows,
    quantize_rows_cat,
    quantize_transpose,
    rmsnorm_quantize,
    swiglu_quantize,
    swiglu_quantize_rows,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _same_q(got, ref):
    """e4m3 tensors equal: bit-exact in the interpreter; on the GPU (fast fp32 division, within 2 ulp) a rare
    value at a rounding tie may sit one e4m3 step away, nothing more."""
    g, r = got.float(), ref.float()
    if DEV == "cpu":
        return torch.equal(g, r)
    diff = g != r
    return diff.float().mean().item() < 2e-3 and bool(((g - r).abs() <= r.abs() / 8 + 2**-9)[diff].all())


def _same_s(got, ref):
    return torch.equal(got, ref) if DEV == "cpu" else torch.allclose(got, ref, rtol=1e-6, atol=0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("M,K", [(128, 128), (200, 256), (37, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_transpose_kernel(M, K, dtype):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype).to(DEV)
    x[0, :5] = 0  # zeros and an all-zero tile must not give NaN
    got, ref = quantize_transpose(x), naive_quantize_transpose(x)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert (_same_q(g, r) if g.dtype == torch.float8_e4m3fn else _same_s(g, r)), (g.float() - r.float()).abs().max()
    x8, s = quantize_transpose(x, transpose=False)
    assert _same_q(x8, ref[0]) and _same_s(s, ref[1])


@pytest.mark.parametrize("M,inter", [(70, 384), (1, 128)])
def test_swiglu_quantize_kernel(M, inter):
    g, u = (torch.randn(2, M, inter) * 3).to(torch.bfloat16).to(DEV)
    (y, s), (ry, rs) = swiglu_quantize(g, u), naive_swiglu_quantize(g, u)
    assert _same_q(y, ry)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    gu = torch.cat([g, u], 1)  # the two halves of one [M, 2I] GEMM output, read in place
    y2, s2 = swiglu_quantize(gu[:, :inter], gu[:, inter:])
    assert torch.equal(y2.float(), y.float()) and torch.equal(s2, s)


@pytest.mark.parametrize("M,H", [(37, 384), (16, 256)])
def test_rmsnorm_quantize_kernel(M, H):
    torch.manual_seed(M)  # the bound below is on a count of rare one-step roundings: fixed inputs, fixed count
    x, w = (torch.randn(M, H) * 5).to(torch.bfloat16).to(DEV), torch.randn(H, device=DEV)
    (y, s), (ry, rs) = rmsnorm_quantize(x, w, 1e-6), naive_rmsnorm_quantize(x, w, 1e-6)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    # fp32 sum order differs from torch's mean: allow the rare value one e4m3 step away, nothing more.
    mism = (y.float() != ry.float())
    assert mism.float().mean() < 1e-3
    assert _rel(dequantize_1x128(y, s), dequantize_1x128(ry, rs)) < 1e-3


@pytest.mark.parametrize("M,K", [(37, 200), (5, 2048), (130, 64)])
def test_quantize_rows_kernel(M, K):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(torch.bfloat16).to(DEV)
    x[1] = 0  # an all-zero row
    (y, s), (ry, rs) = quantize_rows(x), quantize_rowwise(x)
    assert _same_q(y, ry) and _same_s(s, rs[:, 0])


def test_quantize_rows_cat_kernel():
    g, u = (torch.randn(3, 40, 96) * 2).to(DEV), (torch.randn(3, 24, 96) * 7).to(DEV)
    y, s = quantize_rows_cat([g, u])
    ry, rs = quantize_rowwise(torch.cat([g, u], 1).reshape(-1, 96))
    assert y.shape == (3, 64, 96) and s.shape == (3, 64)
    assert _same_q(y.reshape(-1, 96), ry) and _same_s(s.reshape(-1), rs[:, 0])
    with pytest.raises(ValueError, match="parts"):
        quantize_rows_cat([g, u[:, :, :10]])


@pytest.mark.parametrize("M,inter", [(70, 96), (1, 512)])
def test_swiglu_quantize_rows_kernel(M, inter):
    gu = (torch.randn(M, 2 * inter) * 3).to(torch.bfloat16).to(DEV)
    g, u = gu[:, :inter].float(), gu[:, inter:].float()
    (y, s), (ry, rs) = swiglu_quantize_rows(gu), quantize_rowwise(g * torch.sigmoid(g) * u)
    torch.testing.assert_close(s, rs[:, 0], rtol=1e-6, atol=0)
    assert (y.float() != ry.float()).float().mean() < 1e-3  # sigmoid: last-ulp differences only


@pytest.mark.parametrize("N,K", [(128, 256), (384, 128)])
def test_quantize_blocks_kernel(N, K):
    w = (torch.randn(N, K) * torch.rand(N, 1)).to(DEV)
    y, s, yt = quantize_blocks(w, transpose=True)
    ry, rs = quantize_128x128(w)
    assert _same_q(y, ry) and _same_s(s, rs)
    assert torch.equal(yt.float(), y.float().t())
    y2, s2 = quantize_blocks(w.to(torch.bfloat16))
    assert _same_q(y2, quantize_128x128(w.to(torch.bfloat16))[0])
    with pytest.raises(ValueError, match="% 128"):
        quantize_blocks(torch.randn(100, 128))


def test_quantization_error_and_bad_shapes():
    x, w = torch.randn(64, 256), torch.randn(256, 384)
    assert _rel(dequantize_1x128(*quantize_1x128(x)), x) < 0.04  # e4m3: 3 mantissa bits
    assert _rel(dequantize_128x128(*quantize_128x128(w)), w) < 0.04
    with pytest.raises(ValueError, match="% 128"):
        quantize_1x128(torch.randn(4, 100))
    with pytest.raises(ValueError, match="K % 128"):
        quantize_transpose(torch.randn(4, 100))


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
    from ringlinear.ops.fp8.gemm import fp8_grouped_gemm_rowwise
    from ringlinear.ops.fp8.linear import fp8_linear

    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(256, 512, device="cuda") * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = x2 @ w2.t()
    y2.backward(g.float())
    assert _rel(y, y2) < 6e-2 and _rel(x.grad, x2.grad) < 6e-2 and _rel(w.grad, w2.grad) < 2e-2
    # grouped per-row GEMM (MoE experts; autograd through it is `test_fp8_experts_gpu`)
    E, T = 4, 256
    xs = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    we = torch.randn(E, 128, 256, device="cuda") * 0.05
    offs = torch.tensor([64, 64, 160, 256], device="cuda", dtype=torch.int32)  # one empty expert
    (x8, sx), (w8, sw) = quantize_rows(xs), quantize_rows(we.reshape(E * 128, 256))
    ys = fp8_grouped_gemm_rowwise(x8, sx, w8.view(E, 128, 256), sw.view(E, 128), offs)
    starts = [0, 64, 64, 160]
    ref = torch.cat([xs.float()[a:b] @ we[e].t() for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    assert _rel(ys, ref) < 6e-2


@pytest.mark.parametrize("M,H", [(37, 384), (130, 256)])
def test_rmsnorm_quantize_emits_the_norm_and_rstd(M, H):
    """emit_norm: the same FP8 values and scales, plus rmsnorm(x) * w in x's dtype and 1/rms per row."""
    x, w = (torch.randn(M, H) * 5).to(torch.bfloat16).to(DEV), torch.randn(H, device=DEV)
    y, s = rmsnorm_quantize(x, w, 1e-6)
    y2, s2, h, rstd = rmsnorm_quantize(x, w, 1e-6, emit_norm=True)
    assert torch.equal(y2.float(), y.float()) and torch.equal(s2, s)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert h.dtype == torch.bfloat16 and _rel(h, ref * w) < 1e-2
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6), rtol=1e-5, atol=0)


def test_fp8_rmsnorm_fn_matches_rmsnorm_forward_and_backward():
    """Fp8RMSNormFn: h and its gradients (x, weight) are RMSNorm's; its FP8 output (rows padded to 128) is
    h's 1x128 quantization."""
    from ringlinear.ops.fp8.linear import Fp8RMSNormFn
    from ringlinear.ops.rmsnorm import naive_rmsnorm

    M, H = 70, 256
    x = (torch.randn(M, H, device=DEV) * 3).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(H, device=DEV)).requires_grad_()
    h, x8, sx = Fp8RMSNormFn.apply(x, w, 1e-6)
    assert x8.shape == (128, H) and sx.shape == (128, H // 128) and x8.dtype == torch.float8_e4m3fn
    xr, wr = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = naive_rmsnorm(xr, wr, 1e-6)
    assert _rel(h, ref) < 1e-2
    assert _rel(dequantize_1x128(x8[:M], sx[:M]), ref) < 0.05 and (x8[M:].float() == 0).all()
    dh = torch.randn_like(ref)
    h.backward(dh.bfloat16())
    ref.backward(dh.bfloat16().float())
    assert _rel(x.grad, xr.grad) < 2e-2 and _rel(w.grad, wr.grad) < 2e-2


def test_naive_fp8_gemm_blockwise_is_the_dequantized_product():
    from ringlinear.ops.fp8.gemm import blockwise_scale_b
    from ringlinear.ops.fp8.naive import naive_fp8_gemm_blockwise, quantize_1x128, quantize_128x128

    a, b = torch.randn(128, 256), torch.randn(384, 256)
    (a8, sa), (b8, sb) = quantize_1x128(a), quantize_128x128(b)
    out = naive_fp8_gemm_blockwise(a8, sa, b8, sb, torch.float32)
    assert _rel(out, a @ b.t()) < 0.05
    assert torch.equal(naive_fp8_gemm_blockwise(a8, sa, b8, blockwise_scale_b(sb), torch.float32, sb_prepared=True), out)
