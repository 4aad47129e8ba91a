"""Importing TensorRT or TensorRT-RTX (same Python API), with install hints instead of ImportErrors."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import MixqError

BACKENDS: dict[str, tuple[str, str]] = {
    # --backend: (python module, pip extra)
    "tensorrt": ("tensorrt", "trt"),
    "tensorrt-rtx": ("tensorrt_rtx", "trt-rtx"),
}
MIN_TENSORRT = (10, 12)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def import_backend(name: str) -> ModuleType:
    """The backend's module; a MixqError that says what to pip install when it is missing or too old."""
    if name not in BACKENDS:
        raise MixqError(f"unknown TensorRT backend {name!r}; choose one of {', '.join(BACKENDS)}")
    mod_name, extra = BACKENDS[name]
    try:
        trt = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - ImportError or a broken CUDA library load
        why = "" if isinstance(e, ModuleNotFoundError) else f" ({type(e).__name__}: {str(e)[:100]})"
        raise MixqError(f"the {name} backend needs the `{mod_name}` Python package{why}: "
                        f"pip install 'mixq-onnx[{extra}]'") from None
    if name == "tensorrt" and _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise MixqError(f"tensorrt {trt.__version__} is too old (needs >= 10.12 for strongly typed QDQ builds): "
                        f"pip install -U 'mixq-onnx[{extra}]'")
    return trt


@dataclass
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}"}


def gpu_info() -> GpuInfo | None:
    """The current CUDA device as torch sees it; None without a usable NVIDIA GPU."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.version.hip is not None:
            return None
        i = torch.cuda.current_device()
        return GpuInfo(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001
        return None


def cuda_version() -> str | None:
    try:
        import torch

        return torch.version.cuda
    except Exception:  # noqa: BLE001
        return None


def make_logger(trt: ModuleType, echo: bool = False) -> Any:
    """An ILogger that keeps every message (VERBOSE included): the CPU-build layer report is parsed from it."""

    class CaptureLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((int(severity), msg))
            if echo and int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[{backend_label(trt)}] {msg}")

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s <= int(trt.ILogger.Severity.ERROR)]

    return CaptureLogger()


def backend_label(trt: ModuleType) -> str:
    return "tensorrt-rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"
