"""FP8 (e4m3) quantization references, DeepSeek-V3 §3.3.2 fine-grained scaling: activations per 1x128 tile
(per row, per 128 columns), weights per 128x128 block, and a per-row fallback. `x ~= x8 * scale`, with
scale = amax / 448 (the largest e4m3 value), so the scales are the dequantization factors GEMMs take.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
_EPS = 1e-12  # all-zero tile: any positive scale gives exact zeros


def _check_2d(x: torch.Tensor, name: str, cols_multiple: int = 1, rows_multiple: int = 1) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.shape[1] % cols_multiple or x.shape[0] % rows_multiple:
        raise ValueError(f"{name}: shape {tuple(x.shape)} needs rows % {rows_multiple} == 0 and cols % {cols_multiple} == 0")


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (x8 [M, K] e4m3, scale [M, 1] fp32)."""
    _check_2d(x, "quantize_rowwise")
    amax = x.float().abs().amax(dim=1, keepdim=True).clamp(min=_EPS)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K], K % 128 == 0 -> (x8 [M, K] e4m3, scale [M, K/128] fp32)."""
    _check_2d(x, "quantize_1x128", cols_multiple=BLOCK)
    return quantize_groups(x)


def quantize_128x128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K], both % 128 == 0 -> (w8 [N, K] e4m3, scale [N/128, K/128] fp32)."""
    _check_2d(w, "quantize_128x128", cols_multiple=BLOCK, rows_multiple=BLOCK)
    return quantize_blockwise(w)


def dequantize_1x128(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_groups(x8, scale)


def dequantize_128x128(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise(w8, scale)


# ---- references of the fused Triton kernels (ringlinear/ops/fp8/kernels.py) ----------------------
def naive_quantize_transpose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (x8 [M, K], s [M, K/128]) 1x128 along K, and (xt8 [K, M], st [K, M/128]) 1x128 along M
    (the operand layout the weight-gradient GEMM dW = dY^T X needs)."""
    x8, s = quantize_1x128(x)
    M = x.shape[0]
    pad = (-M) % BLOCK  # a partial last tile along M is scaled over its valid rows (zeros do not change amax)
    xt8, st = quantize_1x128(torch.nn.functional.pad(x.t().float(), (0, pad)))
    return x8, s, xt8[:, :M], st


def naive_swiglu_quantize(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up: [M, I] -> quantize_1x128(silu(gate) * up), computed in fp32."""
    g = gate.float()
    return quantize_1x128(g * torch.sigmoid(g) * up.float())


def naive_rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, H], weight: [H] -> quantize_1x128(x / sqrt(mean(x^2) + eps) * weight), fp32 math."""
    h = x.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return quantize_1x128(y)


def naive_fp8_gemm_blockwise(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                             out_dtype: torch.dtype = torch.bfloat16, sb_prepared: bool = False) -> torch.Tensor:
    """Reference of `ringlinear.ops.fp8.gemm.fp8_gemm_blockwise` (same arguments): both operands dequantized, one
    fp32 GEMM. `sb_prepared`: sb in cuBLAS's layout (`blockwise_scale_b`: [K/128 padded to 4, N/128] transposed)."""
    N, K = b8.shape
    sb = sb.t()[:, : K // BLOCK] if sb_prepared else sb
    a = dequantize_1x128(a8, sa.float().contiguous())
    return (a @ dequantize_128x128(b8, sb.float().contiguous()).t()).to(out_dtype)


def naive_fp8_grouped_gemm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
                         offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Readable reference: one fp32 GEMM per expert over its token rows."""
    out = torch.empty(a8.shape[0], b8.shape[1], dtype=out_dtype, device=a8.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            acc = a8[start:end].float() @ b8[e].float().t()
            out[start:end] = (acc * sa[start:end].float()[:, None] * sb[e].float()[None, :]).to(out_dtype)
        start = end
    return out


# ---- inference: FP8 weights of any shape (partial edge blocks), and the GEMMs that read them -----------------
def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., N, K] (any N, K) -> (w8 [..., N, K] e4m3, scale [..., ceil(N/block), ceil(K/block)] fp32): one scale
    per `block` x `block` tile, an edge tile scaled over its valid part (the layout of HF FP8 checkpoints,
    `weight_scale_inv`, which despite its name holds these dequantization factors)."""
    *lead, N, K = w.shape
    pn, pk = -N % block, -K % block
    t = torch.nn.functional.pad(w.float(), (0, pk, 0, pn))  # zeros do not change a tile's amax
    nb, kb = (N + pn) // block, (K + pk) // block
    t = t.reshape(*lead, nb, block, kb, block)
    scale = t.abs().amax(dim=(-3, -1)).clamp(min=_EPS) / FP8_MAX
    w8 = (t / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8.reshape(*lead, N + pn, K + pk)[..., :N, :K].contiguous(), scale


def dequantize_blockwise(w8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: [..., N, K] fp32 = w8 * the scale of each element's tile."""
    N, K = w8.shape[-2:]
    s = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :N, :K]
    return w8.float() * s


def quantize_groups(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (any K) -> (x8 [M, K] e4m3, scale [M, ceil(K/group)] fp32): one scale per 1 x `group` slice of a
    row (DeepSeek-V3's activation tiles), the last slice over its valid columns."""
    M, K = x.shape
    pk = -K % group
    t = torch.nn.functional.pad(x.float(), (0, pk)).view(M, -1, group)
    scale = t.abs().amax(-1).clamp(min=_EPS) / FP8_MAX
    x8 = (t / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(M, K + pk)[:, :K].contiguous()
    return x8, scale


def dequantize_groups(x8: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    return x8.float() * scale.repeat_interleave(group, -1)[:, : x8.shape[1]]


def naive_w8a8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = q(x) W^T (+ b) for an e4m3 weight w8: [N, K] with 128x128 block scales, x: [M, K] quantized per 1x128
    group at run time (`quantize_groups`): both dequantized, one fp32 GEMM, rounded once to `out_dtype` (x's)."""
    y = dequantize_groups(*quantize_groups(x)) @ dequantize_blockwise(w8, scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def naive_w8a16_grouped_gemm(a: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert GEMMs with e4m3 weights, activations as they are: rows of a: [T, K] sorted by expert (`offs`: [E]
    cumulative counts), b8: [E, N, K] with block scales sb: [E, ceil(N/128), ceil(K/128)] -> [T, N] (rows past
    offs[-1] zero). One fp32 GEMM per expert of a and the dequantized weight."""
    out = torch.zeros(a.shape[0], b8.shape[1], dtype=out_dtype or a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = (a[start:end].float() @ dequantize_blockwise(b8[e], sb[e]).t()).to(out.dtype)
        start = end
    return out
