"""mixq-onnx: data-free low-bit quantization of vision networks, shipped as TensorRT-ready QDQ ONNX."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixq-onnx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

from .errors import MixqError  # noqa: E402
from .models import load_model  # noqa: E402


def __getattr__(name: str):
    # heavy submodules load on first use: `mixq_onnx.quantize`, `mixq_onnx.load_quantized`, ...
    if name in ("quantize", "load_quantized", "save_quantized", "QuantConfig", "evaluate"):
        from . import quant

        return getattr(quant, name)
    if name in ("CalibrationSet", "make_calibration_cache", "CalibConfig"):
        from . import calib

        return getattr(calib, name)
    raise AttributeError(name)


__all__ = ["CalibConfig", "CalibrationSet", "MixqError", "QuantConfig", "__version__", "evaluate", "load_model",
           "load_quantized", "make_calibration_cache", "quantize", "save_quantized"]
