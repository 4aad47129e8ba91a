"""`CalibrationSet`: a cache read as model inputs, so one cache serves many models."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.preprocessing import Preprocessing, get_preprocessing
from . import cache as C


class CalibrationSet(Dataset):
    """Items are float [C,H,W] tensors preprocessed for `model` (resized, normalised).

    `model` may be an nn.Module (its preprocessing is used) or a `Preprocessing`.
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module | Preprocessing):
        self.path = C.resolve_cache(path)  # rejects "" (which would otherwise mean the working directory)
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
