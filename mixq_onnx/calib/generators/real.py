"""Real images imported from an npz (`x` uint8 NHWC, `y`) or an image folder: the upper-bound baseline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...errors import MixqError
from ...utils import sha256_file
from ..prompts import ImagePlan
from .base import Generator, ShardOutput, register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files in `root` (ImageFolder layout: class sub-folders give labels; flat folders have none)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    if subdirs:
        for ci, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(ci)
        return files, labels, [d.name for d in subdirs]
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    return files, [-1] * len(files), []


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise MixqError(f"{path} has no array 'x' (expected uint8 images [N,H,W,3])")
            x = z["x"]
            y = z["y"] if "y" in z else None
    except MixqError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot read {path}: {e}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise MixqError(f"{path}: 'x' must be uint8 [N,H,W,3], got {x.dtype} {x.shape}")
    return x, y


@register
class RealGenerator(Generator):
    """Take `--num` images of `--source`, a seeded random subset, resized to `--size` if needed."""

    name = "real"

    @classmethod
    def default_size(cls, model: nn.Module | None, options: dict[str, Any]) -> int:
        src = options.get("source")
        if src and Path(src).is_file() and str(src).endswith(".npz"):
            x, _ = load_npz(Path(src))
            return int(x.shape[1])
        return super().default_size(model, options)

    def _source(self) -> Path:
        src = self.ctx.options.get("source")
        if not src:
            raise MixqError("--generator real needs --source NPZ_OR_FOLDER")
        path = Path(src)
        if not path.exists():
            raise MixqError(f"--source {path} does not exist")
        return path

    def validate(self) -> None:
        path = self._source()
        n = len(load_npz(path)[0]) if path.is_file() else len(_folder_files(path)[0])
        if n == 0:
            raise MixqError(f"--source {path} holds no images")
        if self.ctx.num > n:
            raise MixqError(f"--num {self.ctx.num} exceeds the {n} images in {path}")

    def recipe(self) -> dict[str, Any]:
        path = self._source()
        if path.is_file():
            ident: Any = sha256_file(path)
        else:
            files, _, _ = _folder_files(path)
            ident = [[str(f.relative_to(path)), f.stat().st_size] for f in files]
        return {"name": self.name, "source": str(path.resolve()), "source_id": ident, "selection": "seeded permutation"}

    def setup(self) -> None:
        path = self._source()
        if path.is_file():
            self._x, y = load_npz(path)
            self._y = y if y is not None else np.full(len(self._x), -1)
            self._files = None
            n = len(self._x)
        else:
            self._files, labels, self._class_names = _folder_files(path)
            self._y = np.asarray(labels)
            n = len(self._files)
        self._order = np.random.default_rng([self.ctx.seed, 0xDA7A]).permutation(n)

    def _load(self, j: int) -> torch.Tensor:
        if self._files is None:
            img = torch.from_numpy(np.ascontiguousarray(self._x[j]))
            if img.shape[-1] == 1:
                img = img.expand(-1, -1, 3)
        else:
            from PIL import Image

            with Image.open(self._files[j]) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        s = self.ctx.size
        if tuple(img.shape[:2]) != (s, s):
            img = _resize_center(img, s)
        return img

    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        imgs, extra = [], []
        for p in plans:
            j = int(self._order[p.index])
            imgs.append(self._load(j))
            extra.append({"source_index": j, "label": int(self._y[j])})
        return ShardOutput(torch.stack(imgs), extra)


def _resize_center(img: torch.Tensor, s: int) -> torch.Tensor:
    """Shorter side to `s`, then centre crop: uint8 HWC -> uint8 [s,s,3]."""
    import torch.nn.functional as F

    h, w = img.shape[:2]
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    x = img.permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - s) // 2, (nw - s) // 2
    x = x[..., top:top + s, left:left + s]
    return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()
