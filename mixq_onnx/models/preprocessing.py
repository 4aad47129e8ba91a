"""The preprocessing a model expects, carried with the model so one calibration cache serves many models."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MixqError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Attribute under which `load_model` stores a model's `Preprocessing`.
ATTR = "mixq_preprocessing"
MAX_SIDE = 4096  # pixels: a larger input is a typo (or a hostile quant.json), not a vision model's
MAX_CHANNELS = 16


@dataclass(frozen=True)
class Preprocessing:
    """uint8 RGB pixels -> model input: resize to `input_size`, divide by 255, subtract mean, divide by std.

    A network that takes raw 0..255 values (MLPerf Tiny ResNet-8) uses mean 0 and std 1/255,
    so every model shares the single convention timm uses.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Refuse values that would crash later or quietly give garbage (a zero std, NaN, a size of 0 or of a
        gigapixel), whether they come from --mean/--std/--input-size or from a received quant.json."""
        size = self.input_size
        if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size) or size[0] > MAX_CHANNELS \
                or max(size[1:]) > MAX_SIDE:
            raise MixqError(f"preprocessing input size {list(size)} is not C,H,W with 1 <= C <= {MAX_CHANNELS} and "
                            f"1 <= H, W <= {MAX_SIDE} (--input-size takes 32, 32,32 or 3,32,32)")
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, size[0]) or not all(math.isfinite(v) for v in vals):
                raise MixqError(f"preprocessing {name} {list(vals)} must be {size[0]} finite numbers (one per "
                                f"input channel) or one (--{name})")
        if not all(v > 0 for v in self.std):
            raise MixqError(f"preprocessing std {list(self.std)} must be positive (--std)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def override(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_size: Sequence[int] | int | None = None,
    ) -> Preprocessing:
        kw: dict[str, Any] = {}
        if mean is not None:
            kw["mean"] = tuple(float(v) for v in mean)
        if std is not None:
            kw["std"] = tuple(float(v) for v in std)
        if input_size is not None:
            if isinstance(input_size, int):
                input_size = (self.input_size[0], input_size, input_size)
            elif len(input_size) == 1:
                input_size = (self.input_size[0], input_size[0], input_size[0])
            elif len(input_size) == 2:
                input_size = (self.input_size[0], *input_size)
            kw["input_size"] = tuple(int(v) for v in input_size)
        return replace(self, **kw)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (or NCHW) images -> float NCHW model input. Pixels only: an already preprocessed float
        tensor (a `TrainData.inputs`, a `CalibrationSet`'s) would be normalised twice and give chance-level
        accuracy without a word, so it is refused; numpy arrays (as `np.load` gives them) are taken as is."""
        x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            kind = getattr(x, "dtype", type(x).__name__)
            raise MixqError(f"images must be uint8 pixels (NHWC or NCHW), got {kind}: a preprocessed float tensor "
                            "goes to the model (or to quantize) directly")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 255.0
        if x.shape[1] == 1 and self.input_size[0] == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.input_size[0] == 1:  # a grey model on RGB images: luma, as PIL's "L"
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[1] != self.input_size[0]:
            raise MixqError(f"the model takes {self.input_size[0]}-channel input and the images have {x.shape[1]} "
                            "channels (mixq-onnx maps grey to RGB and RGB to grey, nothing else)")
        h, w = self.input_size[1:]
        if tuple(x.shape[-2:]) != (h, w):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space float NCHW -> uint8 NHWC pixels (rounded, clamped)."""
        mean, std = self._stats(x)
        pix = ((x * std + mean) * 255.0).round().clamp(0, 255)
        return pix.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def get_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """The model's own preprocessing: set by `load_model`, else timm's data config."""
    pre = getattr(model, ATTR, None)
    if isinstance(pre, Preprocessing):
        return pre
    try:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return Preprocessing(
            input_size=tuple(cfg["input_size"]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bilinear"),
        )
    except Exception:  # pragma: no cover - non-timm model without a config
        return Preprocessing(input_size=(3, 224, 224))
