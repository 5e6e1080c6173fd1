"""The FP8 training recipe: CPU refusal, FP8 SwiGLU / experts against BF16, the weight cache, the recipe's options."""

from __future__ import annotations

import pytest
import torch

from ringlinear.config import preset
from ringlinear.model import init_model
from ringlinear.ops.fp8 import Fp8Unavailable
from ringlinear.ops.fp8.kernels import quantize_rows


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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
def test_fp8_swiglu_gpu():
    from ringlinear.layers.moe import SwiGLU
    from ringlinear.ops.fp8.linear import Fp8SwiGLUFn, quantize_swiglu_weights
    from ringlinear.train.fp8_recipe import apply_fp8_recipe

    H, n_i, M = 256, 384, 300  # M not a multiple of 128: padded rows
    g = torch.Generator(device="cuda").manual_seed(1)
    wg, wu, wd = [(torch.randn(*s, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
                  for s in ((n_i, H), (n_i, H), (H, n_i))]
    x = torch.randn(M, H, device="cuda", generator=g).bfloat16().requires_grad_()
    y = Fp8SwiGLUFn.apply(x, wg, wu, wd, *quantize_swiglu_weights(wg, wu, wd))
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_p = [t.detach().float().requires_grad_() for t in (x, wg, wu, wd)]
    xr, gr, ur, dr = ref_p
    ref = (torch.nn.functional.silu(xr @ gr.t()) * (xr @ ur.t())) @ dr.t()
    ref.backward(dy.float())
    assert _rel(y, ref) < 8e-2  # two chained FP8 GEMMs
    for got, want in zip((x, wg, wu, wd), ref_p):
        assert torch.isfinite(got.grad).all() and _rel(got.grad, want.grad) < 8e-2
    # the recipe swaps the module (same parameters) and it computes the same function
    mlp = SwiGLU(H, n_i).cuda().bfloat16()
    xin = torch.randn(2, 50, H, device="cuda", dtype=torch.bfloat16)
    want = mlp(xin)
    counts = apply_fp8_recipe(torch.nn.Sequential(mlp), experts=False)
    assert counts["fp8_swiglu_mlps"] == 1 and counts["fp8_linears"] == 0 and type(mlp).__name__ == "Fp8SwiGLU"
    assert _rel(mlp(xin), want) < 8e-2


def test_weight_cache_follows_version_and_storage():
    from ringlinear.train.fp8_recipe import _weight_fp8

    mod = torch.nn.Linear(4, 4)
    calls = []

    def quantize(w):
        calls.append(1)
        return w.detach().clone()

    mod.fp8_cache_weights = True
    a = _weight_fp8(mod, "w", (mod.weight,), quantize)
    assert _weight_fp8(mod, "w", (mod.weight,), quantize) is a and len(calls) == 1  # unchanged: reused
    with torch.no_grad():
        mod.weight.add_(1.0)  # an optimizer step (in place): new version
    b = _weight_fp8(mod, "w", (mod.weight,), quantize)
    assert len(calls) == 2 and torch.equal(b, mod.weight)
    mod.weight.data = mod.weight.data.clone()  # new storage
    _weight_fp8(mod, "w", (mod.weight,), quantize)
    assert len(calls) == 3
    mod.fp8_cache_weights = False
    _weight_fp8(mod, "w", (mod.weight,), quantize)
    _weight_fp8(mod, "w", (mod.weight,), quantize)
    assert len(calls) == 5


def _experts_vs_reference(device, backend, E, H, n_i, counts):
    from ringlinear.ops.fp8.linear import Fp8ExpertsFn, quantize_expert_weights
    from ringlinear.train.fp8_recipe import GROUPED_GEMMS

    T = sum(counts)
    g = torch.Generator(device=device).manual_seed(0)
    wg, wu, wd = [(torch.randn(*s, device=device, generator=g) * 0.05).bfloat16().requires_grad_()
                  for s in ((E, n_i, H), (E, n_i, H), (E, H, n_i))]
    xs = torch.randn(T, H, device=device, generator=g).bfloat16().requires_grad_()
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    x8, sx = quantize_rows(xs.detach())
    y = Fp8ExpertsFn.apply(xs, x8, sx, wg, wu, wd, offs, *quantize_expert_weights(wg, wu, wd), GROUPED_GEMMS[backend])
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_p = [t.detach().float().requires_grad_() for t in (xs, wg, wu, wd)]
    starts = [0] + offs.tolist()[:-1]
    outs = []
    for e, (a, b) in enumerate(zip(starts, offs.tolist())):
        xe = ref_p[0][a:b]
        outs.append(torch.nn.functional.silu(xe @ ref_p[1][e].t()) * (xe @ ref_p[2][e].t()) @ ref_p[3][e].t())
    ref = torch.cat(outs)
    ref.backward(dy.float())
    assert _rel(y, ref) < 8e-2  # two chained FP8 GEMMs (the SwiGLU output is quantized too)
    for got, want in zip((xs, wg, wu, wd), ref_p):
        # backward GEMMs are BF16, but they read the forward's FP8-GEMM output gu (SwiGLU recomputed from it),
        # so its e4m3 error (~4%, as the forward's) carries into every gradient
        assert _rel(got.grad, want.grad) < 6e-2
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all(wg.grad[e].abs().sum() == 0 for e in empty)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test on CPU tensors; test_fp8_experts_gpu covers the compiled kernel")
def test_fp8_experts_triton_gemm_cpu():
    # the Triton grouped GEMM in the interpreter (the backward's BF16 grouped GEMMs need CUDA strides: forward only)
    from ringlinear.ops.fp8.linear import Fp8ExpertsFn, quantize_expert_weights
    from ringlinear.train.fp8_recipe import GROUPED_GEMMS

    E, H, n_i, counts = 3, 128, 64, [10, 0, 23]
    g = torch.Generator().manual_seed(0)
    wg, wu, wd = [(torch.randn(*s, generator=g) * 0.05).bfloat16() for s in ((E, n_i, H), (E, n_i, H), (E, H, n_i))]
    xs = torch.randn(sum(counts), H, generator=g).bfloat16()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x8, sx = quantize_rows(xs)
    y = Fp8ExpertsFn.apply(xs, x8, sx, wg, wu, wd, offs, *quantize_expert_weights(wg, wu, wd), GROUPED_GEMMS["triton"])
    ref = torch.cat([torch.nn.functional.silu(xs[a:b].float() @ wg[e].float().t()) * (xs[a:b].float() @ wu[e].float().t())
                     @ wd[e].float().t() for e, (a, b) in enumerate(zip([0, 10, 10], [10, 10, 33]))])
    assert _rel(y, ref) < 8e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_experts_gpu(backend):
    from ringlinear.train.fp8_recipe import GROUPED_GEMMS, _fp8_moe_forward

    _experts_vs_reference("cuda", backend, 4, 256, 128, [100, 0, 150, 50])  # expert 1 empty
    # the recipe's MoE forward == the BF16 routed experts, within FP8 error
    from ringlinear.layers.moe import MoE

    cfg = preset("tiny", hidden_size=256, moe_intermediate_size=128, num_attention_heads=8, head_dim=32)
    moe = MoE(cfg).cuda()
    for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(moe.gate.weight, std=0.05)
    moe = moe.bfloat16()
    moe.gate.float()
    x = torch.randn(200, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = moe(x)
        moe.fp8_cache_weights = True
        moe.fp8_grouped_gemm = GROUPED_GEMMS[backend]
        got = _fp8_moe_forward(moe, x)
        again = _fp8_moe_forward(moe, x)
    assert _rel(got, want) < 6e-2 and torch.equal(got, again)


def test_fp8_recipe_rejects_unknown_grouped_gemm():
    from ringlinear.train.fp8_recipe import apply_fp8_recipe
    from ringlinear.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="grouped_gemm must be one of"):
        apply_fp8_recipe(torch.nn.Linear(128, 128), grouped_gemm="cutlass")
    with pytest.raises(ValueError, match="fp8_grouped_gemm.*must be one of"):
        TrainConfig(model="tiny", data=["x"], fp8_grouped_gemm="cutlass").validate()


def test_fp8_moe_forward_takes_moe_forward_arguments():
    # the recipe swaps MoE.forward for its own: every argument the decoder passes (decode=, inference=) is accepted
    import inspect

    from ringlinear.layers.moe import MoE
    from ringlinear.train.fp8_recipe import _fp8_moe_forward

    want = list(inspect.signature(MoE.forward).parameters)
    assert list(inspect.signature(_fp8_moe_forward).parameters) == want


@pytest.mark.gpu
def test_fp8_recipe_whole_model_gpu():
    # the recipe on a whole model (dense MLP, MoE layers, both attention kinds): a training forward and backward run
    # and the loss is the BF16 model's within FP8 error
    from ringlinear.train.fp8_recipe import apply_fp8_recipe

    cfg = preset("tiny", hidden_size=256, moe_intermediate_size=128, intermediate_size=256, num_attention_heads=8,
                 head_dim=32)
    model = init_model(cfg, seed=0).cuda().bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (300,), device="cuda")
    cu = torch.tensor([0, 100, 300], device="cuda", dtype=torch.int32)
    with torch.no_grad():
        want = model.loss(ids, cu)["loss"].float()
    apply_fp8_recipe(model, experts=True)
    got = model.loss(ids, cu)["loss"]
    got.backward()
    assert abs(got.item() - want.item()) < 0.05 * abs(want.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


# ---- the RMSNorm -> FP8 projection fusion ---------------------------------------------------------------------
def _fused_vs_unfused(monkeypatch, device):
    """Forward + backward of one tiny model (linear layers, softmax layer, dense MLP, shared experts all FP8-sized)
    in BF16 (key None) and with the recipe, its norms unfused (False) and fused (True); per run: the output, the
    gradients, and the calls of each activation quantizer in the forward."""
    import copy

    import ringlinear.ops.fp8.linear as fp8_linear
    from ringlinear.layers.attention_context import PackedContext
    from ringlinear.train import fp8_recipe

    calls = {}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(fp8_linear, "quantize_transpose", counted("quantize_transpose", fp8_linear.quantize_transpose))
    monkeypatch.setattr(fp8_linear, "rmsnorm_quantize", counted("rmsnorm_quantize", fp8_linear.rmsnorm_quantize))
    cfg = preset("tiny", num_hidden_layers=3, moe_shared_expert_intermediate_size=128,
                 num_nextn_predict_layers=0)
    base = init_model(cfg, seed=2, device=device, dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (100,), generator=g).to(device)
    ctx = PackedContext.from_lens([60, 40], device)
    out = {}
    for fuse in (None, False, True):  # None: BF16, no recipe
        model = copy.deepcopy(base)
        counts = {} if fuse is None else fp8_recipe.apply_fp8_recipe(model, experts=False, fuse_norms=fuse)
        calls.clear()
        h = model.model(ids, ctx)
        fwd = dict(calls)
        loss = h.float().pow(2).mean()
        loss.backward()
        out[fuse] = {"counts": counts, "fwd_calls": fwd, "h": h.detach().float(),
                     "grads": {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}}
    return out


def _check_fusion(out):
    """The fused path is as close to BF16 as the unfused one (both FP8; they differ by where the norm's values are
    rounded before quantizing), and the fusion ran: the norms' kernel, no second quantization of its output."""
    bf16, plain, fused = out[None], out[False], out[True]
    # 3 layers: 3 input norms (qkv + g_proj of the linear layers, qkv of the softmax one), 3 post-attention norms
    # (the dense MLP, the shared experts of the 2 MoE layers)
    assert plain["counts"]["fp8_norms"] == 0 and fused["counts"]["fp8_norms"] == 6
    assert plain["fwd_calls"].get("rmsnorm_quantize", 0) == 0 and fused["fwd_calls"]["rmsnorm_quantize"] == 6
    # every projection reading a norm took its FP8 rows instead of quantizing: 2 + 2 + 1 (attention) + 3 (MLPs)
    assert plain["fwd_calls"]["quantize_transpose"] - fused["fwd_calls"].get("quantize_transpose", 0) == 8
    err_plain, err_fused = _rel(plain["h"], bf16["h"]), _rel(fused["h"], bf16["h"])
    print(f"output vs BF16: unfused FP8 {err_plain:.4f}, fused FP8 {err_fused:.4f}; fused vs unfused "
          f"{_rel(fused['h'], plain['h']):.4f}")
    assert err_fused < 1.25 * err_plain and err_fused < 0.15
    assert plain["grads"].keys() == fused["grads"].keys() == bf16["grads"].keys()
    worst = []
    for name, g in bf16["grads"].items():
        assert torch.isfinite(fused["grads"][name]).all(), name
        worst.append((_rel(fused["grads"][name], g), _rel(plain["grads"][name], g), name))
    # each gradient: the fused path's error against BF16 within 1.25x the unfused one's (+ a floor for the tiny ones)
    for e_fused, e_plain, name in worst:
        assert e_fused < 1.25 * e_plain + 0.02, (name, e_fused, e_plain)


def test_fused_norm_fp8_recipe_cpu_reference_gemm(monkeypatch):
    """On the CPU (Triton kernels in the interpreter; the FP8 GEMM, which has no CPU kernel, replaced by its
    dequantize-then-fp32 reference `naive_fp8_gemm_blockwise`): the recipe with the norms fused computes what it
    computes unfused, within FP8 rounding (the fused norm quantizes its fp32 values, the unfused path the bf16
    ones), and the fusion is really used: the norms' kernel runs and the projections quantize nothing it made."""
    if torch.cuda.is_available():
        pytest.skip("the CPU variant; the GPU runs test_fused_norm_fp8_recipe_gpu")
    import ringlinear.ops.fp8.linear as fp8_linear
    from ringlinear.ops.fp8.naive import naive_fp8_gemm_blockwise
    from ringlinear.train import fp8_recipe

    monkeypatch.setattr(fp8_linear, "fp8_gemm_blockwise", naive_fp8_gemm_blockwise)
    monkeypatch.setattr(fp8_recipe, "require_fp8", lambda device: None)
    _check_fusion(_fused_vs_unfused(monkeypatch, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_norm_fp8_recipe_gpu(monkeypatch):
    """The same on the GPU with the real FP8 GEMMs."""
    _check_fusion(_fused_vs_unfused(monkeypatch, "cuda"))
