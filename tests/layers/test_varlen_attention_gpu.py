"""Packed softmax attention on CUDA: one varlen flash-attention call == one SDPA call per sequence, forward
and gradients, GQA, odd lengths. Run on the device: `python -m pytest -q -m gpu tests/layers`."""

import pytest
import torch

from ringlinear.layers.attention_context import PackedContext
from ringlinear.ops.attention import causal_attention, varlen_flash

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or varlen_flash() is None, reason="needs CUDA + torch varlen")
@pytest.mark.parametrize("lens", [[1, 17, 300, 64, 1000, 129], [512] * 8])
def test_varlen_matches_per_sequence_sdpa(lens, monkeypatch):
    torch.manual_seed(0)
    T, H, Hkv, D = sum(lens), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv))
    do = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    ctx = PackedContext.from_lens(lens, "cuda")
    o = ctx.softmax_attention(0, q, k, v, D**-0.5)
    grads = torch.autograd.grad(o, (q, k, v), do)
    b = ctx._bounds
    ref = torch.cat([causal_attention(q[b[n] : b[n + 1]], k[b[n] : b[n + 1]], v[b[n] : b[n + 1]], D**-0.5)
                     for n in range(len(lens))])
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, r in zip(["o", "dq", "dk", "dv"], (o, *grads), (ref, *ref_grads)):
        err = ((a.float() - r.float()).norm() / r.float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
    monkeypatch.setenv("RINGLINEAR_VARLEN_ATTN", "0")  # the switch restores the loop bit for bit
    assert torch.equal(ctx.softmax_attention(0, q, k, v, D**-0.5), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_packed_batch_matches_per_sequence_sdpa(monkeypatch):
    """fp32 (no varlen flash kernel) goes through one padded SDPA call: same values and gradients as the loop."""
    torch.manual_seed(0)
    lens, H, Hkv, D = [40, 1, 160, 72, 96, 33], 4, 2, 32
    q, k, v = (torch.randn(sum(lens), h, D, device="cuda", requires_grad=True) for h in (H, Hkv, Hkv))
    do = torch.randn(sum(lens), H, D, device="cuda")
    ctx = PackedContext.from_lens(lens, "cuda")
    o = ctx.softmax_attention(0, q, k, v, D**-0.5)
    grads = torch.autograd.grad(o, (q, k, v), do)
    monkeypatch.setenv("RINGLINEAR_VARLEN_ATTN", "0")
    ref = ctx.softmax_attention(0, q, k, v, D**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, r in zip(["o", "dq", "dk", "dv"], (o, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)
