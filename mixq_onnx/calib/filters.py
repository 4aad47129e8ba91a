"""GenQ-style filters for over-generated calibration images: score each image, keep the best.

`score_images(model, images, method)` returns one score per image, HIGHER = keep. The methods are the
registry `mixq_onnx.registry.FILTERS` (light, so the CLI lists them without importing torch); each entry
names its scoring function here (`energy_scores`, `bn_scores`, `patch_entropy_scores`). A new filter is a
function `(model, images, batch_size) -> [N] float32` plus one `register_filter(Filter(...))` line there.

- ``energy``: the free-energy score of the FP model, ``logsumexp(logits)`` (= -E(x) at temperature
  1; Liu et al., "Energy-based out-of-distribution detection"). In-distribution images get larger
  logits overall, noise and off-manifold images smaller ones.
- ``bn``: minus the per-image BatchNorm-statistics distance. For every BatchNorm2d of the model,
  the image's own per-channel spatial mean and standard deviation of the layer's *input* are
  compared with the layer's running statistics:
  ``sum_layers ||mu_img - running_mean||_2 + ||sigma_img - sqrt(running_var + eps)||_2``.
  A single image's spatial statistics never equal the population's (they miss the between-image
  variance), so the distance is never zero even for real photos; it is a relative measure, and it
  does not depend on which other images share the batch.
- ``patch-entropy``: texture richness on the stored pixels, no model involved. Each image is
  converted to luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, rounded to 0..255) and cut into
  non-overlapping P x P patches, P = max(8, min(H, W) // 8) (8 px for 32 x 32 images, 28 px for
  224 x 224; the remainder at the right/bottom edge is ignored). Per patch, the Shannon entropy
  (bits) of its 16-bin intensity histogram (bins of 16 grey levels) is computed; the score is the
  mean over patches, in [0, 4]. Flat or nearly uniform images (blank backgrounds, saturated
  blobs) score low; note that pure noise scores highest, so use it together with a model-based
  filter, not alone.

Images are uint8 NHWC; the model-based methods preprocess them with the model's own
`Preprocessing` (resize, scale, normalise).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import MixqError
from ..models import get_preprocessing
from ..registry import FILTERS, resolve

__all__ = ["FILTERS", "bn_scores", "energy_scores", "keep_top", "patch_entropy", "patch_entropy_scores",
           "score_images"]

PATCH_BINS = 16


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MixqError(f"filters expect uint8 images [N, H, W, 3], got {shape}")
    return images


def patch_entropy(images: torch.Tensor) -> torch.Tensor:
    """Mean 16-bin patch-histogram entropy (bits) of uint8 NHWC images; see the module docstring."""
    images = _check_images(images)
    n, h, w, _ = images.shape
    if n == 0:
        return torch.zeros(0)
    p = max(8, min(h, w) // 8)
    if p > min(h, w):
        p = min(h, w)
    x = images.to(torch.float32)
    luma = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).round().clamp(0, 255)
    bins = (luma.to(torch.int64) * PATCH_BINS) // 256  # [n, h, w] in 0..15
    gh, gw = h // p, w // p
    bins = bins[:, : gh * p, : gw * p].reshape(n, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(n, gh * gw, p * p)
    counts = torch.zeros(n, gh * gw, PATCH_BINS, dtype=torch.float64)
    counts.scatter_add_(2, bins, torch.ones_like(bins, dtype=torch.float64))
    prob = counts / float(p * p)
    ent = -(prob * torch.where(prob > 0, prob.log2(), torch.zeros_like(prob))).sum(2)
    return ent.mean(1).to(torch.float32)


class _PerImageBN:
    """Forward hooks accumulating each image's BN-input statistics distance."""

    def __init__(self, model: nn.Module):
        self.layers = [
            m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
        ]
        self.dist: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        x = inputs[0].float()
        var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False)  # [n, c]
        std = torch.sqrt(var + module.eps)
        d = torch.linalg.vector_norm(mean - module.running_mean.float(), dim=1) + torch.linalg.vector_norm(
            std - torch.sqrt(module.running_var.float() + module.eps), dim=1
        )
        self.dist = d if self.dist is None else self.dist + d

    def take(self) -> torch.Tensor:
        d, self.dist = self.dist, None
        assert d is not None
        return d

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def score_images(model: nn.Module, images_uint8_nhwc: torch.Tensor, method: str, batch_size: int = 64) -> torch.Tensor:
    """One float32 score per image (CPU tensor), higher = keep. Methods: the registry `FILTERS`."""
    spec = FILTERS.lookup(method)
    images = _check_images(images_uint8_nhwc)
    if batch_size < 1:
        raise MixqError(f"filter batch size must be >= 1, got {batch_size}")
    if spec.needs_model and model is None:
        raise MixqError(f"filter {method!r} needs a model")
    return resolve(spec.score)(model, images, batch_size)


def check_filter_model(method: str, model: nn.Module) -> None:
    """Score one blank image before any candidate is generated: a model the filter cannot use (no BatchNorm
    for `bn`, no [N, classes] logits for `energy`) is refused up front, not after hours of generation."""
    spec = FILTERS.lookup(method)
    if spec.needs_model:
        _, h, w = get_preprocessing(model).input_size
        score_images(model, torch.zeros(1, h, w, 3, dtype=torch.uint8), method)


def _model_scores(model: nn.Module, images: torch.Tensor, batch_size: int,
                  score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run the model in eval mode on preprocessed batches; `score(logits)` gives each batch's scores."""
    pre = get_preprocessing(model)
    dev = _device(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = pre(images[i:i + batch_size]).to(dev)
            out.append(score(model(x)).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0)
    return torch.cat(out).to(torch.float32)


@torch.no_grad()
def energy_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """`energy`: logsumexp of the classifier's logits."""

    def score(logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise MixqError("filter 'energy' needs a classifier returning [N, classes] logits")
        return torch.logsumexp(logits.float(), dim=1)

    return _model_scores(model, images, batch_size, score)


@torch.no_grad()
def bn_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """`bn`: minus each image's BatchNorm-statistics distance."""
    hooks = _PerImageBN(model)
    if not hooks.layers:
        hooks.remove()
        raise MixqError(f"filter 'bn' needs a model with BatchNorm2d layers; {type(model).__name__} has none")
    try:
        return _model_scores(model, images, batch_size, lambda _logits: -hooks.take())
    finally:
        hooks.remove()


def patch_entropy_scores(model: nn.Module | None, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """`patch-entropy`: `patch_entropy(images)`; no model."""
    return patch_entropy(images)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` highest scores; ties go to the lower index, so selection
    is deterministic. NaN scores rank last."""
    n = int(scores.numel())
    if not 0 <= keep <= n:
        raise MixqError(f"cannot keep {keep} of {n} images")
    s = torch.nan_to_num(scores.detach().double().cpu(), nan=-math.inf)
    order = torch.sort(-s, stable=True).indices  # descending score, stable on index
    return torch.sort(order[:keep]).values
