"""GenQ-style filters: score over-generated candidates with the target model; higher = keep.

- energy: free energy logsumexp(logits); in-distribution images get higher values.
- bn: minus the per-image distance between the channel statistics at every BatchNorm input and the
  BN running statistics (sum over layers of ||mu - mu_bn||_2 + ||sigma - sigma_bn||_2).
- patch-entropy: mean Shannon entropy (bits) of 16-bin grey-level histograms over non-overlapping 8x8
  patches; flat or saturated images score low, textured ones high.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MixqError
from ..models import get_preprocessing

FILTERS = ("energy", "bn", "patch-entropy")


@torch.no_grad()
def _energy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(model(x).float(), dim=1)


@torch.no_grad()
def _bn_distance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dist = torch.zeros(x.shape[0], device=x.device)
    hooks = []

    def hook(m: nn.BatchNorm2d, args, _out) -> None:
        a = args[0].float()
        mu = a.mean(dim=(2, 3))
        sd = a.var(dim=(2, 3), unbiased=False).add(m.eps).sqrt()
        rmu = m.running_mean.view(1, -1)
        rsd = (m.running_var + m.eps).sqrt().view(1, -1)
        dist.add_((mu - rmu).norm(dim=1) + (sd - rsd).norm(dim=1))

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            hooks.append(m.register_forward_hook(hook))
    if not hooks:
        raise MixqError("--filter bn needs a model with BatchNorm2d layers")
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return -dist


def _patch_entropy(images: torch.Tensor, patch: int = 8, bins: int = 16) -> torch.Tensor:
    grey = images.float().mean(dim=-1)  # [N,H,W] in 0..255
    n, h, w = grey.shape
    p = min(patch, h, w)
    tiles = grey[:, : h - h % p, : w - w % p].unfold(1, p, p).unfold(2, p, p).reshape(n, -1, p * p)
    idx = (tiles / 256.0 * bins).long().clamp(0, bins - 1)
    hist = F.one_hot(idx, bins).sum(dim=2).float() / (p * p)
    ent = -(hist * torch.log2(hist.clamp(min=1e-12))).sum(-1)
    return ent.mean(dim=1)


def score_images(model: nn.Module, images: torch.Tensor, method: str, batch_size: int = 64) -> torch.Tensor:
    """Per-image scores for uint8 NHWC `images` (higher = keep)."""
    if method not in FILTERS:
        raise MixqError(f"unknown filter {method!r}: choose one of {', '.join(FILTERS)}")
    if method == "patch-entropy":
        return _patch_entropy(images)
    pre = get_preprocessing(model)
    dev = next(model.parameters()).device
    fn = _energy if method == "energy" else _bn_distance
    model.eval()
    out = [fn(model, pre(images[s:s + batch_size]).to(dev)).cpu() for s in range(0, len(images), batch_size)]
    return torch.cat(out)
