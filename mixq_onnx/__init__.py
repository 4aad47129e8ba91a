"""mixq-onnx: data-free low-bit quantization of vision networks, shipped as TensorRT-ready QDQ ONNX."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("mixq-onnx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

from .errors import MixqError  # noqa: E402

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load lazily through __getattr__ below
    from .calib import CalibConfig, CalibrationSet, make_calibration_cache
    from .models import load_model
    from .quant import QuantConfig, evaluate, load_quantized, quantize, save_quantized


def __getattr__(name: str):
    # heavy submodules (torch, timm, onnx, ...) load on first use: `mixq_onnx.load_model`, `mixq_onnx.quantize`, ...
    # so `import mixq_onnx` and the CLI's --help stay fast
    if name == "load_model":
        from .models import load_model

        return load_model
    if name in ("quantize", "load_quantized", "save_quantized", "QuantConfig", "evaluate"):
        from . import quant

        return getattr(quant, name)
    if name in ("CalibrationSet", "make_calibration_cache", "CalibConfig"):
        from . import calib

        return getattr(calib, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = ["CalibConfig", "CalibrationSet", "MixqError", "QuantConfig", "__version__", "evaluate", "load_model",
           "load_quantized", "make_calibration_cache", "quantize", "save_quantized"]
