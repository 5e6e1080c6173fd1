"""Triton recurrent Lightning attention over a pool of fp32 states: the single-token decode step (state updated in
place), and speculative decoding's verify pass (L tokens per sequence, state read but not written) and commit
(the state advanced by each sequence's accepted tokens).

    S <- exp(g_h) S + k^T v,   o = scale q S      (S = state_pool[slot, h]: [D, Dv] fp32)

Pure bandwidth: each state is read once (and written once); one program owns a [D, BV] column tile of one
(sequence, head) state, so outputs need no cross-program reduction. The three kernels apply each token with the
same arithmetic, so verify + commit leave the state and outputs plain decode steps would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.lightning.checks import check_decode_inputs
from ringlinear.ops.triton_common import round_cast

# Column tile and warps; fixed (never autotuned: a timing run would apply the in-place update twice).
# Chosen from the sweep in benchmarks/bench_lightning.py (NOTES_lightning.md).
DECODE_CONFIG = {"BV": 32, "num_warps": 4}


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, g_ptr, pool_ptr, slots_ptr, o_ptr, scale,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, H, K, V,
                   BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    NV = tl.cdiv(V, BV)
    pid_v, rest = pid % NV, pid // NV
    h, n = rest % H, rest // H
    slot = tl.load(slots_ptr + n).to(tl.int64)
    valid = slot >= 0  # a negative slot is padding: no state traffic, output 0
    o_k = tl.arange(0, BK)
    o_v = pid_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m = m_k[:, None] & m_v[None, :] & valid
    p_s = pool_ptr + ((slot * H + h) * K + o_k[:, None]) * V + o_v[None, :]
    S = tl.load(p_s, mask=m, other=0.0)
    n64 = n.to(tl.int64)
    b_q = tl.load(q_ptr + n64 * sq_n + h * sq_h + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k_ptr + n64 * sk_n + h * sk_h + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + n64 * sv_n + h * sv_h + o_v, mask=m_v, other=0.0).to(tl.float32)
    S = S * tl.exp(tl.load(g_ptr + h)) + b_k[:, None] * b_v[None, :]
    tl.store(p_s, S, mask=m)
    b_o = tl.where(valid, tl.sum(b_q[:, None] * S, 0) * scale, 0.0)
    tl.store(o_ptr + (n64 * H + h) * V + o_v, round_cast(b_o, o_ptr.dtype.element_ty, UPCAST), mask=m_v)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel takes any token/head strides but needs unit stride along the head dim.
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_recurrent_lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One token for each of N sequences (Triton). q, k: [N, H, D]; v: [N, H, Dv]; g: [H] fp32 log decay;
    state_pool: [S, H, D, Dv] fp32 contiguous, rows `slots: [N]` updated in place (negative = padding,
    skipped, output 0). Returns o: [N, H, Dv] in q's dtype."""
    check_decode_inputs(q, k, v, g, state_pool, slots)
    if q.dtype == torch.float64:
        raise ValueError("lightning_decode: float64 is for the PyTorch references only")
    if not state_pool.is_contiguous():
        raise ValueError("lightning_decode: state_pool must be contiguous (it is updated in place)")
    N, H, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    o = torch.empty(N, H, Dv, device=q.device, dtype=q.dtype)
    if N == 0:
        return o
    BK = max(16, triton.next_power_of_2(D))
    BV = max(16, min(DECODE_CONFIG["BV"], triton.next_power_of_2(Dv)))
    grid = (triton.cdiv(Dv, BV) * H * N,)
    _decode_kernel[grid](q, k, v, g.float().contiguous(), state_pool, slots.contiguous(), o, scale,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), H, D, Dv,
                         BK=BK, BV=BV, UPCAST=interpreting(), num_warps=DECODE_CONFIG["num_warps"])
    return o


@triton.jit
def _verify_kernel(q_ptr, k_ptr, v_ptr, g_ptr, pool_ptr, slots_ptr, o_ptr, acc_ptr, scale, L, H, K, V,
                   BK: tl.constexpr, BV: tl.constexpr, COMMIT: tl.constexpr, UPCAST: tl.constexpr):
    # q, k: [N, L, H, K], v: [N, L, H, V] contiguous. COMMIT: apply the first acc[n] tokens and write the state;
    # else: output every token, the state untouched.
    pid = tl.program_id(0)
    NV = tl.cdiv(V, BV)
    pid_v, rest = pid % NV, pid // NV
    h, n = rest % H, rest // H
    slot = tl.load(slots_ptr + n).to(tl.int64)
    valid = slot >= 0
    o_k = tl.arange(0, BK)
    o_v = pid_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m = m_k[:, None] & m_v[None, :] & valid
    p_s = pool_ptr + ((slot * H + h) * K + o_k[:, None]) * V + o_v[None, :]
    S = tl.load(p_s, mask=m, other=0.0)
    decay = tl.exp(tl.load(g_ptr + h))
    n64 = n.to(tl.int64)
    steps = L
    if COMMIT:
        steps = tl.load(acc_ptr + n).to(tl.int32)
    t = 0
    while t < steps:  # a while loop: the interpreter cannot take a runtime bound in range()
        row = (n64 * L + t) * H + h
        b_k = tl.load(k_ptr + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v_ptr + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        S = S * decay + b_k[:, None] * b_v[None, :]
        if not COMMIT:
            b_q = tl.load(q_ptr + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_o = tl.where(valid, tl.sum(b_q[:, None] * S, 0) * scale, 0.0)
            tl.store(o_ptr + row * V + o_v, round_cast(b_o, o_ptr.dtype.element_ty, UPCAST), mask=m_v)
        t += 1
    if COMMIT:
        tl.store(p_s, S, mask=m)


def _verify_launch(q, k, v, g, state_pool, slots, o, accepted, scale, commit: bool) -> None:
    N, L, H, D = k.shape
    Dv = v.shape[-1]
    if N == 0 or L == 0:
        return
    BK = max(16, triton.next_power_of_2(D))
    BV = max(16, min(DECODE_CONFIG["BV"], triton.next_power_of_2(Dv)))
    grid = (triton.cdiv(Dv, BV) * H * N,)
    _verify_kernel[grid](q, k, v, g.float().contiguous(), state_pool, slots.contiguous(), o, accepted, scale, L, H,
                         D, Dv, BK=BK, BV=BV, COMMIT=commit, UPCAST=interpreting(),
                         num_warps=DECODE_CONFIG["num_warps"])


def _check_verify(q, k, v, g, state_pool, slots, what: str) -> None:
    if k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3] or (q is not None and q.shape != k.shape):
        raise ValueError(f"{what}: q, k must be [N, L, H, D] and v [N, L, H, Dv], got "
                         f"{None if q is None else tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    N, L, H, D = k.shape
    check_decode_inputs(k[:, 0] if L else k.new_zeros(N, H, D), k[:, 0] if L else k.new_zeros(N, H, D),
                        v[:, 0] if L else v.new_zeros(N, H, v.shape[-1]), g, state_pool, slots)
    if not state_pool.is_contiguous():
        raise ValueError(f"{what}: state_pool must be contiguous")


def fused_recurrent_lightning_verify(q, k, v, g, state_pool, slots, scale=None) -> torch.Tensor:
    """`naive_lightning_verify` in Triton: q, k: [N, L, H, D]; v: [N, L, H, Dv]; the pool is read, not written.
    Returns o: [N, L, H, Dv] in q's dtype."""
    _check_verify(q, k, v, g, state_pool, slots, "lightning_verify")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(*v.shape, device=q.device, dtype=q.dtype)
    _verify_launch(q, k, v, g, state_pool, slots, o, slots, scale, commit=False)
    return o


def fused_recurrent_lightning_commit(k, v, g, state_pool, slots, accepted) -> None:
    """`naive_lightning_commit` in Triton: the first `accepted[n]` tokens of k, v: [N, L, H, D|Dv] applied to
    `state_pool[slots[n]]` in place."""
    _check_verify(None, k, v, g, state_pool, slots, "lightning_commit")
    if accepted.shape != slots.shape:
        raise ValueError(f"lightning_commit: accepted must be [{slots.shape[0]}], got {tuple(accepted.shape)}")
    k, v = k.contiguous(), v.contiguous()
    _verify_launch(k, k, v, g, state_pool, slots, v, accepted.contiguous(), 1.0, commit=True)
