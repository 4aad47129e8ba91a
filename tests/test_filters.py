"""GenQ filters on the real ResNet-20: real images outrank noise; --filter keeps the best --keep."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESNET20, TRAIN_NPZ, need_shared

from mixq_onnx.calib import verify
from mixq_onnx.calib.filters import score_images
from mixq_onnx.errors import MixqError
from mixq_onnx.models import load_model


@need_shared(RESNET20, TRAIN_NPZ)
@pytest.mark.parametrize("method", ["energy", "bn", "patch-entropy"])
def test_real_images_outrank_noise(method):
    model = load_model("cifar_resnet20", RESNET20)
    real = torch.from_numpy(np.load(TRAIN_NPZ)["x"][:32])
    noise = torch.randint(0, 256, (32, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    flat = torch.full((32, 32, 32, 3), 128, dtype=torch.uint8)
    s_real, s_noise, s_flat = (score_images(model, x, method) for x in (real, noise, flat))
    assert s_real.shape == (32,) and torch.isfinite(s_real).all()
    if method == "bn":  # the strongest: real images match BN statistics better than noise or blanks
        assert s_real.min() > max(s_noise.max(), s_flat.max())
    else:  # energy and patch-entropy separate natural images from degenerate blank ones
        assert s_real.median() > s_flat.median()


def test_unknown_filter():
    with pytest.raises(MixqError, match="unknown filter"):
        score_images(load_model("cifar_resnet20", random_init=True), torch.zeros(1, 32, 32, 3, dtype=torch.uint8), "x")


def test_filter_keeps_best(tmp_path, run_cli):
    r = run_cli("calib", "--generator", "noise", "--num", "12", "--shard-size", "5", "--filter", "energy", "--keep", "7",
                "--model", "cifar_resnet20", "--random-weights", "--cache-root", tmp_path, "-q")
    assert r.code == 0, r.err
    p = Path(r.last_line)
    assert verify(p).ok
    m = json.loads((p / "manifest.json").read_text())
    scores = [rec["score"] for rec in m["images"]]
    assert len(scores) == 7 and [rec["index"] for rec in m["images"]] == sorted(rec["index"] for rec in m["images"])
    assert not list(p.glob("cand-*"))
    # the same 12 images unfiltered (noise depends on (seed, index) only): the kept ones are the top 7
    r2 = run_cli("calib", "--generator", "noise", "--num", "12", "--model", "cifar_resnet20", "--random-weights",
                 "--cache-root", tmp_path / "all", "-q")
    from mixq_onnx.calib import load_images

    images, _ = load_images(Path(r2.last_line))
    all_scores = score_images(load_model("cifar_resnet20", random_init=True), images, "energy")
    top = sorted(torch.argsort(all_scores, descending=True)[:7].tolist())
    assert [rec["index"] for rec in m["images"]] == top
