"""The generator interface: every source of calibration images writes the same cache."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..classes import ClassVocab
from ..prompts import ImagePlan, PromptConfig


@dataclass
class GenContext:
    """Everything a generator may read. `model` is None unless the recipe names one."""

    num: int
    seed: int
    size: int  # stored image side length in pixels (H = W)
    prompts: PromptConfig
    vocab: ClassVocab | None
    model: nn.Module | None
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # generator-specific CLI options
    log: Callable[[str], None] = print
    # Within-shard progress: a generator calls it with the fraction of the current shard done (0..1) after
    # each step, so the calib bar moves while a slow shard (inversion steps, diffusion batches) is computed.
    shard_progress: Callable[[float], None] = field(default=lambda _fraction: None)


@dataclass
class ShardOutput:
    images: torch.Tensor  # uint8 [n, H, W, 3]
    extra: list[dict[str, Any]]  # per-image fields merged into the manifest records (may be empty dicts)
    stats: dict[str, Any] = field(default_factory=dict)  # per-shard numbers (losses, timings) for the manifest


class Generator(ABC):
    """One source of images. Subclasses register themselves in `GENERATORS` by `name`."""

    name: ClassVar[str]
    uses_prompts: ClassVar[bool] = False  # True: each image follows an ImagePlan's classes/prompt
    reads_text: ClassVar[bool] = False  # True: the prompt's words reach the images (--template, --gloss apply)
    needs_model: ClassVar[bool] = False
    #: the `CalibConfig.options` keys this generator reads; a key no generator reads is refused (a typo)
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: GenContext):
        self.ctx = ctx

    @classmethod
    def default_size(cls, model: nn.Module | None, options: dict[str, Any]) -> int:
        """Stored side length when `--size` is not given: the model's input size, else 224."""
        if model is not None:
            from ...models import get_preprocessing

            return int(get_preprocessing(model).input_size[1])
        return 224

    @classmethod
    def default_shard_size(cls, size: int) -> int:
        """Images per shard when `--shard-size` is not given (the unit of resume and of parallel work)."""
        return 64

    def validate(self) -> None:
        """Cheap checks that raise MixqError before any cache directory is created."""

    @abstractmethod
    def recipe(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the images (hashed into the cache key)."""

    def setup(self) -> None:
        """Heavy loading (pipelines, source files); called once per process, only if work remains."""

    @abstractmethod
    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        """Images for `plans` (consecutive indices). Must depend only on the plans and the recipe,
        never on which process or run produces them, so shards are byte-reproducible."""


GENERATORS: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    GENERATORS[cls.name] = cls
    return cls
