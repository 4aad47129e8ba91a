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
    from .calib.generators.real import _folder_files, _resize_center, load_npz

    p = Path(path)
    if not p.exists():
        raise MixqError(f"data not found: {p}")
    if p.is_file():
        x, y = load_npz(p)
        if y is None:
            raise MixqError(f"{p} has no labels 'y'")
        if limit:
            x, y = x[:limit], y[:limit]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if xt.shape[-1] == 1:
            xt = xt.expand(-1, -1, -1, 3)
        return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))
    files, labels, _ = _folder_files(p)
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
        except OSError as e:
            raise MixqError(f"cannot read image {f}: {e}") from None
        imgs.append(_resize_center(arr, s))
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)
