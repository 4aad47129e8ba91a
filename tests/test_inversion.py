"""The `inversion` generator (BN-statistics inversion) and the GenQ filters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixq_onnx.calib.classes import load_classes
from mixq_onnx.calib.filters import FILTERS, keep_top, patch_entropy, score_images
from mixq_onnx.calib.generators.base import GenContext
from mixq_onnx.calib.generators.inversion import InversionGenerator
from mixq_onnx.calib.prompts import PromptConfig, plan_images
from mixq_onnx.errors import MixqError
from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.utils import shared_root

RESNET20 = shared_root() / "models" / "resnet20-12fca82f.th"
TRAIN_NPZ = shared_root() / "data" / "cifar10_train_calib.npz"
need_real = pytest.mark.skipif(
    not (RESNET20.exists() and TRAIN_NPZ.exists()), reason="../shared ResNet-20 / CIFAR-10 not available"
)

FAST = {"iters": 12, "gen_channels": 16, "latent_dim": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one intra-op thread is faster than two, and far faster when other processes
    share the cores (OpenMP threads spin against each other). Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    if RESNET20.exists():
        return load_model("cifar_resnet20", RESNET20)
    return load_model("cifar_resnet20", random_init=True)


def _ctx(model, strategy="mixup", size=32, seed=3, **options) -> GenContext:
    return GenContext(num=16, seed=seed, size=size, prompts=PromptConfig(strategy), vocab=load_classes("cifar10"),
                      model=model, device=torch.device("cpu"), options={**FAST, **options}, log=lambda s: None)


def _plans(strategy="mixup", start=0, stop=16, seed=3):
    return plan_images(PromptConfig(strategy), load_classes("cifar10"), seed, start, stop)


def test_shard_bn_loss_drops_and_is_reproducible(resnet20):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    gen = InversionGenerator(_ctx(resnet20))
    gen.validate()
    plans = _plans()
    out = gen.generate(0, plans)
    assert out.images.dtype == torch.uint8 and tuple(out.images.shape) == (16, 32, 32, 3)
    s = out.stats
    assert s["iters"] == 12 and s["bn_layers"] == 19 and s["swing_convs"] == 2
    assert s["bn_loss_end"] < 0.9 * s["bn_loss_start"], s
    assert np.isfinite(s["ce_end"]) and s["seconds"] > 0
    assert len(out.extra) == 16
    assert all(0 <= e["fp_pred"] < 10 and 0 < e["fp_prob"] <= 1 for e in out.extra)

    # a fresh generator instance, same shard: byte-identical
    again = InversionGenerator(_ctx(resnet20)).generate(0, plans)
    assert torch.equal(out.images, again.images)
    assert [e["fp_pred"] for e in out.extra] == [e["fp_pred"] for e in again.extra]
    # another shard index draws other latents and weights, from the seed its stats record
    other = InversionGenerator(_ctx(resnet20)).generate(1, plans)
    assert not torch.equal(out.images, other.images)
    assert isinstance(s["seed"], int) and again.stats["seed"] == s["seed"] != other.stats["seed"]

    # the target network is left as it was: weights, eval mode, no hooks, no gradients
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not resnet20.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in resnet20.modules())
    assert all(p.grad is None for p in resnet20.parameters())


def test_strategy_none_and_resize(resnet20):
    gen = InversionGenerator(_ctx(resnet20, strategy="none", size=24, iters=3))
    gen.validate()
    assert gen.recipe()["ce_weight"] == 0.0
    out = gen.generate(0, _plans("none", 0, 8))
    assert tuple(out.images.shape) == (8, 24, 24, 3) and out.images.dtype == torch.uint8
    assert "ce_end" not in out.stats


def test_recipe_records_options(resnet20):
    r = InversionGenerator(_ctx(resnet20, lr=0.02, swing=False)).recipe()
    assert r["name"] == "inversion" and r["iters"] == 12 and r["lr"] == 0.02 and r["latent_dim"] == 32
    assert r["swing"] == {"conv": False, "jitter": 0, "flip": True}
    assert r != InversionGenerator(_ctx(resnet20)).recipe()


def test_validate_errors(resnet20):
    with pytest.raises(MixqError, match="needs --model"):
        InversionGenerator(_ctx(None)).validate()
    no_bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(MixqError, match="BatchNorm2d"):
        InversionGenerator(_ctx(no_bn)).validate()
    with pytest.raises(MixqError, match="iters"):
        InversionGenerator(_ctx(resnet20, iters=-1)).validate()
    with pytest.raises(MixqError, match="1000 classes"):
        ctx = _ctx(resnet20)
        ctx.vocab = load_classes("imagenet")
        InversionGenerator(ctx).validate()


# ---------------------------------------------------------------- filters

def _auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative)."""
    return float((pos.view(-1, 1) > neg.view(1, -1)).double().mean())


@need_real
def test_filters_rank_real_images_first(resnet20):
    real = torch.from_numpy(np.load(TRAIN_NPZ)["x"][::50][:48])  # 48 training images, all classes
    g = torch.Generator().manual_seed(0)
    uniform = torch.randint(0, 256, (48, 32, 32, 3), generator=g, dtype=torch.uint8)
    # the `noise` generator's distribution: N(0, 1) in the model's normalised space
    gauss = get_preprocessing(resnet20).denormalize(torch.randn(48, 3, 32, 32, generator=g))
    flat = torch.randint(0, 256, (48, 1, 1, 3), generator=g, dtype=torch.uint8).expand(48, 32, 32, 3).contiguous()
    low_contrast = ((real.float() - 127.5) * 0.2 + 127.5).round().to(torch.uint8)
    scores = {m: score_images(resnet20, real, m) for m in ("energy", "bn")}
    for method, s_real in scores.items():
        assert s_real.shape == (48,) and s_real.dtype == torch.float32 and torch.isfinite(s_real).all()
        # per-image scores: independent of how the images are batched
        assert torch.allclose(score_images(resnet20, real, method, batch_size=7), s_real, rtol=1e-4, atol=1e-4)
    # bn: nearly every real image outranks nearly every noise image (measured AUROC 1.0)
    for noise in (uniform, gauss, flat, low_contrast):
        assert _auroc(scores["bn"], score_images(resnet20, noise, "bn")) > 0.95
    # energy separates real images from blank and washed-out ones (measured AUROC 0.90, 0.86), but
    # NOT from pixel noise on this network (AUROC 0.58 uniform, 0.52 Gaussian: noise draws
    # confident logits), so no noise assertion for it
    assert _auroc(scores["energy"], score_images(resnet20, flat, "energy")) > 0.8
    assert _auroc(scores["energy"], score_images(resnet20, low_contrast, "energy")) > 0.8


@need_real
def test_bn_filter_prefers_inversion_images_over_noise(resnet20):
    inv = InversionGenerator(_ctx(resnet20, iters=20)).generate(0, _plans()).images
    noise = get_preprocessing(resnet20).denormalize(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert _auroc(score_images(resnet20, inv, "bn"), score_images(resnet20, noise, "bn")) > 0.9


def test_patch_entropy_definition():
    flat = torch.full((2, 32, 32, 3), 77, dtype=torch.uint8)
    assert torch.equal(patch_entropy(flat), torch.zeros(2))
    # two grey levels in separate bins, half the pixels each, in every 8x8 patch: exactly 1 bit
    halves = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    halves[:, :, 1::2] = 200
    assert torch.allclose(patch_entropy(halves), torch.tensor([1.0]))
    noise = torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    s = score_images(None, noise, "patch-entropy")  # needs no model
    assert s.shape == (4,) and bool(((s > 3.0) & (s <= 4.0)).all())


def test_filter_errors_and_keep_top(resnet20):
    imgs = torch.randint(0, 256, (5, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert len(FILTERS) >= 3
    for name in FILTERS:  # every registered filter gives one finite float32 score per image
        s = score_images(resnet20, imgs, name, batch_size=2)
        assert s.shape == (5,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all()), name
    x = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(MixqError, match="unknown filter"):
        score_images(resnet20, x, "sharpness")
    with pytest.raises(MixqError, match="uint8"):
        score_images(resnet20, x.float(), "energy")
    scores = torch.tensor([0.5, 2.0, float("nan"), 2.0, -1.0])
    assert keep_top(scores, 2).tolist() == [1, 3]
    assert keep_top(scores, 3).tolist() == [0, 1, 3]
    assert keep_top(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(MixqError):
        keep_top(scores, 6)


@need_real
def test_inversion_pulls_each_image_towards_its_plans_classes(resnet20):
    """The cross-entropy targets are the plan's classes (review, 2026-11-30: targets shifted to the next class
    passed every test). On the real ResNet-20, 12 iterations already make the float model predict one of an
    image's two mixup classes for 8 of 16 images (chance: 2 of 10 classes, about 3); shifted targets gave 4."""
    plans = _plans()
    out = InversionGenerator(_ctx(resnet20)).generate(0, plans)
    hits = sum(e["fp_pred"] in p.classes for e, p in zip(out.extra, plans))
    assert hits >= 7, hits
