"""Readable PyTorch reference of Lightning attention (linear attention with constant per-head decay).

    S_t = exp(g_h) * S_{t-1} + k_t^T v_t        (state [D, Dv] per head, fp32)
    o_t = scale * q_t S_t

Two forms that define what every fast path must compute: a token-by-token recurrence and a chunked
form (intra-chunk masked products + inter-chunk state), both with initial state in, final state out
and `cu_seqlens` varlen. Inputs bf16/fp16/fp32 (arithmetic fp32) or fp64 (arithmetic fp64, for references).
"""

from __future__ import annotations

import torch

from ringlinear.ops.lightning.checks import check_decode_inputs, check_prefill_inputs


def _recurrent_dense(q, k, v, g, scale, state):
    """q, k: [B, T, H, D], v: [B, T, H, Dv] fp32; g [H]; state [B, H, D, Dv] fp32."""
    decay = torch.exp(g)[None, :, None, None]
    outs = []
    for t in range(q.shape[1]):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    return o, state


def _chunked_dense(q, k, v, g, scale, state, chunk_size):
    """Same contract as `_recurrent_dense`, computed chunk by chunk."""
    B, T, H, _ = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    gh = g[:, None]  # [H, 1]
    outs = []
    for start in range(0, T, chunk_size):
        c = min(chunk_size, T - start)
        qc, kc, vc = qh[:, :, start : start + c], kh[:, :, start : start + c], vh[:, :, start : start + c]
        i = torch.arange(c, device=q.device, dtype=torch.float32)
        diff = i[:, None] - i[None, :]
        causal = diff >= 0
        # exp only of non-positive exponents: masked entries never overflow.
        intra_decay = torch.where(causal, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)  # [H, c, c]
        intra = ((qc @ kc.transpose(-1, -2)) * intra_decay) @ vc
        inter = (qc * torch.exp(gh * (i + 1))[..., None]) @ state
        outs.append((intra + inter) * scale)
        k_decay = torch.exp(gh * (c - 1 - i))[..., None]  # [H, c, 1]
        state = torch.exp(g * c)[None, :, None, None] * state + (kc * k_decay).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2) if outs else q.new_zeros(B, T, H, v.shape[-1])
    return o, state


def _run(dense_fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, **kw):
    check_prefill_inputs(q, k, v, g, initial_state, cu_seqlens)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    out_dtype = q.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 unless a float64 reference
    q, k, v, g = q.to(acc), k.to(acc), v.to(acc), g.to(acc)
    if cu_seqlens is None:
        state = initial_state.to(acc) if initial_state is not None else q.new_zeros(B, H, D, Dv)
        o, state = dense_fn(q, k, v, g, scale, state, **kw)
        return o.to(out_dtype), (state if output_final_state else None)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n in range(len(bounds) - 1):
        s, e = bounds[n], bounds[n + 1]
        state = initial_state[n : n + 1].to(acc) if initial_state is not None else q.new_zeros(1, H, D, Dv)
        o_n, state = dense_fn(q[:, s:e], k[:, s:e], v[:, s:e], g, scale, state, **kw)
        outs.append(o_n)
        states.append(state)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(1, 0, H, Dv)
    final = torch.cat(states, dim=0) if states else q.new_zeros(0, H, D, Dv)
    return o.to(out_dtype), (final if output_final_state else None)


def naive_recurrent_lightning_attn(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Token-by-token reference. q, k: [B, T, H, D]; v: [B, T, H, Dv]; g: [H] fp32 (< 0);
    initial_state: [B, H, D, Dv] (or [N, H, D, Dv] with `cu_seqlens: [N+1]`, then B == 1).
    Returns (o [B, T, H, Dv], final_state fp32 or None)."""
    return _run(_recurrent_dense, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def naive_chunk_lightning_attn(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64
):
    """Chunked PyTorch form of `naive_recurrent_lightning_attn` (same contract); differentiable, so it is
    also the reference for every gradient."""
    return _run(
        _chunked_dense, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size=chunk_size
    )


def naive_lightning_decode(q, k, v, g, state_pool, slots, scale=None):
    """One token for each of N sequences. q, k: [N, H, D]; v: [N, H, Dv]; state_pool: [S, H, D, Dv] fp32,
    updated in place at `slots: [N]` (a negative slot is padding: skipped, its output is 0)."""
    check_decode_inputs(q, k, v, g, state_pool, slots)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = slots >= 0
    idx = slots.clamp(min=0).long()
    state = state_pool[idx]
    state = torch.exp(g.float())[None, :, None, None] * state + k.float()[..., :, None] * v.float()[..., None, :]
    o = torch.einsum("nhd,nhde->nhe", q.float(), state) * scale
    o = torch.where(valid[:, None, None], o, 0.0)
    state_pool[idx[valid]] = state[valid]
    return o.to(q.dtype)


def naive_lightning_verify(q, k, v, g, state_pool, slots, scale=None):
    """L new tokens for each of N sequences, reading their states but not writing them (speculative decoding's
    verify pass). q, k: [N, L, H, D]; v: [N, L, H, Dv]; state_pool: [S, H, D, Dv] fp32; slots: [N] (negative:
    padding, output 0). o[:, t] = scale q_t S_t with S_t = exp(g) S_{t-1} + k_t^T v_t from the pool's state.
    Returns o: [N, L, H, Dv] in q's dtype. `naive_lightning_commit` then advances the states by the accepted
    tokens, with the same arithmetic."""
    N, L = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = slots >= 0
    S = state_pool[slots.clamp(min=0).long()].clone()
    decay = torch.exp(g.float())[None, :, None, None]
    out = []
    for t in range(L):
        S = decay * S + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        out.append(torch.einsum("nhd,nhde->nhe", q[:, t].float(), S) * scale)
    o = torch.stack(out, 1) if out else q.new_zeros(N, 0, q.shape[2], v.shape[-1]).float()
    return torch.where(valid[:, None, None, None], o, 0.0).to(q.dtype)


def naive_lightning_commit(k, v, g, state_pool, slots, accepted):
    """Advance each sequence's state by its first `accepted[n]` (0..L) tokens: S <- exp(g) S + k_t^T v_t in order,
    written back to `state_pool[slots]` (negative slots: padding, skipped). k: [N, L, H, D]; v: [N, L, H, Dv]."""
    S = state_pool[slots.clamp(min=0).long()].clone()
    decay = torch.exp(g.float())[None, :, None, None]
    for t in range(k.shape[1]):
        upd = decay * S + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        S = torch.where((accepted > t)[:, None, None, None], upd, S)
    keep = slots >= 0
    state_pool[slots[keep].long()] = S[keep]
