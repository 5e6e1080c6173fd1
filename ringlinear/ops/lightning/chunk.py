"""Triton chunked prefill of Lightning attention, forward and backward (fp32 state throughout).

    S_t = exp(g_h) S_{t-1} + k_t^T v_t,   o_t = scale q_t S_t      (per head; g_h < 0 constant)

Time is cut into segments of whole 64-token chunks. Pass 1 computes every segment's local state in
parallel, pass 2 scans those states across segments (closed-form decay exp(g * len)), pass 3 runs the
chunked form (masked intra-chunk QK^T with exp(g (i - j)), plus q exp(g (i + 1)) S) inside every segment in
parallel from its start state. The backward is three such passes with swapped roles (dq forward in time;
dk, dv backward in time), so one set of kernels serves both directions.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from ringlinear.ops.backend import interpreting
from ringlinear.ops.lightning.checks import check_prefill_inputs
from ringlinear.ops.triton_common import exact_dot, round_cast

BT = 64  # chunk length: the intra-chunk [BT, BT] decay matrix and every dot's M/N
_MAX_DIM = 256  # a [D, BV] fp32 state tile lives in registers


def _fixed(x: torch.Tensor) -> bool:
    # No autotuning in the interpreter (nothing to time) or off CUDA.
    return interpreting() or not x.is_cuda


# ----------------------------------------------------------------------------------------------------
# Kernels. Tokens are rows of the flattened [B*T, H, D] tensors; sequence n spans rows [bos, eos).
# A position `tau` counts time within a sequence in the pass's direction: row bos + tau forward,
# eos - 1 - tau when REVERSE. Segment `pid_s` covers tau in [s * L_SEG, s * L_SEG + L_SEG).
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _segment(pid_s, T, cu_ptr, seg_seq_ptr, seg_first_ptr, NS, L_SEG, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        n = tl.load(seg_seq_ptr + pid_s)
        bos = tl.load(cu_ptr + n).to(tl.int64)
        eos = tl.load(cu_ptr + n + 1).to(tl.int64)
        s = pid_s - tl.load(seg_first_ptr + n)
    else:
        n = pid_s // NS
        s = pid_s % NS
        bos = n.to(tl.int64) * T
        eos = bos + T
    lo = s * L_SEG
    seg_len = tl.minimum(L_SEG, (eos - bos - lo).to(tl.int32))
    return bos, eos, lo, seg_len


@triton.jit
def _rows(bos, eos, tau, REVERSE: tl.constexpr):
    if REVERSE:
        return eos - 1 - tau
    else:
        return bos + tau


@triton.jit
def _segment_state_kernel(k_ptr, v_ptr, g_ptr, u_ptr, cu_ptr, seg_seq_ptr, seg_first_ptr,
                          T, H, K, V, NS, L_SEG, SEG_CHUNKS: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                          IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
                          UPCAST: tl.constexpr):
    # Pass 1: U_s = sum over the segment's tokens of exp(g * (len - 1 - tau)) k^T v, from a zero state.
    pid = tl.program_id(0)
    NV = tl.cdiv(V, BV)
    pid_v, rest = pid % NV, pid // NV
    h, pid_s = rest % H, rest // H
    bos, eos, lo, seg_len = _segment(pid_s, T, cu_ptr, seg_seq_ptr, seg_first_ptr, NS, L_SEG, IS_VARLEN)
    g = tl.load(g_ptr + h)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = pid_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    U = tl.zeros([BK, BV], dtype=tl.float32)
    # Compile-time trip count: the interpreter cannot take a tensor (or runtime int) loop bound; chunks past
    # the segment's end (only in a sequence's last segment) are all-masked and leave the state unchanged.
    for ci in range(0, SEG_CHUNKS):
        c0 = ci * BT
        c = tl.minimum(BT, tl.maximum(seg_len - c0, 0))
        m_t = o_t < c
        rows = _rows(bos, eos, lo + c0 + o_t, REVERSE)
        b_k = tl.load(k_ptr + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v_ptr + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        # tl.where before exp: padded rows would have positive exponents (inf * 0 = nan). The per-token decay
        # goes on v, not k: k then feeds the tensor cores unmodified, straight from shared memory.
        w = tl.exp(g * tl.where(m_t, c - 1 - o_t, 0).to(tl.float32))
        b_vw = round_cast(b_v * w[:, None], b_v.dtype, UPCAST)
        U = exact_dot(tl.trans(b_k), b_vw, U * tl.exp(g * c.to(tl.float32)), DOT_PREC, UPCAST)
    p_u = u_ptr + ((pid_s * H + h).to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    tl.store(p_u, U, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _segment_scan_kernel(u_ptr, h0_ptr, ht_ptr, g_ptr, cu_ptr, seg_first_ptr, T, H, KV, NS, L_SEG,
                         BLOCK: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr):
    # Pass 2, in place: U_s -> start state of segment s; the state after the last segment -> ht.
    # Elementwise over the flattened [K * V] state, sequential over segments; four segments' loads are
    # issued before their updates so one scan step costs a quarter of a memory latency.
    pid_nh, pid_b = tl.program_id(0), tl.program_id(1)
    n, h = pid_nh // H, pid_nh % H
    if IS_VARLEN:
        seq_len = (tl.load(cu_ptr + n + 1) - tl.load(cu_ptr + n)).to(tl.int32)
        first = tl.load(seg_first_ptr + n)
        nseg = tl.load(seg_first_ptr + n + 1) - first
    else:
        seq_len = T
        first = n * NS
        nseg = NS
    g = tl.load(g_ptr + h)
    offs = pid_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < KV
    if HAS_H0:
        S = tl.load(h0_ptr + pid_nh.to(tl.int64) * KV + offs, mask=m, other=0.0)
    else:
        S = tl.zeros([BLOCK], dtype=tl.float32)
    s = 0
    while s < nseg:  # a while loop: the interpreter cannot take a runtime bound in range()
        p0 = u_ptr + ((first + s) * H + h).to(tl.int64) * KV + offs
        step = H * KV
        u0 = tl.load(p0, mask=m & (s < nseg), other=0.0)
        u1 = tl.load(p0 + step, mask=m & (s + 1 < nseg), other=0.0)
        u2 = tl.load(p0 + 2 * step, mask=m & (s + 2 < nseg), other=0.0)
        u3 = tl.load(p0 + 3 * step, mask=m & (s + 3 < nseg), other=0.0)
        # a segment past the end has length 0: decay 1 and u = 0 leave S unchanged
        l0 = tl.minimum(tl.maximum(seq_len - s * L_SEG, 0), L_SEG).to(tl.float32)
        l1 = tl.minimum(tl.maximum(seq_len - (s + 1) * L_SEG, 0), L_SEG).to(tl.float32)
        l2 = tl.minimum(tl.maximum(seq_len - (s + 2) * L_SEG, 0), L_SEG).to(tl.float32)
        l3 = tl.minimum(tl.maximum(seq_len - (s + 3) * L_SEG, 0), L_SEG).to(tl.float32)
        tl.store(p0, S, mask=m & (s < nseg))
        S = S * tl.exp(g * l0) + u0
        tl.store(p0 + step, S, mask=m & (s + 1 < nseg))
        S = S * tl.exp(g * l1) + u1
        tl.store(p0 + 2 * step, S, mask=m & (s + 2 < nseg))
        S = S * tl.exp(g * l2) + u2
        tl.store(p0 + 3 * step, S, mask=m & (s + 3 < nseg))
        S = S * tl.exp(g * l3) + u3
        s += 4
    tl.store(ht_ptr + pid_nh.to(tl.int64) * KV + offs, S, mask=m)


@triton.jit
def _segment_output_kernel(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, g_ptr, cu_ptr, seg_seq_ptr, seg_first_ptr, scale,
                           T, H, K, V, NS, L_SEG, SEG_CHUNKS: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                           IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
                           UPCAST: tl.constexpr):
    # Pass 3: the chunked form inside one segment, from the segment's start state (pass 2).
    pid = tl.program_id(0)
    NV = tl.cdiv(V, BV)
    pid_v, rest = pid % NV, pid // NV
    h, pid_s = rest % H, rest // H
    bos, eos, lo, seg_len = _segment(pid_s, T, cu_ptr, seg_seq_ptr, seg_first_ptr, NS, L_SEG, IS_VARLEN)
    g = tl.load(g_ptr + h)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = pid_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s = s_ptr + ((pid_s * H + h).to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    S = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)
    # Constant decay: the intra-chunk decay matrix and the query decay are the same for every chunk.
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    decay = tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0.0)), 0.0) * scale
    q_decay = tl.exp(g * (o_t + 1).to(tl.float32)) * scale
    # Compile-time trip count: the interpreter cannot take a tensor (or runtime int) loop bound; chunks past
    # the segment's end (only in a sequence's last segment) are all-masked and leave the state unchanged.
    for ci in range(0, SEG_CHUNKS):
        c0 = ci * BT
        c = tl.minimum(BT, tl.maximum(seg_len - c0, 0))
        m_t = o_t < c
        rows = _rows(bos, eos, lo + c0 + o_t, REVERSE)
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q_ptr + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_qk, other=0.0)
        b_k = tl.load(k_ptr + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_qk, other=0.0)
        b_v = tl.load(v_ptr + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        # Row scalings (query decay, scale) act on the fp32 products, so q and k reach the tensor cores as loaded.
        b_o = exact_dot(b_q, round_cast(S, b_q.dtype, UPCAST), None, DOT_PREC, UPCAST) * q_decay[:, None]
        A = exact_dot(b_q, tl.trans(b_k), None, DOT_PREC, UPCAST) * decay
        b_o = exact_dot(round_cast(A, b_v.dtype, UPCAST), b_v, b_o, DOT_PREC, UPCAST)
        tl.store(o_ptr + rows[:, None] * (H * V) + h * V + o_v[None, :], round_cast(b_o, o_ptr.dtype.element_ty, UPCAST),
                 mask=m_t[:, None] & m_v[None, :])
        w = tl.exp(g * tl.where(m_t, c - 1 - o_t, 0).to(tl.float32))
        b_vw = round_cast(b_v * w[:, None], b_v.dtype, UPCAST)
        S = exact_dot(tl.trans(b_k), b_vw, S * tl.exp(g * c.to(tl.float32)), DOT_PREC, UPCAST)


# ----------------------------------------------------------------------------------------------------
# Launch configs: fixed in the interpreter / off CUDA, autotuned on CUDA (key: head dims, direction).
# ----------------------------------------------------------------------------------------------------

# Pruned with the sm_90 resource report (compiled on the CPU box): BV=128 with 4 warps spills in pass 3.
_TUNE_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s)
    for bv, w, s in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))
]
_state_tuned = triton.autotune(_TUNE_CONFIGS, key=["K", "V", "BK", "REVERSE", "DOT_PREC"])(_segment_state_kernel)
_output_tuned = triton.autotune(_TUNE_CONFIGS, key=["K", "V", "BK", "REVERSE", "DOT_PREC"])(_segment_output_kernel)


def _bv(V: int) -> int:
    return max(16, min(64, triton.next_power_of_2(V)))


# Segments: enough (segments x heads) programs to fill the GPU several times over, few enough that the
# fp32 segment states (written in pass 1, read+written in pass 2, read in pass 3) stay small next to q, k, v, o.
# Device sweep (H100, H=16, D=128, bf16): longer segments win until ~256 segment programs remain (the scan
# over segment states is the cost of short ones): 32K tokens 0.66 ms at 4 chunks -> 0.35 ms at 32.
_TARGET_PROGRAMS = 256
_MAX_SEG_CHUNKS = 32


def _default_seg_chunks(n_tokens: int, H: int, on_gpu: bool) -> int:
    if not on_gpu:
        return 2  # CPU/interpreter: tiny inputs still cross segment boundaries
    want = max(1, n_tokens * H // (BT * _TARGET_PROGRAMS))
    return min(_MAX_SEG_CHUNKS, 1 << (want.bit_length() - 1))


_PLANS: collections.OrderedDict = collections.OrderedDict()


def _segment_plan(cu: tuple[int, ...], L_SEG: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(seg_first [N+1], seg_seq [n_segs]) int32 on `dev`: where each sequence's segments start, and each segment's
    sequence. Cached by (bounds, L_SEG, device): every linear layer of a batch, forward and backward, reuses one
    copy, and the copy is asynchronous from pinned memory, so no pass waits for the GPU to drain."""
    key = (cu, L_SEG, dev)
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    counts = [triton.cdiv(b - a, L_SEG) for a, b in zip(cu, cu[1:])]
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    seq = [i for i, c in enumerate(counts) for _ in range(c)]
    host = torch.tensor(first + seq, dtype=torch.int32)
    if dev.type == "cuda":
        host = host.pin_memory()
    both = host.to(dev, non_blocking=True)
    plan = (both[: len(first)], both[len(first):], first[-1])
    _PLANS[key] = plan
    if len(_PLANS) > 64:
        _PLANS.popitem(last=False)
    return plan


def _pass(q, k, v, g, scale, h0, N, T, cu_list, cu, reverse, seg_chunks, want_output=True):
    """One direction of the chunked recurrence over flattened tokens.

    q, k: [R, H, K]; v: [R, H, V] contiguous; g: [H] fp32; h0: [N, H, K, V] fp32 or None;
    cu_list/cu: bounds of the N sequences (host list and device int32), or None for N sequences of length T.
    Returns (o [R, H, V] in q's dtype or None, ht [N, H, K, V] fp32)."""
    R, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    fixed = _fixed(q)
    if seg_chunks is None:
        seg_chunks = _default_seg_chunks(R, H, not fixed)
    L_SEG = seg_chunks * BT
    if cu_list is None:
        NS = triton.cdiv(T, L_SEG)
        n_segs = N * NS
        cu_t = seg_seq = seg_first = q.new_empty(1, dtype=torch.int32)  # unread placeholders
    else:
        NS = 0
        seg_first, seg_seq, n_segs = _segment_plan(tuple(cu_list), L_SEG, dev)
        cu_t = cu
    is_varlen = cu_list is not None
    BK = max(16, triton.next_power_of_2(K))
    # fp32 inputs: three-pass TF32 on the tensor cores (fp32-level error); bf16/fp16 operands ignore it.
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    o = torch.empty(R, H, V, device=dev, dtype=q.dtype) if want_output else None
    if N == 0:
        return o, ht
    u = torch.empty(max(n_segs, 1), H, K, V, device=dev, dtype=torch.float32)
    common = dict(T=T, H=H, K=K, V=V, NS=NS, L_SEG=L_SEG, SEG_CHUNKS=seg_chunks, BK=BK, BT=BT, IS_VARLEN=is_varlen, REVERSE=reverse,
                  DOT_PREC=prec, UPCAST=interpreting())
    if n_segs > 0:
        if fixed:
            BV = _bv(V)
            grid = (triton.cdiv(V, BV) * H * n_segs,)
            _segment_state_kernel[grid](k, v, g, u, cu_t, seg_seq, seg_first, BV=BV, num_warps=4, **common)
        else:
            grid = lambda meta: (triton.cdiv(V, meta["BV"]) * H * n_segs,)
            _state_tuned[grid](k, v, g, u, cu_t, seg_seq, seg_first, **common)
    KV = K * V
    BLOCK = min(1024, triton.next_power_of_2(KV))
    _segment_scan_kernel[(N * H, triton.cdiv(KV, BLOCK))](
        u, h0 if h0 is not None else u, ht, g, cu_t, seg_first, T, H, KV, NS, L_SEG,
        BLOCK=BLOCK, HAS_H0=h0 is not None, IS_VARLEN=is_varlen, num_warps=4)
    if want_output and n_segs > 0:
        if fixed:
            BV = _bv(V)
            grid = (triton.cdiv(V, BV) * H * n_segs,)
            _segment_output_kernel[grid](q, k, v, o, u, g, cu_t, seg_seq, seg_first, scale, BV=BV, num_warps=4, **common)
        else:
            grid = lambda meta: (triton.cdiv(V, meta["BV"]) * H * n_segs,)
            _output_tuned[grid](q, k, v, o, u, g, cu_t, seg_seq, seg_first, scale, **common)
    return o, ht


class _ChunkLightning(torch.autograd.Function):
    """Autograd over the Triton passes. With G_t = sum_{i >= t} exp(g (i - t)) scale q_i^T do_i
    + exp(g (T - 1 - t)) dS_T (a backward-in-time recurrence):
        dq_t = scale do_t S_t^T   (forward pass with q, k, v, S_0 -> do, v, k, S_0^T)
        dv_t = k_t G_t,  dk_t = v_t G_t^T   (reverse passes; G carries scale q^T do)
        dS_0 = exp(g) G_0."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, cu, cu_list, N, T, seg_chunks):
        o, ht = _pass(q, k, v, g, scale, h0, N, T, cu_list, cu, False, seg_chunks)
        ctx.save_for_backward(q, k, v, g, h0, cu)
        ctx.meta = (scale, cu_list, N, T, seg_chunks)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu = ctx.saved_tensors
        scale, cu_list, N, T, seg_chunks = ctx.meta
        if ctx.needs_input_grad[3]:
            raise NotImplementedError("lightning_attn (triton): no gradient for the decay g (a fixed buffer)")
        dq = dk = dv = dh0 = None
        only_state = do is None  # o unused: q only reaches the loss through o, so dq is None
        if only_state:
            do = torch.zeros(q.shape[:2] + (v.shape[-1],), device=q.device, dtype=q.dtype)
        do = do.contiguous()
        if ctx.needs_input_grad[0] and not only_state:
            h0t = h0.transpose(-1, -2).contiguous() if h0 is not None else None
            dq, _ = _pass(do, v, k, g, scale, h0t, N, T, cu_list, cu, False, seg_chunks)
        # Reverse passes: the carried state is G / scale, so its initial value is dS_T / (scale exp(g)):
        # after the first reverse step it has decayed to dS_T / scale, as G_{T-1} / scale requires.
        inv = (1.0 / (scale * torch.exp(g)))[None, :, None, None]
        gs = dht * inv if dht is not None else None
        need_dv = ctx.needs_input_grad[2] or ctx.needs_input_grad[5]
        if need_dv:
            dv, gfin = _pass(k, q, do, g, scale, gs, N, T, cu_list, cu, True, seg_chunks,
                             want_output=ctx.needs_input_grad[2])
            if ctx.needs_input_grad[5]:
                dh0 = gfin * (scale * torch.exp(g))[None, :, None, None]
        if ctx.needs_input_grad[1]:
            gst = gs.transpose(-1, -2).contiguous() if gs is not None else None
            dk, _ = _pass(v, do, q, g, scale, gst, N, T, cu_list, cu, True, seg_chunks)
        return dq, dk, dv, None, None, dh0, None, None, None, None, None


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    seg_chunks: int | None = None,
    cu_seqlens_host: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention prefill (Triton). q, k: [B, T, H, D]; v: [B, T, H, Dv] (bf16, fp16 or fp32);
    g: [H] log decay (< 0); initial_state: [B or N, H, D, Dv]; cu_seqlens: [N+1] int32 with B == 1.
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B or N, H, D, Dv] fp32 or None). Differentiable
    in q, k, v and initial_state. `seg_chunks` (64-token chunks per parallel segment) is a tuning knob.
    `cu_seqlens_host`: cu_seqlens as a host list when the caller has it (saves a device-to-host read)."""
    check_prefill_inputs(q, k, v, g, initial_state, cu_seqlens)
    if q.dtype == torch.float64:
        raise ValueError("lightning_attn: float64 is for the PyTorch references only; the Triton path takes bf16/fp16/fp32")
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    if max(D, Dv) > _MAX_DIM:
        raise ValueError(f"lightning_attn: head dims up to {_MAX_DIM} supported by the Triton path, got D={D}, Dv={Dv}")
    devices = {x.device for x in (q, k, v, g)} | ({initial_state.device} if initial_state is not None else set())
    if len(devices) != 1:
        raise ValueError(f"lightning_attn: all inputs must be on one device, got {devices}")
    if g.requires_grad and torch.is_grad_enabled():
        raise ValueError("lightning_attn (triton): g must not require grad (the decay is a fixed buffer)")
    if seg_chunks is not None and seg_chunks < 1:
        raise ValueError(f"seg_chunks must be >= 1, got {seg_chunks}")
    scale = D**-0.5 if scale is None else float(scale)
    cu_list = None
    cu = None
    if cu_seqlens is not None:
        cu_list = [int(x) for x in (cu_seqlens.tolist() if cu_seqlens_host is None else cu_seqlens_host)]
        if len(cu_list) != cu_seqlens.numel():
            raise ValueError(f"lightning_attn: cu_seqlens_host has {len(cu_list)} bounds, cu_seqlens {cu_seqlens.numel()}")
        if cu_list[0] != 0 or cu_list[-1] != T or any(b < a for a, b in zip(cu_list, cu_list[1:])):
            raise ValueError(f"lightning_attn: cu_seqlens must rise from 0 to T={T}, got {cu_list}")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    flat = lambda x: x.reshape(B * T, H, x.shape[-1]).contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, ht = _ChunkLightning.apply(flat(q), flat(k), flat(v), g.detach().float().contiguous(), scale, h0, cu, cu_list,
                                  B if cu_list is None else len(cu_list) - 1, T, seg_chunks)
    return o.view(B, T, H, Dv), (ht if output_final_state else None)
