"""Placement markers: during export every quantizer becomes `mixq::Marker(x, name=...)`, an identity
that survives torch.onnx's optimiser, so Q/DQ land exactly where PyTorch quantizes, by name."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

DOMAIN = "mixq"


@torch.library.custom_op("mixq::marker", mutates_args=())
def marker(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@marker.register_fake
def _marker_fake(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _register_schema() -> None:
    import onnx.defs
    from onnx.defs import OpSchema

    if onnx.defs.has("Marker", DOMAIN):
        return
    try:
        onnx.defs.register_schema(OpSchema(
            "Marker", DOMAIN, 1,
            inputs=[OpSchema.FormalParameter("x", "T")], outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
            attributes=[OpSchema.Attribute("name", OpSchema.AttrType.STRING, "quantizer name")],
        ))
    except Exception:  # noqa: BLE001 - already registered by another import path
        pass


def translation_table() -> dict:
    """custom_translation_table entry mapping the marker op to the mixq::Marker ONNX node."""
    from onnxscript.values import Op, Opset

    _register_schema()
    op = Op(Opset(DOMAIN, 1), "Marker")

    def marker_onnx(x, name: str):
        return op(x, name=name)

    return {torch.ops.mixq.marker.default: marker_onnx}


@contextlib.contextmanager
def marker_mode(model: nn.Module) -> Iterator[None]:
    """Quantizers emit markers instead of fake quantization (quant's export mode with this module's op);
    weight markers wrap the float parameter and the exporter swaps it for the stored integers."""
    from ..quant.quantizer import export_markers

    with export_markers(model, torch.ops.mixq.marker):
        yield
