"""Gaussian-noise baseline: the floor every synthetic recipe must beat."""
from __future__ import annotations

from typing import Any

import torch

from ...models import IMAGENET_MEAN, IMAGENET_STD, get_preprocessing
from ..prompts import ImagePlan
from .base import Generator, ShardOutput, register


@register
class NoiseGenerator(Generator):
    """N(0, 1) in the model's normalised input space (ImageNet statistics without a model)."""

    name = "noise"

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.ctx.model is not None:
            pre = get_preprocessing(self.ctx.model)
            return pre.mean, pre.std
        return IMAGENET_MEAN, IMAGENET_STD

    def recipe(self) -> dict[str, Any]:
        mean, std = self._stats()
        return {"name": self.name, "distribution": "normal(0,1) in normalised space", "mean": mean, "std": std}

    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        mean, std = self._stats()
        s = self.ctx.size
        m = torch.tensor(mean, dtype=torch.float32).view(1, 1, -1).expand(1, 1, 3)  # one value: every channel
        sd = torch.tensor(std, dtype=torch.float32).view(1, 1, -1).expand(1, 1, 3)
        out = []
        for p in plans:
            g = torch.Generator().manual_seed(p.seed)
            z = torch.randn(s, s, 3, generator=g)
            out.append(((z * sd + m) * 255.0).round().clamp(0, 255).to(torch.uint8))
        return ShardOutput(torch.stack(out), [{} for _ in plans])
