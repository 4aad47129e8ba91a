"""Quantized layers: a Conv2d/Linear with its (BN-folded) float weight, a weight quantizer and an
input quantizer. They are leaves of every trace and map one-to-one onto ONNX Conv/Gemm/MatMul nodes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import ActQuantizer, WeightQuantizer


def tf_same_pads(h: int, w: int, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow "same" padding (left, right, top, bottom) for an HxW input."""
    def one(n: int, k_: int, s_: int, d_: int) -> tuple[int, int]:
        total = max((-(-n // s_) - 1) * s_ + (k_ - 1) * d_ + 1 - n, 0)
        return total // 2, total - total // 2

    pt, pb = one(h, k[0], s[0], d[0])
    pl, pr = one(w, k[1], s[1], d[1])
    return pl, pr, pt, pb


class _QuantLayer(nn.Module):
    """Shared state: the (folded) float weight and bias, and the two quantizers."""

    def __init__(self, layer: nn.Module, name: str, wbits: int, abits: int | None, symmetric: bool,
                 block_size: int | None = None):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None
        self.weight_quantizer = WeightQuantizer(f"{name}.weight", wbits, symmetric, axis=0, block_size=block_size)
        self.input_quantizer = ActQuantizer(f"{name}.input", abits, symmetric) if abits else None


class QuantConv2d(_QuantLayer):
    def __init__(self, conv: nn.Conv2d, name: str, wbits: int, abits: int | None, symmetric: bool = True):
        super().__init__(conv, name, wbits, abits, symmetric)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        # timm Conv2dSame / the zoo's SamePadConv pad dynamically in TensorFlow style
        self.same_pad = type(conv).__name__ in ("SamePadConv", "Conv2dSame", "StdConv2dSame")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_quantizer(self.weight)
        if self.same_pad:
            x = F.pad(x, tf_same_pads(int(x.shape[-2]), int(x.shape[-1]), self.kernel_size, self.stride, self.dilation))
            padding = 0
        else:
            padding = self.padding
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"groups={self.groups}, same_pad={self.same_pad}")


class QuantLinear(_QuantLayer):
    def __init__(self, lin: nn.Linear, name: str, wbits: int, abits: int | None, symmetric: bool = True,
                 block_size: int | None = None):
        super().__init__(lin, name, wbits, abits, symmetric, block_size)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)
