"""MoE token dispatch and combine around the grouped expert GEMMs, as gathers (no scatters, no atomics).

Tokens are sorted by expert: `order` ([T*k] int64) lists the flat choice indices `t*k + j` in expert order
and `inv` is its inverse (`inv[order] = arange`), so choice `t*k + j` sits at sorted row `inv[t*k + j]`.

- dispatch: `xs = x[order // k]` (a row gather). Its backward sums each token's k row gradients:
  `dx[t] = sum_j dxs[inv[t*k + j]]`, one read of dxs in a fixed order (PyTorch's index backward is an
  accumulating `index_put_`, which sorts the indices and adds in x's dtype).
- combine: `y[t] = sum_j w[t, j] * ys[inv[t*k + j]]` in fp32, one rounding to the output dtype. PyTorch's
  sequence (`out[order] = ys`, `.float()`, `* w`, `.sum(1)`, `.to`) writes the [T*k, H] rows three more times,
  twice in fp32; its backward as many again. Backward here: `dys[inv[t*k+j]] = w[t, j] * dy[t]` and
  `dw[t, j] = dy[t] . ys[inv[t*k+j]]`, one pass.

References: `naive_moe_dispatch`, `naive_moe_combine` (`naive.py`). `moe_dispatch` / `moe_combine` take the Triton
path (`fused_combine.py`) on the Triton backend, the references otherwise (`ringlinear.ops.backend`). Every token is computed by one
program in a fixed order: deterministic and independent of the batch it is in.
"""

from __future__ import annotations

import torch

from ringlinear.ops.backend import use_triton
from ringlinear.ops.moe.naive import naive_moe_combine, naive_moe_dispatch


def sort_by_expert(topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, k] -> (order, inv), both [T*k] int64: a stable sort of the choices by expert and its inverse."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return order, inv


def _check(order: torch.Tensor, inv: torch.Tensor, rows: int, what: str) -> None:
    if order.shape != (rows,) or inv.shape != (rows,):
        raise ValueError(f"{what}: order and inv must be [T*k] = [{rows}], got {tuple(order.shape)} and "
                         f"{tuple(inv.shape)}")


def moe_dispatch(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, H] -> xs [T*k, H], row i = x[order[i] // k] (tokens in expert order)."""
    _check(order, inv, x.shape[0] * k, "moe_dispatch")
    if not use_triton(x):
        return naive_moe_dispatch(x, order, k)
    from ringlinear.ops.moe.fused_combine import FusedDispatch

    return FusedDispatch.apply(x.contiguous(), order, inv, k)


def moe_combine(ys: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ys [T*k, H] (expert order), weight [T, k] -> [T, H]: each token's k expert outputs, weighted, summed in
    fp32 and rounded once to `out_dtype` (default ys's dtype)."""
    if ys.dim() != 2 or weight.dim() != 2 or ys.shape[0] != weight.numel():
        raise ValueError(f"moe_combine: need ys [T*k, H] and weight [T, k], got {tuple(ys.shape)} and "
                         f"{tuple(weight.shape)}")
    _check(order, inv, ys.shape[0], "moe_combine")
    if not use_triton(ys):
        return naive_moe_combine(ys, order, weight, out_dtype)
    from ringlinear.ops.moe.fused_combine import FusedCombine

    return FusedCombine.apply(ys, inv, weight, out_dtype or ys.dtype)
