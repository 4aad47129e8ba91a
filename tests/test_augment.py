"""The shared training loop's `--augment flip-crop` (qat, robustify): what each image becomes, reproducibility
under a seed, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq_onnx.errors import MixqError
from mixq_onnx.qat import QATConfig
from mixq_onnx.training import TrainConfig, TrainData, augment_batch, train


def _reference(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One image at a time, the textbook way: mirror, reflect-pad by H/8, crop H x W at the drawn offset."""
    n, _, h, w = x.shape
    pad = min(max(1, min(h, w) // 8), min(h, w) - 1)
    flip = torch.rand(n, generator=gen) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = []
    for i in range(n):
        xi = x[i].flip(2) if flip[i] else x[i]
        xp = F.pad(xi[None], (pad, pad, pad, pad), mode="reflect")[0]
        out.append(xp[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w])
    return torch.stack(out)


@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (16, 24), (24, 16), (2, 5)])
def test_each_image_is_mirrored_and_shifted_as_drawn(hw):
    x = torch.randn(64, 3, *hw, generator=torch.Generator().manual_seed(0))
    got = augment_batch(x, torch.Generator().manual_seed(5))
    want = _reference(x, torch.Generator().manual_seed(5))
    assert got.shape == x.shape and torch.equal(got, want)
    assert sum(torch.equal(g, xi) for g, xi in zip(got, x)) < 16  # most images moved


def test_a_one_pixel_image_is_only_mirrored():
    x = torch.randn(8, 3, 1, 6, generator=torch.Generator().manual_seed(0))
    got = augment_batch(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(g, xi) or torch.equal(g, xi.flip(2)) for g, xi in zip(got, x))


def test_an_unshifted_unmirrored_draw_is_the_image_itself():
    """The centre crop of the padded image without a flip gives the input back (the padding is not in it)."""
    x = torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    got = augment_batch(x, gen)
    g = torch.Generator().manual_seed(2)
    flip = torch.rand(400, generator=g) < 0.5
    dy, dx = torch.randint(0, 3, (400,), generator=g), torch.randint(0, 3, (400,), generator=g)
    plain = (~flip) & (dy == 1) & (dx == 1)
    assert plain.any() and torch.equal(got[plain], x[plain])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_augmented_training_is_reproducible_and_differs_from_plain():
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    data = TrainData(x, torch.arange(40) % 3, "random")
    runs = {}
    for tag, aug in (("a", "flip-crop"), ("b", "flip-crop"), ("plain", "none")):
        m = _net()
        train(m, data, TrainConfig(epochs=2, lr=0.05, batch_size=8, kd_weight=0, augment=aug), progress=False)
        runs[tag] = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.allclose(runs["a"], runs["plain"])


def test_bad_augment_is_refused_by_both_configs():
    with pytest.raises(MixqError, match="--augment must be one of none, flip-crop"):
        TrainConfig(augment="mixup").validate()
    with pytest.raises(MixqError, match="--augment must be one of none, flip-crop"):
        QATConfig(target_bits=4, augment="mixup").validate()
