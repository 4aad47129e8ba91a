"""Labelled evaluation data: an npz (`x` uint8 NHWC, `y`) or an ImageFolder-style directory."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import MixqError

if TYPE_CHECKING:
    from .models.preprocessing import Preprocessing

#: Names the rule `pick_subset` follows; part of every cached result that a `--limit` decided (sweep cells), so
#: a change to the rule invalidates them. Bump it whenever the same (labels, limit, seed) would pick other images.
SUBSET_RULE = "stratified-largest-remainder-v1"

#: Resizing by more than this factor (either way) gets a `warning:` line: the model probably expects other data.
RESIZE_WARN_FACTOR = 2.0


def pick_subset(labels: np.ndarray | None, n_total: int, limit: int | None, seed: int = 0
                ) -> tuple[np.ndarray, str]:
    """Sorted indices of `limit` of `n_total` images and a human description of the choice.

    The first N images of a class-sorted file are one class only, so a `--limit` never takes a prefix: with
    labels it takes a seeded, class-stratified sample (each class in proportion, largest-remainder rounding,
    exactly `limit` images); without labels a seeded random sample. `limit` None or >= `n_total`: all images.
    """
    if limit is None or limit >= n_total:
        return np.arange(n_total), f"all {n_total} images"
    if limit < 1:
        raise MixqError(f"--limit must be at least 1, got {limit}")
    rng = np.random.default_rng([int(seed), 0x5B5E7])
    if labels is None:
        idx = rng.choice(n_total, size=limit, replace=False)
        return np.sort(idx), f"{limit} of {n_total} images, random sample (seed {seed})"
    labels = np.asarray(labels)
    if labels.shape != (n_total,):
        raise MixqError(f"{labels.shape[0] if labels.ndim else 0} labels for {n_total} images")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = limit * counts  # exact integers: class c gets quota // n_total, plus one by largest remainder
    take = quota // n_total
    remainder = quota % n_total
    tiebreak = rng.permutation(len(classes))  # equal remainders: a seeded order, not always the lowest class
    extra = np.lexsort((tiebreak, -remainder))[: limit - int(take.sum())]
    take[extra] += 1
    picks = [rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False) for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(picks)), f"{limit} of {n_total} images, class-stratified sample (seed {seed})"


@dataclass
class LabelledData:
    """Images, labels and what a user should be told about them (which subset, their size before resizing)."""

    images: torch.Tensor  # uint8 [N,H,W,3]
    labels: torch.Tensor  # int64 [N]
    subset: str  # pick_subset's description, e.g. "500 of 5000 images, class-stratified sample (seed 0)"
    source_hw: tuple[int, int]  # the data's own size (folders: the median decoded image) before any resize
    resized_on_load: bool = False  # folders: scaled to cover the model input and centre-cropped to it on load


def load_labelled(path: str | os.PathLike, size: int | tuple[int, int] | None = None, limit: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,H,W,3] and int64 labels [N] (`read_labelled` without the description)."""
    d = read_labelled(path, size, limit, seed)
    return d.images, d.labels


def read_labelled(path: str | os.PathLike, size: int | tuple[int, int] | None = None, limit: int | None = None,
                  seed: int = 0, *, labelled: bool = True) -> LabelledData:
    """An npz or class-folder tree; `limit` picks `pick_subset`'s sample (never the first N: files are often
    sorted by class). Folder images are scaled to cover `size` (an int: a square; or (height, width)) and
    centre-cropped to it so they stack. `labelled=False` also takes images without labels (an npz without 'y',
    a flat folder), labelled -1, for a reader that never looks at them (`verify`)."""
    from .calib.generators.real import folder_files, load_npz, resize_center, rgb8

    p = Path(path)
    if not str(path).strip() or not p.exists():
        raise MixqError(f"data not found: {str(path)!r}")
    if not (p.is_file() or p.is_dir()):
        raise MixqError(f"{p} is neither an npz file nor a folder of images")
    if limit is not None and limit < 1:
        raise MixqError(f"--limit must be at least 1, got {limit}")
    if p.is_file():
        x, y = load_npz(p)  # checks: a zip archive, 'x' uint8 NHWC, 'y' 1-D integers, one per image
        if y is None and labelled:
            raise MixqError(f"{p} has no labels 'y'")
        if len(x) == 0:
            raise MixqError(f"{p} holds no images (0 in 'x')")
        idx, subset = pick_subset(y, len(x), limit, seed)
        if y is None:
            y = np.full(len(x), -1, dtype=np.int64)
        if len(idx) < len(x):
            x, y = x[idx], y[idx]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if xt.shape[-1] == 1:
            xt = xt.expand(-1, -1, -1, 3)
        return LabelledData(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), subset,
                            (int(x.shape[1]), int(x.shape[2])))
    from .calib.cache import is_cache_dir

    if p.is_dir() and is_cache_dir(p):
        raise MixqError(f"{p} is a calibration cache: its images have no labels to judge against; give labelled "
                        "images (an npz with x and y, or a folder per class)")
    files, labels, _ = folder_files(p)
    if not files:
        raise MixqError(f"no images under {p}")
    if labels and labels[0] < 0 and labelled:
        raise MixqError(f"{p} has no class sub-folders, so no labels")
    idx, subset = pick_subset(np.asarray(labels) if labels[0] >= 0 else None, len(files), limit, seed)
    files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    from PIL import Image

    s = size or 224
    imgs, sizes = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = torch.from_numpy(rgb8(im))
        except MixqError as e:
            raise MixqError(f"cannot read image {f}: {e}") from None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise MixqError(f"cannot read image {f}: {' '.join(str(e).split())}") from None
        sizes.append(arr.shape[:2])
        imgs.append(resize_center(arr, s))
    hw = np.median(np.asarray(sizes), axis=0)
    return LabelledData(torch.stack(imgs), torch.tensor(labels, dtype=torch.int64), subset,
                        (int(hw[0]), int(hw[1])), resized_on_load=True)


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def preprocessing_notes(pre: Preprocessing, source_hw: tuple[int, int] | None, *,
                        resized_on_load: bool = False) -> list[str]:
    """The `preprocessing:` line (input size, resize, mean/std) and, when the data is resized by more than
    `RESIZE_WARN_FACTOR` either way, a `warning:` line: a model loaded from a file gets 224x224 ImageNet
    preprocessing unless told otherwise, and 32x32 images upsampled 7x lose accuracy without a word."""
    _, h, w = pre.input_size
    mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
    if source_hw is None:
        how = f"resize {mode} if needed"
    elif resized_on_load:
        how = f"images ~{source_hw[0]}x{source_hw[1]}, scaled bilinear to cover the input and centre-cropped on load"
    elif tuple(source_hw) == (h, w):
        how = f"data {source_hw[0]}x{source_hw[1]}, no resize"
    else:
        how = f"data {source_hw[0]}x{source_hw[1]}, resize {mode}"
    lines = [f"preprocessing: {h}x{w} input, {how}, mean {_fmt(pre.mean)} std {_fmt(pre.std)}"]
    if source_hw is not None and min(source_hw) > 0:
        factor = max(h / source_hw[0], source_hw[0] / h, w / source_hw[1], source_hw[1] / w)
        if factor > RESIZE_WARN_FACTOR:
            way = "upsampled" if h * w > source_hw[0] * source_hw[1] else "downsampled"
            lines.append(f"warning: the data is {source_hw[0]}x{source_hw[1]} but the model's input is {h}x{w}: "
                         f"every image is {way} {factor:.1f}x; if the model takes {source_hw[0]}x{source_hw[1]} "
                         f"images, pass --input-size {source_hw[0]}")
    return lines


def report_data(pre: Preprocessing, source_hw: tuple[int, int] | None, subset: str | None = None, *,
                log: Callable[[str], None] | None = None, quiet: bool = False, resized_on_load: bool = False
                ) -> list[str]:
    """Tell the user which images a command feeds its model and how: `data: <subset>`, `preprocessing: ...` and
    any resize warning, one line each, through `log` (stderr by default). `quiet` keeps only the warnings.
    Returns the lines emitted. Every command that feeds images to a model calls this (one wording)."""
    lines = ([f"data: {subset}"] if subset else []) + preprocessing_notes(pre, source_hw,
                                                                          resized_on_load=resized_on_load)
    if quiet:
        lines = [ln for ln in lines if ln.startswith("warning:")]
    out = log or (lambda m: print(m, file=sys.stderr))
    for ln in lines:
        out(ln)
    return lines


def model_hw(pre: Preprocessing) -> tuple[int, int]:
    """The (height, width) a model's images are read at."""
    return int(pre.input_size[1]), int(pre.input_size[2])


def read_for_model(path: str | os.PathLike, pre: Preprocessing, limit: int | None = None, *,
                   log: Callable[[str], None] | None = None, labelled: bool = True) -> LabelledData:
    """`read_labelled` at the model's input size, then `report_data` through `log` (None: silent): what `eval`
    and `eval --engine` feed their model, and the lines that say so."""
    d = read_labelled(path, model_hw(pre), limit, labelled=labelled)
    if log is not None:
        report_data(pre, d.source_hw, d.subset, log=log, resized_on_load=d.resized_on_load)
    return d
