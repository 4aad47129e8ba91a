"""`CalibrationSet`: a cache read as model inputs, so one cache serves many models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import MixqError
from ..models.preprocessing import Preprocessing, get_preprocessing
from . import cache as C


class CalibrationSet(Dataset):
    """Items are float [C,H,W] tensors preprocessed for `model` (resized, normalised).

    `model` may be an nn.Module (its preprocessing is used) or a `Preprocessing`.
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module | Preprocessing, root: Path | None = None):
        self.path = C.resolve_cache(path, root)  # rejects "" (which would otherwise mean the working directory)
        self.images, self.records = C.load_images(self.path)  # every shard checked against its sha256
        self.preprocessing = model if isinstance(model, Preprocessing) else get_preprocessing(model)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocessing(self.images[i : i + 1])[0]

    def record(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def tensor(self, n: int | None = None, batch_size: int = 256) -> torch.Tensor:
        """The first `n` items (all by default) as one preprocessed batch."""
        n = len(self) if n is None else min(n, len(self))
        return torch.cat([self.preprocessing(self.images[s : min(s + batch_size, n)]) for s in range(0, n, batch_size)])

    def labels(self) -> np.ndarray | None:
        """One class per image when every record names one (real-image caches), else None (synthetic caches)."""
        ys = [r.get("label") if isinstance(r, dict) else None for r in self.records]
        if ys and all(isinstance(y, int) and not isinstance(y, bool) and y >= 0 for y in ys):
            return np.asarray(ys, dtype=np.int64)
        return None

    def take(self, indices: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The items at `indices` (e.g. `pick_subset`'s) as one preprocessed batch."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return torch.cat([self.preprocessing(self.images[idx[s:s + batch_size]]) for s in range(0, len(idx), batch_size)])

    def subset(self, n: int | None = None) -> str:
        """What `tensor(n)` takes, for the `data:` line: the first n in the cache's own order, which the
        generators make a seeded shuffle (real images) or class-balanced rounds (synthetic prompts)."""
        used = len(self) if n is None else min(n, len(self))
        if used == len(self):
            return f"all {used} images of cache {self.path.name}"
        return f"{used} of {len(self)} images of cache {self.path.name} (the first {used}, in the cache's seeded order)"

    def made_from(self, model: nn.Module) -> str | None:
        """A note when the cache was synthesised from another network's BatchNorm statistics than `model`'s
        (inversion images fit the network they were inverted from); None otherwise."""
        from ..models import model_source

        recipe = C.load_manifest(self.path)["recipe"]
        src, mine = recipe.get("model"), model_source(model)
        if recipe.get("generator", {}).get("name") != "inversion" or not isinstance(src, dict) or mine is None:
            return None
        if src.get("spec") == mine.spec and src.get("checkpoint_sha256") == mine.checkpoint_sha256:
            return None
        sha = src.get("checkpoint_sha256") or ""
        return (f"note: {self.path.name} was synthesised by BN inversion of {src.get('spec')}"
                f"{f' (checkpoint {sha[:12]}…)' if sha else ''}, not of this model: its images fit that network")

    def provenance(self, used: int | None = None) -> dict[str, Any]:
        """What `quant.json` records about the calibration data: the cache, its recipe hash, images used."""
        return {"cache": str(self.path.resolve()), "hash": C.load_manifest(self.path)["hash"],
                "images": len(self) if used is None else used}


def load_calibration(ref: str | os.PathLike, model: nn.Module, cache_root: str | os.PathLike | None = None
                     ) -> CalibrationSet:
    """A cache (path, hash or hash prefix under `cache_root`) checked against `model`: images present, channel
    count, and no more than 4x upscaling to the model's input. One-line `MixqError`s for every failure."""
    return check_calibration(CalibrationSet(ref, model, Path(cache_root) if cache_root else None))


def check_calibration(ds: CalibrationSet) -> CalibrationSet:
    """`load_calibration`'s checks of a set against the preprocessing it was made for (images present, channel
    count, at most 4x upscaling); `quantize` applies them to a `CalibrationSet` it is handed too. A
    `CalibrationSet` itself may upscale further (as a Dataset it serves any model)."""
    if len(ds) == 0:
        raise MixqError(f"calibration cache {ds.path} holds no images")
    pre = ds.preprocessing
    h, w = ds.images.shape[1:3]
    if ds.images.shape[-1] != 3 or pre.input_size[0] not in (1, 3):
        raise MixqError(f"cache images have {ds.images.shape[-1]} channels, the model takes {pre.input_size[0]}")
    if pre.input_size[1] > 4 * h or pre.input_size[2] > 4 * w:
        raise MixqError(f"cache images are {h}x{w}, too small to resize to the model's input "
                        f"{pre.input_size[1]}x{pre.input_size[2]} (more than 4x upscaling): make a cache with "
                        f"--size {pre.input_size[1]}, or, if the model takes {h}x{w} images (a model file gets "
                        f"224x224 unless told), pass --input-size {h}")
    return ds
