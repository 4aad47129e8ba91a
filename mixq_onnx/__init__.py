"""mixq-onnx: data-free low-bit quantization of vision networks, shipped as TensorRT-ready QDQ ONNX."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixq-onnx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

from .errors import MixqError  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["MixqError", "__version__", "load_model"]
