"""The inference engine's projection: y = x W^T + b with W in the compute dtype or in e4m3 with one fp32 scale per
128x128 block (`weight_scale_inv`, the HF FP8 layout's name for the dequantization factors), x quantized per 1x128
group at run time (`ringlinear.ops.fp8.inference.w8a8_linear`). The model is written with `nn.Linear`; the
inference transforms (`ringlinear.loading.fp8.quantize_fp8`, `ringlinear.distributed.tensor_parallel`) put this
in its place, and the tensor-parallel linears derive from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ringlinear.ops.fp8.inference import quantize_weight, w8a8_linear
from ringlinear.ops.fp8.naive import BLOCK, FP8


def block_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK), -(-cols // BLOCK)


class Linear(nn.Module):
    """`weight: [out, in]`; when FP8, `weight` is e4m3 and `weight_scale_inv: [ceil(out/128), ceil(in/128)]` fp32
    (None otherwise); `bias: [out]` or None. Inference only: the FP8 weight takes no gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None,
                 fp8: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8 if fp8 else dtype, device=device),
                                   requires_grad=not fp8)
        self.weight_scale_inv = (nn.Parameter(torch.empty(block_scale_shape(out_features, in_features),
                                                          dtype=torch.float32, device=device), requires_grad=False)
                                 if fp8 else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return F.linear(x, self.weight, bias)
        return w8a8_linear(x, self.weight, self.weight_scale_inv, bias)

    @torch.no_grad()
    def to_fp8(self) -> Linear:
        """Quantize the weight in place (128x128 blocks); on `meta`, only make room for FP8 (a loader fills it)."""
        if self.is_fp8:
            return self
        w = self.weight
        if w.device.type == "meta":
            w8 = torch.empty(w.shape, dtype=FP8, device="meta")
            scale = torch.empty(block_scale_shape(*w.shape), dtype=torch.float32, device="meta")
        else:
            w8, scale = quantize_weight(w)
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        return self

    @classmethod
    def like(cls, lin: nn.Linear, fp8: bool = False) -> Linear:
        """A `Linear` holding `lin`'s parameters (the same tensors), FP8-quantized when `fp8`."""
        new = cls(lin.in_features, lin.out_features, bias=False, dtype=lin.weight.dtype, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        return new.to_fp8() if fp8 else new

    def extra_repr(self) -> str:
        kind = "fp8 e4m3, 128x128 block scales" if self.is_fp8 else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"
