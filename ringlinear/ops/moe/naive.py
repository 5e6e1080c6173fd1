"""MoE references: the PyTorch sequences of token dispatch (`xs = x[order // k]`) and weighted combine
(`y[t] = sum_j w[t, j] * ys[inv[t*k + j]]` in fp32), autograd through them."""

from __future__ import annotations

import torch


def naive_moe_dispatch(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return x[order // k]


def naive_moe_combine(ys: torch.Tensor, order: torch.Tensor, weight: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    T, k = weight.shape
    out = torch.empty_like(ys)
    out[order] = ys
    out = (out.view(T, k, ys.shape[1]).float() * weight.float()[..., None]).sum(1)
    return out.to(out_dtype or ys.dtype)
