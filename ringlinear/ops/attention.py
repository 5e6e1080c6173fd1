"""Softmax attention over packed sequences, as functions of tensors (no cache): causal GQA attention of one
sequence, of a packed batch in one call (varlen flash for bf16/fp16, a padded SDPA for fp32), and of a prompt
chunk over a cached prefix plus itself. `o_i = sum_j softmax_j(scale q_i . k_j) v_j` over the keys query i sees.
Layouts: q [T, H, D]; k, v [T, Hkv, D] with H a multiple of Hkv (GQA); packed batches by `cu_seqlens: [N+1]`."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ringlinear.ops.backend import varlen_attention_enabled

# Padding allowed (padded batch tokens / real tokens) before one SDPA call per sequence is the cheaper way.
PADDED_MAX_WASTE = 8


def repeat_kv(x: torch.Tensor, rep: int, dim: int) -> torch.Tensor:
    """Each KV head repeated `rep` times along `dim` (GQA -> MHA): head h serves query heads h*rep .. h*rep+rep-1."""
    return x if rep == 1 else x.repeat_interleave(rep, dim)


def cu_seqlens_from_lens(lens: list[int], device=None) -> torch.Tensor:
    """[N+1] int32 offsets of N packed sequences of lengths `lens`."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        out[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    return out if device is None else out.to(device)


def positions_from_lens(lens: list[int], starts: list[int], device=None) -> torch.Tensor:
    """[sum(lens)] int64 positions: sequence n's tokens at starts[n], starts[n] + 1, ..."""
    if not lens:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lens)])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA attention of the last `Tq` positions over `Tk >= Tq` keys. q: [Tq, H, D]; k, v: [Tk, Hkv, D].
    Inputs go to SDPA as 4-D [1, H, T, D]: its flash and memory-efficient kernels take nothing else."""
    Tq, Tk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)[None]
    kh, vh = (repeat_kv(x.transpose(0, 1)[None], rep, 1) for x in (k, v))
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:  # queries are the last Tq positions: causal mask aligned to the lower right
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    return o[0].transpose(0, 1)


@functools.cache
def varlen_flash():
    """torch's varlen flash attention (`torch.nn.attention.varlen.varlen_attn`), or None on builds without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                            scale: float) -> torch.Tensor:
    """Causal GQA attention of each packed sequence over itself in one flash-attention call. q: [T, H, D];
    k, v: [T, Hkv, D]; cu_seqlens: [N+1] int32 -> [T, H, D]. Same result as `causal_attention` per sequence."""
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep, 1), repeat_kv(v, rep, 1)
    cu = cu_seqlens.to(torch.int32)
    return varlen_flash()(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scale,
                          window_size=(-1, 0))


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], max_len: int,
                            scale: float) -> torch.Tensor:
    """Causal GQA attention of each packed sequence over itself in one SDPA call, the sequences padded to
    `max_len` as a batch [N, H, max_len, D] under a plain causal mask (a real query never reaches a padded key:
    the padding comes after each sequence; padded queries are dropped, so they get no gradient). For dtypes the
    varlen flash kernel does not take (fp32): one call instead of one per sequence, which on the GPU is
    launch-bound for batches of many short sequences. q: [T, H, D]; k, v: [T, Hkv, D]; bounds: the host list
    `cu_seqlens` -> [T, H, D]."""
    starts, lens = bounds[:-1], [y - x for x, y in zip(bounds, bounds[1:])]
    keep = [n for n, ln in enumerate(lens) if ln > 0]
    j = torch.arange(max_len)
    lens_t = torch.tensor([lens[n] for n in keep])
    valid = j[None, :] < lens_t[:, None]  # [N, L]
    idx = torch.tensor([starts[n] for n in keep])[:, None] + torch.minimum(j[None, :], lens_t[:, None] - 1)
    idx, valid = idx.to(q.device, non_blocking=True), valid.to(q.device, non_blocking=True)
    qh, kh, vh = (t[idx].transpose(1, 2) for t in (q, k, v))  # [N, H, L, D]
    rep = qh.shape[1] // kh.shape[1]
    kh, vh = repeat_kv(kh, rep, 1), repeat_kv(vh, rep, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return o.transpose(1, 2)[valid]  # sequences are contiguous and in order: the packed layout again


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            bounds: list[int], max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of every packed sequence over itself (no past), in as few calls as the device allows:
    varlen flash (CUDA bf16/fp16), a padded SDPA (CUDA fp32, when padding stays under PADDED_MAX_WASTE), else one
    SDPA call per sequence. `RINGLINEAR_VARLEN_ATTN=0` forces the per-sequence calls."""
    N = len(bounds) - 1
    one_call = N > 1 and q.is_cuda and varlen_attention_enabled()
    if one_call and q.dtype in (torch.bfloat16, torch.float16) and varlen_flash() is not None:
        return varlen_causal_attention(q, k, v, cu_seqlens, max_len, scale)
    if one_call and N * max_len <= PADDED_MAX_WASTE * bounds[-1]:
        return padded_causal_attention(q, k, v, bounds, max_len, scale)
    b = bounds
    return torch.cat([causal_attention(q[b[n] : b[n + 1]], k[b[n] : b[n + 1]], v[b[n] : b[n + 1]], scale)
                      for n in range(N)], 0)


def prefix_chunk_attention(q, k, v, k_prefix, v_prefix, scale):
    """A prompt chunk's queries over the cached prefix (all visible) and the chunk itself (causal).
    q, k, v: [Tq, H|Hkv, D]; k_prefix, v_prefix: [Tp, Hkv, D]. On CUDA (bf16/fp16) two flash-attention calls
    merged by their log-sum-exp, so no [Tq, Tp + Tq] mask is ever built; elsewhere one masked SDPA."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return causal_attention(q, torch.cat([k_prefix, k]), torch.cat([v_prefix, v]), scale)
    rep = q.shape[1] // k.shape[1]

    def heads(x):  # [T, Hkv, D] -> [1, H, T, D]
        return repeat_kv(x.transpose(0, 1)[None], rep, 1)

    qh = q.transpose(0, 1)[None]
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    o1, lse1 = flash(qh, heads(k_prefix), heads(v_prefix), 0.0, False, False, scale=scale)[:2]
    o2, lse2 = flash(qh, heads(k), heads(v), 0.0, True, False, scale=scale)[:2]
    lse = torch.logaddexp(lse1, lse2)
    o = o1.float() * torch.exp(lse1 - lse)[..., None] + o2.float() * torch.exp(lse2 - lse)[..., None]
    return o[0].transpose(0, 1).to(q.dtype)
