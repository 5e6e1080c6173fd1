"""Aligned numerics: sampler and trainer compute a token's values with the same arithmetic, whatever the batch it
is in and whether it is prefilled or decoded (docs/architecture.md, "RL alignment"). One switch per source of
difference, set for a block by `aligned_numerics(...)` (a context variable, like `use_backend`):

    unfused       the engine runs the trainer's norm / RoPE / residual ops (not its fused inference-only kernels)
    rope          cos/sin looked up in one table per position (computed once in fp64), not evaluated per call: a
                  vectorised cos gives a lane and the scalar tail different bits, so a token's angle would depend
                  on how many tokens share its call
    gemm          dense projections and the lm_head: a fixed-tile GEMM, fp32 accumulation, rows independent of M
    moe           router logits by that GEMM; experts row by row (no grouped GEMM whose tiling follows the batch)
    softmax_attn  one query at a time over its keys in a fixed order (training, paged prefill and decode alike)
    linear_attn   Lightning attention in the recurrent (decode) order everywhere: the engine's prefill and the
                  trainer's forward step token by token like decode (the trainer's backward uses the chunk form)

Each op here has a PyTorch reference (`naive.py`, rows computed independently of each other) and a Triton kernel
(`kernels.py`); `ringlinear.ops.backend` picks one, as for every op.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.batch_invariant import naive

ITEMS = ("unfused", "rope", "gemm", "moe", "softmax_attn", "linear_attn")
NOT_YET = {"residual_fp32"}


@dataclass(frozen=True)
class Alignment:
    """Which alignment switches are on (see the module docstring)."""

    unfused: bool = False
    rope: bool = False
    gemm: bool = False
    moe: bool = False
    softmax_attn: bool = False
    linear_attn: bool = False

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @property
    def items(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    def spec(self) -> str:
        on = self.items
        return "all" if len(on) == len(ITEMS) else ",".join(on) or "off"


def parse_alignment(spec: str | Alignment | None) -> Alignment:
    """"off" / None / "" -> nothing; "all" -> every switch; else a comma list of `ITEMS`."""
    if isinstance(spec, Alignment):
        return spec
    spec = (spec or "off").strip().lower()
    if spec in ("off", "none", ""):
        return Alignment()
    if spec == "all":
        return Alignment(**{name: True for name in ITEMS})
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if NOT_YET & set(names):
        raise ValueError(f"aligned_numerics: {sorted(NOT_YET & set(names))} not yet implemented (an fp32 residual "
                         "stream, as the report's alignment uses, is a planned switch)")
    bad = [n for n in names if n not in ITEMS]
    if bad:
        raise ValueError(f"aligned_numerics: unknown item(s) {bad}; use 'off', 'all' or a comma list of {ITEMS}")
    return Alignment(**{name: True for name in names})


_OFF = Alignment()
_current: contextvars.ContextVar[Alignment | None] = contextvars.ContextVar("ringlinear_alignment", default=None)


def current_alignment() -> Alignment:
    return _current.get() or _OFF


@contextlib.contextmanager
def aligned_numerics(spec: str | Alignment | None) -> Iterator[Alignment]:
    """Run the forwards inside the block with the alignment switches of `spec` (this thread only)."""
    token = _current.set(parse_alignment(spec))
    try:
        yield current_alignment()
    finally:
        _current.reset(token)


# ---- dense GEMM ---------------------------------------------------------------------------------------------------
def _bi_mm(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ w[N, K]^T -> fp32 [M, N], each row computed by the same arithmetic whatever M."""
    if use_triton(x2):
        from ringlinear.ops.batch_invariant.kernels import bi_matmul

        return bi_matmul(x2, w)
    return naive.naive_bi_matmul(x2, w)


class _BiLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, out_dtype):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        y = _bi_mm(x.reshape(-1, x.shape[-1]), w)
        if b is not None:
            y = y + b.float()
        return y.to(out_dtype).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        # gradients need no batch invariance: the ordinary GEMMs, fp32 products rounded to each operand's dtype
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).float()
        gx = (g2 @ w.float()).to(x.dtype).view_as(x) if ctx.needs_input_grad[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(w.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def bi_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x w^T + b with fp32 accumulation, rounded once to `out_dtype` (default x's); x: [..., K]; w: [N, K]."""
    return _BiLinear.apply(x, w, b, out_dtype or x.dtype)


def project(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """`layer(x)` for an `nn.Linear`, through `bi_linear` when the `gemm` switch is on."""
    if current_alignment().gemm and isinstance(layer, torch.nn.Linear):
        return bi_linear(x, layer.weight, layer.bias)
    return layer(x)


class _AlignedValue(torch.autograd.Function):
    """Values from `value_fn`, gradients from `grad_fn` (the same function computed the ordinary way)."""

    @staticmethod
    def forward(ctx, value_fn, grad_fn, *inputs):
        ctx.grad_fn = grad_fn
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in inputs])
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        with torch.no_grad():
            return value_fn(*inputs)

    @staticmethod
    def backward(ctx, go):
        saved = ctx.saved_tensors
        ins, wants = [], []
        for n, (t, other) in enumerate(zip(saved, ctx.others)):
            if t is not None and ctx.needs_input_grad[n + 2]:
                t = t.detach().requires_grad_()
                wants.append(n)
            ins.append(t if t is not None else other)
        grads = [None] * len(ins)
        if wants:
            with torch.enable_grad():
                out = ctx.grad_fn(*ins)
                got = torch.autograd.grad(out, [ins[n] for n in wants], go, allow_unused=True)
            for n, gr in zip(wants, got):
                grads[n] = gr
        return (None, None, *grads)


def aligned_value(value_fn, grad_fn, *inputs):
    """`value_fn(*inputs)` (the aligned computation, no autograd of its own) with the gradient of
    `grad_fn(*inputs)` when grad is on; plain `value_fn(*inputs)` otherwise."""
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return _AlignedValue.apply(value_fn, grad_fn, *inputs)
    return value_fn(*inputs)


# ---- MoE ----------------------------------------------------------------------------------------------------------
def bi_rows_matmul(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[expert[r]]^T in fp32 for each row r on its own. x: [P, K]; w: [E, N, K]; expert: [P]."""
    if use_triton(x):
        from ringlinear.ops.batch_invariant.kernels import bi_rows_matmul as kernel

        return kernel(x, w, expert)
    return naive.naive_bi_rows_matmul(x, w, expert)


def bi_routed_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w_gate: torch.Tensor,
                      w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """`routed_experts` with every (token, choice) pair computed on its own and the k choices summed in the order
    the router gives them (sorted by expert): a token's output does not depend on the rest of the batch.
    x: [T, H]; idx, weight: [T, k] -> [T, H] in x's dtype. Inference only (no autograd)."""
    T, k = idx.shape
    pairs = idx.reshape(-1)
    xs = x.repeat_interleave(k, 0)
    gate, up = bi_rows_matmul(xs, w_gate, pairs), bi_rows_matmul(xs, w_up, pairs)
    h = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    ys = bi_rows_matmul(h, w_down, pairs).view(T, k, -1)
    out = torch.zeros(T, ys.shape[-1], dtype=torch.float32, device=x.device)
    for j in range(k):
        out = out + weight[:, j, None].float() * ys[:, j]
    return out.to(x.dtype)


# ---- softmax attention --------------------------------------------------------------------------------------------
def bi_attention(q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, tables: torch.Tensor, block_size: int,
                 q_seq: torch.Tensor, q_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention, one query at a time: query i (sequence q_seq[i]) attends to that sequence's first
    q_keys[i] keys, key j of sequence n at row `tables[n, j // block_size] * block_size + j % block_size` of
    k_src/v_src ([R, Hkv, D], or paged [blocks, block_size, Hkv, D]); keys in tiles of a fixed size, in order.
    q: [T, H, D] -> [T, H, D] in q's dtype."""
    k_src = k_src.reshape(-1, *k_src.shape[-2:])
    v_src = v_src.reshape(-1, *v_src.shape[-2:])
    if use_triton(q):
        from ringlinear.ops.batch_invariant.kernels import bi_attention as kernel

        return kernel(q, k_src, v_src, tables, block_size, q_seq, q_keys, scale)
    return naive.naive_bi_attention(q, k_src, v_src, tables, block_size, q_seq, q_keys, scale)


def packed_key_table(bounds: list[int], device) -> torch.Tensor:
    """The `tables` of packed sequences (block size 1): row j of sequence n is bounds[n] + j."""
    n = len(bounds) - 1
    longest = max((y - x for x, y in zip(bounds, bounds[1:])), default=1)
    starts = torch.tensor(bounds[:-1], dtype=torch.int32)
    return (starts[:, None] + torch.arange(max(longest, 1), dtype=torch.int32)[None]).view(n, -1).to(device)


def seq_of_tokens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    n = cu_seqlens.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n, device=cu_seqlens.device), cu_seqlens.diff().long(),
                                   output_size=num_tokens)


# ---- linear attention ---------------------------------------------------------------------------------------------
def recurrent_lightning(q, k, v, g, scale, state_pool, slots, cu_seqlens, bounds=None) -> torch.Tensor:
    """Lightning attention in the recurrent order for packed sequences: sequence n's tokens
    [cu_seqlens[n], cu_seqlens[n+1]) continue from state_pool[slots[n]] (fp32, updated in place; negative slot:
    padding, output 0), each token applied exactly as the decode step applies it. q, k: [T, H, D]; v: [T, H, Dv]
    -> o [T, H, Dv] in q's dtype."""
    if use_triton(q):
        from ringlinear.ops.batch_invariant.kernels import recurrent_lightning as kernel

        return kernel(q, k, v, g, scale, state_pool, slots, cu_seqlens)
    return naive.naive_recurrent_lightning(q, k, v, g, scale, state_pool, slots, bounds or cu_seqlens.tolist())


class _PackedRecurrent(torch.autograd.Function):
    """Forward: `recurrent_lightning` from zero states (the sampler's arithmetic). Backward: the gradient of the
    chunked form (the same function; its rounding differs, which a gradient may)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, cu_seqlens, bounds):
        ctx.save_for_backward(q, k, v, g, cu_seqlens)
        ctx.scale, ctx.bounds = scale, bounds
        n = len(bounds) - 1
        pool = torch.zeros(n, q.shape[1], q.shape[2], v.shape[2], device=q.device, dtype=torch.float32)
        slots = torch.arange(n, device=q.device)
        return recurrent_lightning(q, k, v, g, scale, pool, slots, cu_seqlens, bounds)

    @staticmethod
    def backward(ctx, go):
        from ringlinear.ops.lightning import lightning_attn

        q, k, v, g, cu = ctx.saved_tensors
        with torch.enable_grad():
            qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
            o, _ = lightning_attn(qd[None], kd[None], vd[None], g, scale=ctx.scale, cu_seqlens=cu,
                                  cu_seqlens_host=ctx.bounds)
            gq, gk, gv = torch.autograd.grad(o[0], (qd, kd, vd), go)
        return gq, gk, gv, None, None, None, None


def packed_recurrent_lightning(q, k, v, g, scale, cu_seqlens, bounds: list[int]) -> torch.Tensor:
    """The trainer's Lightning attention under `linear_attn`: packed sequences from zero states in the recurrent
    order (differentiable). q, k: [T, H, D]; v: [T, H, Dv]."""
    return _PackedRecurrent.apply(q, k, v, g, scale, cu_seqlens, bounds)


__all__ = ["ITEMS", "Alignment", "aligned_numerics", "aligned_value", "bi_attention", "bi_linear", "bi_routed_experts",
           "bi_rows_matmul", "current_alignment", "packed_key_table", "packed_recurrent_lightning", "parse_alignment",
           "project", "recurrent_lightning", "seq_of_tokens"]
