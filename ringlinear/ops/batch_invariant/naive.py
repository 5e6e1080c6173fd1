"""PyTorch references of the aligned-numerics ops: every row (token, query, sequence) is computed by calls whose
shapes do not depend on the other rows, so its bits do not either. `torch.bmm` with one [1, K] x [K, N] product per
row stands for a batch-invariant GEMM (a plain `x @ w.T` on the CPU changes its blocking with M)."""

from __future__ import annotations

import torch

from ringlinear.ops.attention import repeat_kv


def naive_bi_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [M, K] @ w: [N, K]^T -> fp32 [M, N], one [1, K] x [K, N] product per row."""
    M, K = x.shape
    if M == 0:
        return x.new_zeros(0, w.shape[0], dtype=torch.float32)
    return torch.bmm(x.float()[:, None, :], w.float().t().expand(M, K, w.shape[0]))[:, 0]


def naive_bi_rows_matmul(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[expert[r]]^T, fp32. x: [P, K]; w: [E, N, K]; expert: [P]."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e in expert.unique().tolist():
        rows = (expert == e).nonzero()[:, 0]
        out[rows] = naive_bi_matmul(x[rows], w[e])
    return out


def naive_bi_attention(q, k_src, v_src, tables, block_size, q_seq, q_keys, scale) -> torch.Tensor:
    """One query at a time (see `bi_attention`). k_src, v_src: [R, Hkv, D]."""
    T, H, D = q.shape
    rep = H // k_src.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    seqs, lens = q_seq.tolist(), q_keys.tolist()
    for i in range(T):
        j = torch.arange(lens[i], device=q.device)
        rows = tables[seqs[i]].long()[j // block_size] * block_size + j % block_size
        kk = repeat_kv(k_src[rows].float(), rep, 1)  # [L, H, D]
        vv = repeat_kv(v_src[rows].float(), rep, 1)
        s = (kk * q[i].float()[None]).sum(-1) * scale  # [L, H]
        p = torch.softmax(s, 0)
        out[i] = (p[..., None] * vv).sum(0)
    return out.to(q.dtype)


def naive_recurrent_lightning(q, k, v, g, scale, state_pool, slots, bounds: list[int]) -> torch.Tensor:
    """Sequences in lockstep, one token each per step: S <- exp(g) S + k^T v, o = scale q S (fp32, one bmm per
    (sequence, head)); see `recurrent_lightning`."""
    T, H, D = q.shape
    Dv = v.shape[-1]
    o = torch.zeros(T, H, Dv, dtype=torch.float32, device=q.device)
    lens = [y - x for x, y in zip(bounds, bounds[1:])]
    slot_list = slots.tolist()
    decay = torch.exp(g.float())[None, :, None, None]
    for t in range(max(lens, default=0)):
        act = [n for n, ln in enumerate(lens) if ln > t and slot_list[n] >= 0]
        if not act:
            continue
        rows = torch.tensor([bounds[n] + t for n in act], device=q.device)
        sl = torch.tensor([slot_list[n] for n in act], device=q.device)
        S = decay * state_pool[sl] + k[rows].float()[..., :, None] * v[rows].float()[..., None, :]
        state_pool[sl] = S
        n = len(act)
        o[rows] = torch.bmm(q[rows].float().reshape(n * H, 1, D), S.reshape(n * H, D, Dv)).view(n, H, Dv) * scale
    return o.to(q.dtype)
