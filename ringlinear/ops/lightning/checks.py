"""Input validation shared by every Lightning attention path: which argument, which value, what is allowed."""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: references only


def _fail(msg: str):
    raise ValueError(f"lightning_attn: {msg}")


def check_prefill_inputs(q, k, v, g, initial_state, cu_seqlens) -> None:
    if q.dim() != 4:
        _fail(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    B, T, H, D = q.shape
    if k.shape != q.shape:
        _fail(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        _fail(f"v must be [B, T, H, Dv] with B, T, H = {B}, {T}, {H}; got {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOATS:
            _fail(f"{name} dtype {x.dtype} not supported; use one of {_FLOATS}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g.shape != (H,):
        _fail(f"g must be the per-head log decay of shape [{H}], got {tuple(g.shape)}")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            _fail(f"with cu_seqlens the batch dimension must be 1 (packed sequences), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail(f"cu_seqlens must be a 1-D int32/int64 tensor [N+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        want = (n_seq, H, D, v.shape[-1])
        if tuple(initial_state.shape) != want:
            _fail(f"initial_state must have shape {want}, got {tuple(initial_state.shape)}")


def check_decode_inputs(q, k, v, g, state_pool, slots) -> None:
    if q.dim() != 3:
        raise ValueError(f"lightning_decode: q must be [N, H, D], got shape {tuple(q.shape)}")
    N, H, D = q.shape
    if k.shape != q.shape or v.dim() != 3 or v.shape[:2] != (N, H):
        raise ValueError(f"lightning_decode: k must be {tuple(q.shape)} and v [N, H, Dv]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if g.shape != (H,):
        raise ValueError(f"lightning_decode: g must have shape [{H}], got {tuple(g.shape)}")
    if state_pool.dim() != 4 or state_pool.shape[1:] != (H, D, v.shape[-1]):
        raise ValueError(
            f"lightning_decode: state_pool must be [S, {H}, {D}, {v.shape[-1]}], got {tuple(state_pool.shape)}"
        )
    if state_pool.dtype != torch.float32:
        raise ValueError(f"lightning_decode: state_pool must be float32, got {state_pool.dtype}")
    if slots.shape != (N,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lightning_decode: slots must be int32/int64 of shape [{N}], got {slots.dtype} {tuple(slots.shape)}")
