"""Quantized layers: a Conv2d/Linear with its (BN-folded) float weight, a weight quantizer and an
input quantizer. They are leaves of every trace and map one-to-one onto ONNX Conv/Gemm/MatMul nodes.

Once a quantization is finished (weights frozen as integers, activation scales fixed), a layer runs in
the integer domain, as an INT8 kernel does: it multiplies the integer codes of its input by the integer
weights, then rescales once per output channel by s_x * s_w and adds the bias. Sums of integer products
below 2^24 are exact in fp32 whatever the summation order, so the exported graph, which computes the
same thing (see `mixq_onnx.onnx.passes.integer_gemms`), gives bit-identical results in onnxruntime.
The float fake-quant form conv(q_x s_x, q_w s_w) would differ from any other runtime in the last bits,
and near a rounding boundary those bits flip an integer code that then cascades downstream."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import ActQuantizer, WeightQuantizer, exporting


def tf_same_pads(h: int, w: int, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow "same" padding (left, right, top, bottom) for an HxW input."""
    def one(n: int, k_: int, s_: int, d_: int) -> tuple[int, int]:
        total = max((-(-n // s_) - 1) * s_ + (k_ - 1) * d_ + 1 - n, 0)
        return total // 2, total - total // 2

    pt, pb = one(h, k[0], s[0], d[0])
    pl, pr = one(w, k[1], s[1], d[1])
    return pl, pr, pt, pb


def frozen(q: ActQuantizer) -> bool:
    """An activation quantizer whose scale is final (enabled, initialised, neither observing nor learning):
    the modules that read it may then run their integer-domain form."""
    return q.enabled and not q.observing and not q.learning and bool(q.initialized)


SAME_PAD_CONVS = ("SamePadConv", "Conv2dSame")  # the zoo's / timm's: TensorFlow 'same' padding, then a plain conv
STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")  # timm: weight standardisation


def layer_weight(layer: nn.Module) -> torch.Tensor | None:
    """The weight `layer`'s forward really convolves or multiplies with, for the Conv2d/Linear types whose
    forward mixq-onnx reproduces: plain ones, the same-padding convs, and timm's weight-standardised convs
    (BiT, NFNet: the standardised weight, a function of the weight alone, is what gets quantized). None for a
    subclass with any other forward: it stays float, since its own `.weight` is not what it computes with."""
    t = type(layer)
    if t.forward in (nn.Conv2d.forward, nn.Linear.forward) or t.__name__ in SAME_PAD_CONVS:
        return layer.weight
    if t.__name__ == "Linear" and t.__module__.startswith("timm.") and isinstance(layer, nn.Linear):
        return layer.weight  # timm.layers.Linear: nn.Linear, with a forward that only casts for TorchScript
    if t.__name__ in STD_CONVS and isinstance(layer, nn.Conv2d):
        gain = getattr(layer, "gain", None)
        affine = (gain * layer.scale).view(-1) if gain is not None else None
        return F.batch_norm(layer.weight.reshape(1, layer.out_channels, -1), None, None, weight=affine,
                            training=True, momentum=0.0, eps=layer.eps).reshape_as(layer.weight)
    return None


class _QuantLayer(nn.Module):
    """Shared state: the (folded) float weight and bias, and the two quantizers."""

    def __init__(self, layer: nn.Module, name: str, wbits: int, abits: int | None, symmetric: bool,
                 block_size: int | None = None):
        super().__init__()
        self.name = name
        weight = layer_weight(layer)
        assert weight is not None, f"{name}: {type(layer).__name__} is not a layer mixq-onnx reproduces"
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None
        self.weight_quantizer = WeightQuantizer(f"{name}.weight", wbits, symmetric, axis=0, block_size=block_size)
        self.input_quantizer = ActQuantizer(f"{name}.input", abits, symmetric) if abits else None

    def integer_mode(self) -> bool:
        """True once both quantizers are frozen (evaluation, export checks): run the integer-domain form."""
        iq, wq = self.input_quantizer, self.weight_quantizer
        if iq is None or exporting():
            return False  # exporting: the float form with placement markers
        return frozen(iq) and wq.enabled and wq.mode == "int" and not wq.block_size

    def rescale(self) -> torch.Tensor:
        """Per-output-channel fp32 factor s_x * s_w (the exporter writes these very values)."""
        assert self.input_quantizer is not None
        return self.input_quantizer.scale.detach().float() * self.weight_quantizer.scale.detach().float().reshape(-1)

    def max_accumulator(self) -> float:
        """Largest |sum of integer products| any input can produce; fp32 sums stay exact below 2^24."""
        iq = self.input_quantizer
        assert iq is not None
        lo, hi = iq.qrange
        zp = float(iq.zero_point)
        w = self.weight_quantizer.int_values().abs().flatten(1).sum(1)
        return float(w.max()) * max(abs(lo - zp), abs(hi - zp))

    def _integer_input(self, x: torch.Tensor) -> torch.Tensor:
        # through the quantizer module, so hooks (verify's code checks and teacher forcing) see it
        iq = self.input_quantizer
        assert iq is not None
        return torch.round(iq(x) / iq.scale.detach())

    def _finish(self, acc: torch.Tensor, shape: list[int]) -> torch.Tensor:
        y = acc * self.rescale().view(shape)
        return y + self.bias.view(shape) if self.bias is not None else y


class QuantConv2d(_QuantLayer):
    def __init__(self, conv: nn.Conv2d, name: str, wbits: int, abits: int | None, symmetric: bool = True):
        super().__init__(conv, name, wbits, abits, symmetric)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        # timm Conv2dSame / the zoo's SamePadConv pad dynamically in TensorFlow style; timm's *Same std convs
        # only when their padding was not static (`same_pad`)
        kind = type(conv).__name__
        self.same_pad = kind in SAME_PAD_CONVS or (kind.endswith("StdConv2dSame") and bool(getattr(conv, "same_pad", True)))

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.same_pad:
            x = F.pad(x, tf_same_pads(int(x.shape[-2]), int(x.shape[-1]), self.kernel_size, self.stride, self.dilation))
            padding = 0
        else:
            padding = self.padding
        return F.conv2d(x, w, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer_mode():
            acc = self._conv(self._integer_input(x), self.weight_quantizer.int_values(), None)
            return self._finish(acc, [1, -1, 1, 1])
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"groups={self.groups}, same_pad={self.same_pad}")


class QuantLinear(_QuantLayer):
    def __init__(self, lin: nn.Linear, name: str, wbits: int, abits: int | None, symmetric: bool = True,
                 block_size: int | None = None):
        super().__init__(lin, name, wbits, abits, symmetric, block_size)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer_mode():
            return self._finish(F.linear(self._integer_input(x), self.weight_quantizer.int_values()), [-1])
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)


class QuantPool(nn.Module):
    """An average pool that reads the integer codes of its input and writes those of its consumer, as an INT8
    pooling kernel does.

    The pool's input gets a quantizer (placement "pool", at the bits of the quantized layer the pooled
    tensor feeds: `graph.quantize_pools`; where a layer reads the same tensor at that grid, that layer's
    quantizer, shared); `output_quantizer` is the consumer's input quantizer (the same object). Once both
    are frozen, the pool averages integer codes, whose fp32 sums are exact in any order, and requantizes
    the mean m straight onto the consumer's grid: code = round(m / (s_out / s_in)). The exported graph
    computes exactly that, DQ(codes, 1) -> pool -> Q(s_out / s_in) (`mixq_onnx.onnx.passes.integer_pools`),
    which TensorRT runs as one INT8 pooling layer. A float pool
    would sum scaled values in an order each runtime picks, and one value moved across a rounding boundary
    of the next quantizer changes the classifier's input code."""

    def __init__(self, pool: nn.Module, name: str, quantizer: ActQuantizer, consumer: str,
                 output_quantizer: ActQuantizer):
        super().__init__()
        self.pool = pool
        self.name = name
        self.input_quantizer = quantizer
        self.output_quantizer = output_quantizer  # the consumer's input quantizer (held there too)
        self.consumer = consumer  # the quantized layer whose input the pooled tensor is

    def integer_mode(self) -> bool:
        """True once both quantizers are frozen (evaluation, export checks): the integer-domain form."""
        if exporting():
            return False
        return frozen(self.input_quantizer) and frozen(self.output_quantizer)

    def requant_factor(self) -> torch.Tensor:
        """fp32(s_out) / fp32(s_in): the exporter writes this very value as the Q scale after the pool."""
        return self.output_quantizer.scale.detach().float() / self.input_quantizer.scale.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq, oq = self.input_quantizer, self.output_quantizer
        if self.integer_mode():
            mean = self.pool(torch.round(iq(x) / iq.scale.detach()))  # codes relative to the zero point
            lo, hi = oq.qrange
            zp = oq.zero_point
            code = torch.clamp(torch.round(mean / self.requant_factor()) + zp, lo, hi) - zp
            return code * oq.scale.detach()  # the consumer re-quantizes it to the same code
        return self.pool(iq(x))

    def extra_repr(self) -> str:
        return f"consumer={self.consumer!r}"
