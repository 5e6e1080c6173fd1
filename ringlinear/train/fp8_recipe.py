"""The FP8 training recipe: SwiGLU MLPs (dense layers, shared experts) run through `Fp8SwiGLUFn` (one FP8
GEMM for gate + up, the fused SwiGLU + quantize kernel, FP8 down GEMM), every other dense projection whose
sizes are multiples of 128 (attention qkv / gate / output) through `Fp8LinearFn`, and the routed experts through
`Fp8ExpertsFn` (tokens quantized once, before they are copied to their k experts); the router, norms,
embeddings and lm_head stay BF16/FP32 (DeepSeek-V3 §3.3.1). The RMSNorm before FP8 projections (each decoder
layer's two norms) emits their FP8 activations and scales from its own pass (`Fp8RMSNormFn`, the
`rmsnorm_quantize` kernel): the projections that read its output use them instead of quantizing it again.
Swapped from outside the model: modules keep their parameter names, so checkpoints are unchanged.
With `cache_weights`, a weight's FP8 copy is reused while the weight is unchanged (same storage and version
counter: every micro-batch of a gradient-accumulation step); off under FSDP, whose unsharded weights are
refilled in place each step.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ringlinear.layers.moe import MoE, SwiGLU
from ringlinear.layers.norms import RMSNorm
from ringlinear.ops.fp8.gemm import fp8_grouped_gemm_rowwise, require_fp8
from ringlinear.ops.fp8.grouped import fused_fp8_grouped_gemm
from ringlinear.ops.fp8.kernels import quantize_rows
from ringlinear.ops.fp8.linear import (
    Fp8ExpertsFn,
    Fp8RMSNormFn,
    Fp8SwiGLUFn,
    fp8_linear,
    quantize_expert_weights,
    quantize_swiglu_weights,
    quantize_weight_blocks,
)
from ringlinear.ops.moe import expert_counts
from ringlinear.ops.moe.combine import moe_combine, moe_dispatch, sort_by_expert
from ringlinear.train.optim import invalidate_fp8_weights  # noqa: F401 - re-exported: the recipe owns the caches


def _weight_fp8(mod: nn.Module, name: str, weights: tuple[torch.Tensor, ...], quantize):
    """`quantize(*weights)`, reused from the module's cache while every weight keeps its storage and version."""
    if not getattr(mod, "fp8_cache_weights", False):
        return quantize(*weights)
    key = tuple((w.data_ptr(), w._version) for w in weights)
    cache = mod.__dict__.setdefault("_fp8_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = quantize(*weights)
    cache[name] = (key, val)
    return val


class Fp8RMSNorm(RMSNorm):
    """RMSNorm (one group, hidden size a multiple of 128, at most 8192) whose output also carries its 1x128 FP8
    quantization, made in the same pass (`Fp8RMSNormFn`): `fp8_activation_of(h)` hands it to the FP8 projections
    reading h. Same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, x8, sx = Fp8RMSNormFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
        h = h.view(x.shape)
        h.fp8_activation = (h._version, x8, sx)
        return h


def fp8_activation_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FP8 quantization (x8, sx) an `Fp8RMSNorm` attached to its output x, or None (another tensor, or x
    changed in place since)."""
    att = getattr(x, "fp8_activation", None)
    if att is None or att[0] != x._version:
        return None
    return att[1], att[2]


class Fp8SwiGLU(SwiGLU):
    """SwiGLU MLP (dense layers, shared experts) through `Fp8SwiGLUFn`: one FP8 GEMM for gate and up, the fused
    SwiGLU + quantize kernel, FP8 down GEMM; same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        wq = _weight_fp8(self, "swiglu", ws, quantize_swiglu_weights)
        return Fp8SwiGLUFn.apply(x.reshape(-1, x.shape[-1]), *ws, *wq, fp8_activation_of(x)).view(x.shape)


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward GEMM (and input-gradient GEMM) is FP8; same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wq = _weight_fp8(self, "weight", (self.weight,), quantize_weight_blocks)
        return fp8_linear(x, self.weight, self.bias, wq, fp8_activation_of(x))


def _fp8_moe_forward(self: MoE, x: torch.Tensor, decode: bool = False, inference: bool = False) -> torch.Tensor:
    # Same routing and combine as ringlinear.ops.moe.routed_experts; the expert GEMMs in FP8. `decode` and
    # `inference` (the engine's fused small-batch paths, MoE.forward's signature) do not apply to training.
    idx, w = self.gate(x)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order, inv = sort_by_expert(idx)
    src = order // k
    xb = x.to(torch.bfloat16)
    with torch.no_grad():  # quantize each token once, then copy its bytes to its k expert slots
        x8, sx = quantize_rows(xb)
        xs8 = x8.view(torch.uint8)[src].view(x8.dtype)
    offs = expert_counts(flat, self.gate_proj.shape[0]).cumsum(0).to(torch.int32)
    wq = _weight_fp8(self, "experts", (self.gate_proj, self.up_proj, self.down_proj), quantize_expert_weights)
    ys = Fp8ExpertsFn.apply(moe_dispatch(xb, order, inv, k), xs8, sx[src], self.gate_proj, self.up_proj,
                            self.down_proj, offs, *wq, self.fp8_grouped_gemm)
    out = moe_combine(ys, order, inv, w, x.dtype)
    if self.shared_experts is not None:
        out = out + self.shared_experts(x)
    return out


GROUPED_GEMMS = {"torch": fp8_grouped_gemm_rowwise, "triton": fused_fp8_grouped_gemm}
GROUPED_K_ALIGN = {"torch": 16, "triton": 32}  # the reduction sizes (hidden for gate+up, intermediate for down)


def _grouped_fp8_works(device: torch.device, gemm) -> str | None:
    """None when the grouped FP8 GEMM runs on this build/GPU and matches BF16, else the reason it does not."""
    try:
        xs = torch.randn(64, 128, device=device, dtype=torch.bfloat16)
        w = torch.randn(2, 128, 128, device=device)
        offs = torch.tensor([32, 64], device=device, dtype=torch.int32)
        (x8, sx), (w8, sw) = quantize_rows(xs), quantize_rows(w.reshape(256, 128))
        y = gemm(x8, sx, w8.view(2, 128, 128), sw.view(2, 128), offs).float()
        ref = torch.cat([xs[:32].float() @ w[0].t(), xs[32:].float() @ w[1].t()])
        err = ((y - ref).norm() / ref.norm()).item()
        return None if err < 0.06 else f"grouped FP8 GEMM error {err:.3f} vs BF16"
    except Exception as e:  # the private op's availability varies by build
        return f"grouped FP8 GEMM unavailable ({type(e).__name__}: {str(e)[:200]})"


def _fuse_norms(model: nn.Module) -> int:
    """Swap each decoder layer's RMSNorm to `Fp8RMSNorm` where an FP8 projection reads its output (the attention's
    qkv; a dense FP8 MLP or FP8 shared experts) and the kernel takes its size; the number swapped."""
    from ringlinear.model import DecoderLayer

    n = 0
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        mlp = layer.mlp.shared_experts if isinstance(layer.mlp, MoE) else layer.mlp
        readers = ((layer.input_layernorm, getattr(layer.attention, "query_key_value", None)),
                   (layer.post_attention_layernorm, mlp))
        for norm, reader in readers:
            if (type(norm) is RMSNorm and norm.groups == 1 and norm.weight.numel() % 128 == 0
                    and norm.weight.numel() <= 8192 and isinstance(reader, (Fp8Linear, Fp8SwiGLU))):
                norm.__class__ = Fp8RMSNorm
                n += 1
    return n


def apply_fp8_recipe(model: nn.Module, experts: bool = True, cache_weights: bool = False,
                     grouped_gemm: str = "triton", fuse_norms: bool = True) -> dict[str, int]:
    """Swap eligible projections (in place) to FP8. Raises `Fp8Unavailable` off CUDA/FP8 GPUs: a BF16 run
    must be asked for, never fallen into. `grouped_gemm` picks the experts' FP8 grouped GEMM: "triton" (ours,
    `ringlinear.ops.fp8.grouped`, faster at MoE shapes; K a multiple of 32) or "torch" (`torch._scaled_grouped_mm`;
    K a multiple of 16); experts whose sizes do not fit stay BF16. `fuse_norms`: the RMSNorms before FP8
    projections emit their FP8 activations (`Fp8RMSNorm`). Returns counts of swapped / kept modules."""
    if grouped_gemm not in GROUPED_GEMMS:
        raise ValueError(f"FP8 recipe: grouped_gemm must be one of {sorted(GROUPED_GEMMS)}, got {grouped_gemm!r}")
    require_fp8(next(model.parameters()).device)
    swapped = kept = moe = mlps = 0
    in_fp8_mlp: set[int] = set()  # linears of swapped SwiGLUs: the fused function runs them
    gemm = GROUPED_GEMMS[grouped_gemm]
    reason = _grouped_fp8_works(next(model.parameters()).device, gemm) if experts else "disabled"
    if reason is not None and experts:
        import warnings

        warnings.warn(f"FP8 recipe: MoE expert GEMMs stay BF16: {reason}", stacklevel=2)
        experts = False
    for name, mod in list(model.named_modules()):
        if name.endswith("mlp.gate") or "lm_head" in name or id(mod) in in_fp8_mlp:
            continue
        if type(mod) is SwiGLU:
            lins = (mod.gate_proj, mod.up_proj, mod.down_proj)
            if all(lin.bias is None and lin.in_features % 128 == 0 and lin.out_features % 128 == 0 for lin in lins):
                mod.__class__ = Fp8SwiGLU
                mod.fp8_cache_weights = cache_weights
                in_fp8_mlp.update(id(lin) for lin in lins)
                mlps += 1
        elif type(mod) is nn.Linear:
            if mod.in_features % 128 == 0 and mod.out_features % 128 == 0:
                mod.__class__ = Fp8Linear
                mod.fp8_cache_weights = cache_weights
                swapped += 1
            else:
                kept += 1
        elif isinstance(mod, MoE) and experts:
            inter, hid = mod.gate_proj.shape[1:]
            if inter % GROUPED_K_ALIGN[grouped_gemm] == 0 and hid % GROUPED_K_ALIGN[grouped_gemm] == 0:
                mod.forward = types.MethodType(_fp8_moe_forward, mod)
                mod.fp8_cache_weights = cache_weights
                mod.fp8_grouped_gemm = gemm
                moe += 1
    norms = _fuse_norms(model) if fuse_norms else 0
    print(f"FP8 recipe: {mlps} SwiGLU MLPs fused FP8, {swapped} other linears FP8, {kept} kept BF16, {moe} MoE "
          f"layers with FP8 experts ({grouped_gemm} grouped GEMM), {norms} RMSNorms emitting FP8 activations"
          + (f" (experts BF16: {reason})" if reason else "") + (", weight FP8 copies cached" if cache_weights else ""),
          flush=True)
    return {"fp8_swiglu_mlps": mlps, "fp8_linears": swapped, "bf16_linears": kept, "fp8_moe_layers": moe,
            "fp8_norms": norms}
