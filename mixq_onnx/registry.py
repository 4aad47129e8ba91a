"""Registries: one place that names every choice of a kind (quantization methods, calibration filters,
prompt strategies, ...), so the library, its error messages and the CLI's `click.Choice` lists never repeat
string tuples.

Light on purpose: the standard library only (click is imported inside `Registry.choice`). The CLI imports
this module and the registries built on it at start-up, so nothing here or in them may import torch, numpy,
onnx or any other heavy module at module level; an implementation is named as "package.module:attr" and
imported on first use (`resolve`).

The calibration registries live here (the `calib` package imports torch when it loads): `GENERATOR_MODULES`,
`FILTERS` and `PROMPT_STRATEGIES`. The method registry is `mixq_onnx.methods.METHODS`; block types are in
`mixq_onnx.quant.graph.BLOCK_TYPES`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import MixqError

T = TypeVar("T")


def resolve(target: Any) -> Any:
    """`target` itself, or the object a "package.module:attr" string names (imported now)."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order. Iterating yields the names, so `name in REG`,
    `", ".join(REG)` and `sorted(REG)` work as they did on the tuples this replaces."""

    def __init__(self, kind: str):
        self.kind = kind  # "method", "filter", ...: used in error messages
        self._items: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._items and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        return self._items.pop(name)

    def lookup(self, name: str) -> T:
        """The entry, or `MixqError("unknown KIND 'x': choose one of a, b, c")`."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise MixqError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._items)}") from None

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"

    def choice(self, case_sensitive: bool = True) -> Any:
        """A `click.Choice` that reads the names at use time: entries registered after the CLI was built
        (plugins, tests) are accepted and listed in --help."""
        import click

        registry = self

        class RegistryChoice(click.Choice):
            def __init__(self) -> None:
                super().__init__(list(registry), case_sensitive=case_sensitive)

            @property  # type: ignore[override]
            def choices(self) -> tuple[str, ...]:
                return tuple(registry)

            @choices.setter
            def choices(self, _value: Any) -> None:  # click.Choice.__init__ assigns it
                pass

        return RegistryChoice()


# --------------------------------------------------------------------------- calibration generators
@dataclass(frozen=True)
class GeneratorModule:
    """Where a calibration generator lives and its one line for `calib --help` (the module imports torch, so the
    CLI's help cannot ask the class)."""

    module: str
    help: str


#: name -> the module that defines its `calib.generators.Generator` subclass (decorated with `register`, whose
#: `name` must be this same name: `tests/test_methods.py` checks the two lists are equal).
#: `mixq_onnx.calib.generators` imports every module listed here when it loads, and `calib --generator` lists
#: these names and help lines: adding a generator is its module plus one `register_generator_module` line.
GENERATOR_MODULES: Registry[GeneratorModule] = Registry("generator")


def register_generator_module(name: str, module: str, help: str) -> GeneratorModule:
    return GENERATOR_MODULES.register(name, GeneratorModule(module, help))


register_generator_module("diffusion", "mixq_onnx.calib.generators.diffusion",
                          "text-to-image pipeline on class prompts")
register_generator_module("inversion", "mixq_onnx.calib.generators.inversion",
                          "synthesise from the model's BatchNorm statistics (no diffusion weights, offline)")
register_generator_module("real", "mixq_onnx.calib.generators.real", "import --source (npz or image folder)")
register_generator_module("noise", "mixq_onnx.calib.generators.noise", "Gaussian noise (tests, smoke runs)")


def help_lines(registry: Registry[Any]) -> str:
    """'name: help; name: help' of a registry's entries, for an option's --help."""
    return "; ".join(f"{n}: {e.help}" for n, e in registry.items())


# --------------------------------------------------------------------------- calibration filters
@dataclass(frozen=True)
class Filter:
    """A GenQ-style filter: `score(model, images_uint8_nhwc, batch_size) -> [N] float32`, higher = keep.
    `needs_model`: False for filters that only look at the pixels."""

    name: str
    help: str
    score: str | Callable[..., Any]  # "package.module:function", or the function
    needs_model: bool = True


FILTERS: Registry[Filter] = Registry("filter")


def register_filter(f: Filter) -> Filter:
    return FILTERS.register(f.name, f)


register_filter(Filter("energy", "free energy logsumexp(logits) of the FP model",
                       "mixq_onnx.calib.filters:energy_scores"))
register_filter(Filter("bn", "minus the per-image BatchNorm-statistics distance",
                       "mixq_onnx.calib.filters:bn_scores"))
register_filter(Filter("patch-entropy", "mean 16-bin patch-histogram entropy of the pixels (no model)",
                       "mixq_onnx.calib.filters:patch_entropy_scores", needs_model=False))


# --------------------------------------------------------------------------- prompt strategies
@dataclass(frozen=True)
class PromptStrategy:
    """How synthetic images pick their classes and words.

    `plan(cfg: PromptConfig, vocab: ClassVocab, seed, start, stop) -> list[ImagePlan]` for image indices
    [start, stop); each plan must depend on (seed, index) only. `conditioned`: False when images show no
    class (then no class vocabulary is loaded). `mixes`: k >= 2 classes per image (`--k` applies, and the
    recipe records the k-slot mixup template). `template_slots`: `--template` must have k '{}' slots.
    `default_template`: recorded when `--template` is not given (strategies that do not mix).
    `embeds`: images condition on a weighted mix of the text embeddings of `ImagePlan.sub_prompts`, with
    Dirichlet(`--alpha`) weights (also inversion's soft targets); only such strategies take an `--alpha`."""

    name: str
    help: str
    plan: str | Callable[..., Any]  # "package.module:function", or the function
    conditioned: bool = True
    mixes: bool = False
    template_slots: bool = False
    default_template: str | None = None
    embeds: bool = False


PROMPT_STRATEGIES: Registry[PromptStrategy] = Registry("prompt strategy")


def register_prompt_strategy(s: PromptStrategy) -> PromptStrategy:
    return PROMPT_STRATEGIES.register(s.name, s)


register_prompt_strategy(PromptStrategy(
    "mixup", "'a photo of a {A} and a {B}'", "mixq_onnx.calib.prompts:plan_mixup",
    mixes=True, template_slots=True))
register_prompt_strategy(PromptStrategy(
    "single", "GenQ 'a photo of a {adjective} {class}'", "mixq_onnx.calib.prompts:plan_single",
    default_template="a photo of a {adjective} {cls}"))
register_prompt_strategy(PromptStrategy(
    "mixup-embed", "Dirichlet-weighted text embeddings", "mixq_onnx.calib.prompts:plan_mixup_embed",
    mixes=True, embeds=True))
register_prompt_strategy(PromptStrategy(
    "none", "no class conditioning", "mixq_onnx.calib.prompts:plan_unconditioned", conditioned=False))


#: Training-image augmentations of the shared training loop (`mixq_onnx.training.augment_batch`).
AUGMENTS = ("none", "flip-crop")
LOSSES = ("auto", "ce", "kd")  # a training stage's --loss: auto = KD on a cache, CE on labels (`kd_weight_for`)
BN_STATS = ("update", "freeze")  # BatchNorm running statistics while training (`TrainConfig.bn_stats`)


def check_loss(loss: str) -> None:
    """The one-line error every training config (QATConfig, RobustConfig) gives a bad loss."""
    if loss not in LOSSES:
        raise MixqError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def check_bn_stats(mode: str) -> None:
    """The one-line error the training configs (TrainConfig, RobustConfig) give a bad --bn-stats."""
    if mode not in BN_STATS:
        raise MixqError(f"--bn-stats must be one of {', '.join(BN_STATS)}, got {mode!r}")


def check_augment(augment: str) -> None:
    """The one-line error every training config (TrainConfig, QATConfig, RobustConfig) gives a bad augment."""
    if augment not in AUGMENTS:
        raise MixqError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
