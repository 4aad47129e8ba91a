"""Model loading: timm names, the project's CIFAR zoo (registered in timm's registry), and user factories.

`load_model` returns an eval-mode `nn.Module` carrying its `Preprocessing` and a `ModelSource`
record (spec, checkpoint, sha256) that every later stage writes into its outputs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..utils import hf_offline, sha256_file
from . import cifar_resnet, mlperf_resnet8  # noqa: F401  (registers the zoo with timm)
from .checkpoint import load_state_dict_strict, read_state_dict
from .preprocessing import ATTR, IMAGENET_MEAN, IMAGENET_STD, Preprocessing, get_preprocessing

ZOO = (
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "mlperf_tiny_resnet8",
)
SOURCE_ATTR = "mixq_source"

__all__ = [
    "ZOO",
    "ModelOptions",
    "ModelSource",
    "canonical_spec",
    "is_code_spec",
    "is_hub_spec",
    "same_spec",
    "Preprocessing",
    "get_preprocessing",
    "load_model",
    "model_source",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, enough to rebuild it: recorded in caches and quantized outputs."""

    spec: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_init: bool
    preprocessing: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_source(model: nn.Module) -> ModelSource | None:
    return getattr(model, SOURCE_ATTR, None)


HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm specs that name a Hugging Face hub model


def is_code_spec(spec: str) -> bool:
    """True if `spec` names user code (`path/to/file.py:factory` or `package.module:factory`): building the
    model imports and runs that code, so a spec read from someone else's file must not be built unasked."""
    if is_hub_spec(spec) or spec.startswith("timm/") or ":" not in spec:
        return False
    target, _, fn = spec.rpartition(":")
    return bool(fn.isidentifier() and target)


def is_hub_spec(spec: str) -> bool:
    """True if building `spec` asks the Hugging Face hub (its config, at least): network access and writes
    to the hub cache, which a spec read from someone else's file must not cause unasked."""
    return spec.startswith(HUB_PREFIXES)


def _spec_file(target: str) -> bool:
    """A factory target that is a file path rather than an importable module name."""
    return target.endswith(".py") or os.sep in target or "/" in target


def canonical_spec(spec: str) -> str:
    """`spec` with a file target resolved to an absolute path, so two spellings of one file compare equal."""
    if not is_code_spec(spec):
        return spec
    target, _, fn = spec.rpartition(":")
    if _spec_file(target):
        return f"{Path(target).resolve()}:{fn}"
    return spec


def same_spec(a: str, b: str) -> bool:
    """True if the two model specs name the same network (file specs compared by resolved path)."""
    return canonical_spec(a) == canonical_spec(b)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    target, _, fn = spec.rpartition(":")
    if _spec_file(target):
        path = Path(target)
        if not path.is_file():
            raise MixqError(f"model file not found: {path}")
        name = f"mixq_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise MixqError(f"cannot import model file {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise MixqError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise MixqError(f"cannot import module {target!r}: {e}") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise MixqError(f"{target} has no callable {fn!r}")
    return factory


def _timm_pretrained_in_cache(name: str) -> bool:
    """True if timm's pretrained weights for `name` are already in the local Hugging Face cache."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            return False
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                return True
    except Exception:  # noqa: BLE001
        return False
    return False


def _timm_cache_hint(name: str) -> str:
    """How to put `name`'s weights where `_timm_pretrained_in_cache` (and timm, offline) finds them."""
    try:
        import timm
        from huggingface_hub import constants

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        cache = constants.HF_HUB_CACHE
    except Exception:  # noqa: BLE001
        hub_id, cache = None, None
    if not hub_id or not cache:
        return "timm names no Hugging Face weights for it: pass --checkpoint FILE (or --random-weights)"
    repo = Path(cache) / f"models--{hub_id.replace('/', '--')}"
    return (f"to add them offline, copy the model.safetensors of the hub repo {hub_id} into {repo}/snapshots/REV/ and "
            f"write REV (e.g. the commit hash; no newline) into {repo}/refs/main (the cache is $HF_HUB_CACHE, "
            "default $HF_HOME/hub); or pass --checkpoint FILE (or --random-weights)")


@dataclass(frozen=True)
class ModelOptions:
    """Everything that names a model: what `--model/--checkpoint/--random-weights/--mean/--std/--input-size`
    give every command, as one object (`load_model(opts)`)."""

    spec: str
    checkpoint: str | None = None
    random_init: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, ...] | int | None = None

    def load(self) -> nn.Module:
        return load_model(self)


def load_model(
    spec: str | ModelOptions,
    checkpoint: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | int | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Build the network named by `spec` and load its weights; raise `MixqError` on anything unusable.

    spec: a timm model name, a zoo name (`cifar_resnet20`, ... `mlperf_tiny_resnet8`), or
    `path/to/file.py:factory` / `package.module:factory` for any user network.
    Weights come from `checkpoint`; without one, timm models use pretrained weights from the local
    Hugging Face cache, and `random_init=True` keeps random weights (seeded: tests, smoke runs).
    """
    if isinstance(spec, ModelOptions):
        spec, checkpoint, random_init, mean, std, input_size = (spec.spec, spec.checkpoint, spec.random_init,
                                                                spec.mean, spec.std, spec.input_size)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random_init weights are reproducible, so quantized dirs can be rebuilt
        model = _build(spec, checkpoint, random_init, kwargs)
    return _finish(model, spec, checkpoint, random_init, mean, std, input_size)


def _build(spec: str, checkpoint, random_init: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if is_code_spec(spec):
        factory = _load_factory(spec)
        try:
            model = factory(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise MixqError(f"model factory {spec} failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise MixqError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    elif timm.is_model(spec) or is_hub_spec(spec):
        pretrained = False
        if checkpoint is None and not random_init:
            if spec in ZOO:
                raise MixqError(f"zoo model {spec} has no downloadable weights: pass --checkpoint FILE (or --random-weights)")
            if not _timm_pretrained_in_cache(spec):
                raise MixqError(f"no pretrained weights for timm model {spec} in the local Hugging Face cache: "
                                + _timm_cache_hint(spec))
            pretrained = True
        try:
            if pretrained:
                old = os.environ.get("HF_HUB_OFFLINE")
                os.environ["HF_HUB_OFFLINE"] = "1"
                try:
                    model = timm.create_model(spec, pretrained=True, **kwargs)
                finally:
                    if old is None:
                        os.environ.pop("HF_HUB_OFFLINE", None)
                    else:
                        os.environ["HF_HUB_OFFLINE"] = old
            else:
                model = timm.create_model(spec, pretrained=False, **kwargs)
        except MixqError:
            raise
        except Exception as e:  # noqa: BLE001
            raise MixqError(f"cannot create timm model {spec}: {type(e).__name__}: {e}") from None
    else:
        hint = " (offline: only local files and cached weights work)" if hf_offline() else ""
        import difflib

        import timm

        close = difflib.get_close_matches(spec, list(dict.fromkeys([*ZOO, *timm.list_models()])), n=3, cutoff=0.75)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise MixqError(
            f"unknown model {spec!r}: {guess}give a timm model name (`timm.list_models()`), one of the CIFAR zoo "
            f"({', '.join(ZOO)}), or user code as path/to/file.py:factory or package.module:factory{hint}"
        )
    return model


def _finish(model: nn.Module, spec: str, checkpoint, random_init: bool, mean, std, input_size) -> nn.Module:
    ck_path = None
    ck_sha = None
    if checkpoint is not None:
        ck_path = str(checkpoint)
        sd = read_state_dict(ck_path)
        load_state_dict_strict(model, sd, ck_path)
        ck_sha = sha256_file(ck_path)

    pre = get_preprocessing(model).override(mean=mean, std=std, input_size=input_size)
    setattr(model, ATTR, pre)
    setattr(
        model,
        SOURCE_ATTR,
        ModelSource(
            spec=spec,
            checkpoint=str(Path(ck_path).resolve()) if ck_path else None,
            checkpoint_sha256=ck_sha,
            random_init=checkpoint is None and random_init,
            preprocessing=pre.to_dict(),
        ),
    )
    return model.eval()
