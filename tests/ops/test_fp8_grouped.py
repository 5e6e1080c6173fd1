"""Triton FP8 grouped GEMM (rowwise scales) vs its reference: uneven and empty experts, odd N, rows past the
last expert; CPU interpreter here, the H100 under `-m gpu` (also against torch's `_scaled_grouped_mm`)."""

import pytest
import torch

from ringlinear.ops.fp8.grouped import fused_fp8_grouped_gemm
from ringlinear.ops.fp8.naive import naive_fp8_grouped_gemm


def _case(counts, N, K, device, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(counts) + extra_rows
    E = len(counts)
    a8 = (torch.randn(T, K, generator=g) * 4).to(torch.float8_e4m3fn).to(device)
    b8 = (torch.randn(E, N, K, generator=g) * 4).to(torch.float8_e4m3fn).to(device)
    sa = (torch.rand(T, generator=g) + 0.5).to(device)
    sb = (torch.rand(E, N, generator=g) + 0.5).to(device)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    return a8, sa, b8, sb, offs


def _check(counts, N, K, device, extra_rows=0):
    a8, sa, b8, sb, offs = _case(counts, N, K, device, extra_rows)
    out = fused_fp8_grouped_gemm(a8, sa, b8, sb, offs)
    ref = naive_fp8_grouped_gemm(a8, sa, b8, sb, offs)
    n = int(offs[-1])
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), rtol=1.6e-2, atol=1e-2 * ref[:n].float().abs().max().item())
    return out, (a8, sa, b8, sb, offs)


@pytest.mark.parametrize("counts,N,K,extra", [
    ([5, 0, 17, 33, 1], 48, 64, 0),      # uneven experts, an empty one, rows spanning several tiles
    ([0, 0, 40], 20, 32, 3),             # leading empty experts, odd N, rows past the last expert
    ([16] * 8, 32, 96, 0),               # even split, K over three tiles
])
def test_triton_grouped_gemm_matches_reference(counts, N, K, extra):
    _check(counts, N, K, "cpu", extra)


def test_triton_grouped_gemm_never_writes_past_its_output():
    # offs[-1] > T breaks the contract; the kernel still stays inside `out` (rows < T computed, nothing past them)
    a8, sa, b8, sb, _ = _case([5, 7], 16, 32, "cpu")
    offs = torch.tensor([5, 20], dtype=torch.int32)
    out = fused_fp8_grouped_gemm(a8, sa, b8, sb, offs)
    ref = naive_fp8_grouped_gemm(a8, sa, b8, sb, offs)
    assert out.shape == (12, 16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1e-2 * ref.float().abs().max().item())


def test_triton_grouped_gemm_rejects_bad_shapes():
    a8, sa, b8, sb, offs = _case([4, 4], 16, 32, "cpu")
    with pytest.raises(ValueError, match="do not agree"):
        fused_fp8_grouped_gemm(a8, sa[:-1], b8, sb, offs)
    with pytest.raises(ValueError, match="multiple of 32"):
        fused_fp8_grouped_gemm(a8[:, :16], sa, b8[:, :, :16], sb, offs)


@pytest.mark.gpu
def test_triton_grouped_gemm_gpu_matches_torch():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    counts = [0, 300, 1, 129, 256, 17] + [64] * 26
    out, (a8, sa, b8, sb, offs) = _check(counts, 1024, 512, "cuda")
    n = int(offs[-1])
    ref = torch._scaled_grouped_mm(a8, b8.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16)
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), rtol=1.6e-2, atol=1e-2 * ref[:n].float().abs().max().item())
