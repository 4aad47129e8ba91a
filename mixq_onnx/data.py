"""Labelled evaluation data: an npz (`x` uint8 NHWC, `y`) or an ImageFolder-style directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import MixqError


def load_labelled(path: str | os.PathLike, size: int | None = None, limit: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,H,W,3] and int64 labels [N]; folder images are resized (shorter side) and centre-cropped
    to `size` so they stack."""
    from .calib.generators.real import folder_files, load_npz, resize_center

    p = Path(path)
    if not str(path).strip() or not p.exists():
        raise MixqError(f"data not found: {str(path)!r}")
    if limit is not None and limit < 1:
        raise MixqError(f"--limit must be at least 1, got {limit}")
    if p.is_file():
        x, y = load_npz(p)  # checks: a zip archive, 'x' uint8 NHWC, 'y' 1-D integers, one per image
        if y is None:
            raise MixqError(f"{p} has no labels 'y'")
        if len(x) == 0:
            raise MixqError(f"{p} holds no images (0 in 'x')")
        if limit:
            x, y = x[:limit], y[:limit]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if xt.shape[-1] == 1:
            xt = xt.expand(-1, -1, -1, 3)
        return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))
    files, labels, _ = folder_files(p)
    if not files:
        raise MixqError(f"no images under {p}")
    if labels and labels[0] < 0:
        raise MixqError(f"{p} has no class sub-folders, so no labels")
    if limit:
        files, labels = files[:limit], labels[:limit]
    from PIL import Image

    s = size or 224
    imgs = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise MixqError(f"cannot read image {f}: {' '.join(str(e).split())}") from None
        imgs.append(resize_center(arr, s))
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)
