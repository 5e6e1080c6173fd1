"""FP8 weights at inference: block quantization of any shape (partial edge blocks), the W8A8 dense GEMM (activation
quantize kernel + GEMM) and the W8A16 expert GEMMs (grouped, and the FP8 variant of the fused decode MoE, with and
without an expert offset) against their PyTorch references, in the interpreter on the CPU (compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from ringlinear.layers.linear import Linear
from ringlinear.ops.backend import use_backend
from ringlinear.ops.fp8.inference import w8a8_linear
from ringlinear.ops.fp8.naive import (
    dequantize_128x128,
    dequantize_blockwise,
    dequantize_groups,
    naive_w8a8_linear,
    naive_w8a16_grouped_gemm,
    quantize_128x128,
    quantize_blockwise,
    quantize_groups,
)
from ringlinear.ops.fp8.w8a8 import quantize_groups as quantize_groups_kernel
from ringlinear.ops.fp8.w8a8 import w8a8_gemm
from ringlinear.ops.fp8.w8a16 import w8a16_grouped_gemm
from ringlinear.ops.moe import routed_experts
from ringlinear.ops.moe.fused_moe import FusedMoEConfig, fused_moe
from ringlinear.ops.moe.naive import naive_moe

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = FusedMoEConfig(gate_up_block_n=16, gate_up_block_k=32, down_block_n=32, down_block_k=16)


def rel(out, ref):
    assert torch.isfinite(out.float()).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("shape", [(256, 384), (200, 72), (3, 130, 260)])
def test_blockwise_quantization(shape):
    w = torch.randn(*shape) * torch.rand(*shape[:-1], 1)
    w8, s = quantize_blockwise(w)
    assert w8.shape == w.shape and w8.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert rel(dequantize_blockwise(w8, s), w) < 0.04  # e4m3: 3 mantissa bits
    assert (w8.float().abs().amax() <= 448) and torch.isfinite(w8.float()).all()
    if len(shape) == 2 and shape[0] % 128 == 0 and shape[1] % 128 == 0:  # the training quantizer, where it applies
        r8, rs = quantize_128x128(w)
        assert torch.equal(w8.float(), r8.float()) and torch.equal(s, rs)
        assert torch.equal(dequantize_blockwise(w8, s), dequantize_128x128(r8, rs))
    zero = torch.zeros(130, 7)
    z8, zs = quantize_blockwise(zero)  # an all-zero block: a positive scale, exact zeros
    assert (zs > 0).all() and not z8.float().any()


@pytest.mark.parametrize("M,K", [(5, 200), (17, 256), (1, 64), (40, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_groups_kernel(M, K, dtype):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype).to(DEV)
    x[0, : min(K, 128)] = 0  # a zero group
    x[-1, -1] = 3.0  # never all zero
    (y, s), (ry, rs) = quantize_groups_kernel(x), quantize_groups(x)
    assert y.shape == (M, K) and s.shape == (M, -(-K // 128))
    if DEV == "cpu":  # bit-exact in the interpreter; the GPU's fast division may move a tie by one e4m3 step
        assert torch.equal(y.float(), ry.float()) and torch.equal(s, rs)
    else:
        assert (y.float() != ry.float()).float().mean() < 2e-3
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert rel(dequantize_groups(y, s), x) < 0.04


@pytest.mark.parametrize("M,N,K", [(1, 96, 200), (5, 256, 384), (33, 130, 128), (70, 64, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_gemm_matches_reference(M, N, K, bias):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DEV)
    w8, sw = quantize_blockwise((torch.randn(N, K, generator=g) / K**0.5).to(DEV))
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    ref = naive_w8a8_linear(x, w8, sw, b)
    out = w8a8_gemm(*quantize_groups_kernel(x), w8, sw, b, out_dtype=torch.float32)
    assert out.shape == (M, N) and rel(out, ref) < 1e-5
    exact = x @ dequantize_blockwise(w8, sw).t() + (b if bias else 0)
    assert rel(out, exact) < 0.05  # the activation quantization's error, nothing more
    outb = w8a8_gemm(*quantize_groups_kernel(x.bfloat16()), w8, sw, b, out_dtype=torch.bfloat16)
    assert outb.dtype == torch.bfloat16 and rel(outb, naive_w8a8_linear(x.bfloat16(), w8, sw, b)) < 1e-2


def test_w8a8_gemm_bad_arguments():
    x8, sx = quantize_groups(torch.randn(3, 200))
    w8, sw = quantize_blockwise(torch.randn(64, 200))
    with pytest.raises(ValueError, match="do not agree"):
        w8a8_gemm(x8, sx, w8, sw[:, :1])
    with pytest.raises(ValueError, match="float8"):
        w8a8_gemm(x8.float(), sx, w8, sw)


def test_fp8_linear_dispatch_and_module():
    lin = torch.nn.Linear(256, 192, bias=True).to(DEV)
    q = Linear.like(lin, fp8=True)
    assert q.is_fp8 and q.weight.dtype == torch.float8_e4m3fn and q.weight_scale_inv.shape == (2, 2)
    x = torch.randn(2, 3, 256, device=DEV)
    with use_backend("torch"):
        ref = q(x)
    with use_backend("triton"):
        out = q(x)
    assert out.shape == (2, 3, 192) and rel(out, ref) < 1e-5
    assert rel(ref, lin(x)) < 0.05
    assert torch.equal(ref, naive_w8a8_linear(x.reshape(-1, 256), q.weight, q.weight_scale_inv, q.bias).view(2, 3, -1))
    with use_backend("triton"):
        assert rel(w8a8_linear(x, q.weight, q.weight_scale_inv), ref - q.bias) < 1e-5


def _experts(E, H, ff, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, ff, H, generator=g) / H**0.5, torch.randn(E, ff, H, generator=g) / H**0.5,
          torch.randn(E, H, ff, generator=g) / ff**0.5]
    q = [quantize_blockwise(w.to(DEV)) for w in ws]
    return [w8 for w8, _ in q], [s for _, s in q]


@pytest.mark.parametrize("T,K,N,E", [(40, 200, 96, 4), (9, 128, 260, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_grouped_gemm_matches_reference(T, K, N, E, dtype):
    g = torch.Generator().manual_seed(T)
    a = torch.randn(T, K, generator=g).to(DEV, dtype)
    b8, sb = quantize_blockwise((torch.randn(E, N, K, generator=g) / K**0.5).to(DEV))
    counts = torch.tensor([T // 2, 0, T - T // 2 - 2, 2][:E] + [0] * max(0, E - 4))
    counts[-1] += T - counts.sum()
    offs = counts.cumsum(0).to(torch.int32).to(DEV)
    out, ref = w8a16_grouped_gemm(a, b8, sb, offs), naive_w8a16_grouped_gemm(a, b8, sb, offs)
    assert out.dtype == dtype and rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("T,H,ff,E,k", [(1, 64, 32, 16, 4), (4, 130, 136, 4, 2), (9, 160, 64, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_matches_reference(T, H, ff, E, k, dtype):
    (wg, wu, wd), scales = _experts(E, H, ff)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).sort(-1).values.to(DEV)
    w = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
    deq = [dequantize_blockwise(a, s) for a, s in zip((wg, wu, wd), scales)]
    ref = naive_moe(x, idx, w, *deq)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    out = fused_moe(x, idx, w, wg, wu, wd, config=SMALL, w_scales=scales)
    assert out.dtype == dtype and rel(out, ref) < tol
    # the grouped path of prefill batches: the same arithmetic
    with use_backend("triton"):
        assert rel(routed_experts(x, idx, w, wg, wu, wd, use_grouped_mm=True, w_scales=scales), ref) < tol
    with use_backend("torch"):
        assert rel(routed_experts(x, idx, w, wg, wu, wd, w_scales=scales), ref) < tol


@pytest.mark.parametrize("fp8", [False, True])
def test_expert_shards_sum_to_the_whole(fp8):
    """Two ranks holding experts [0, E/2) and [E/2, E), given the global ids, sum to the unsplit output (fused decode
    kernel and grouped path)."""
    E, H, ff, T, k = 8, 64, 48, 5, 3
    (wg, wu, wd), scales = _experts(E, H, ff, seed=3)
    if not fp8:
        wg, wu, wd = (dequantize_blockwise(a, s) for a, s in zip((wg, wu, wd), scales))
        scales = None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(DEV)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).sort(-1).values.to(DEV)
    w = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
    half = E // 2

    def shard(r):
        sl = slice(r * half, (r + 1) * half)
        return (wg[sl], wu[sl], wd[sl]), None if scales is None else tuple(s[sl].contiguous() for s in scales)

    whole = fused_moe(x, idx, w, wg, wu, wd, config=SMALL, w_scales=scales)
    parts = [fused_moe(x, idx, w, *shard(r)[0], config=SMALL, w_scales=shard(r)[1], expert_offset=r * half)
             for r in range(2)]
    assert rel(parts[0] + parts[1], whole) < 1e-5
    for backend in ("torch", "triton"):
        with use_backend(backend):
            grouped = [routed_experts(x, idx, w, *shard(r)[0], use_grouped_mm=backend == "triton" and fp8,
                                      w_scales=shard(r)[1], expert_offset=r * half) for r in range(2)]
        assert rel(grouped[0] + grouped[1], whole) < 1e-5


def test_fused_moe_fp8_bad_arguments():
    (wg, wu, wd), scales = _experts(4, 200, 32)
    x, idx, w = torch.randn(2, 200, device=DEV), torch.tensor([[0, 1], [2, 3]], device=DEV), torch.ones(2, 2, device=DEV)
    with pytest.raises(ValueError, match="<= 128"):
        fused_moe(x, idx, w, wg, wu, wd, w_scales=scales, config=FusedMoEConfig(down_block_k=256))
    with pytest.raises(ValueError, match="scales"):
        fused_moe(x, idx, w, wg, wu, wd, w_scales=(scales[0], scales[1], scales[0]))
    with pytest.raises(ValueError, match="float8_e4m3fn with w_scales"):
        fused_moe(x, idx, w, wg, wu, wd)
