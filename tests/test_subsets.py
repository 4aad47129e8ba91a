"""Honest subsets (`--limit` never takes the first N of a class-sorted file) and no silent preprocessing
(every command that feeds images to a model says how, and warns on a resize of more than 2x)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESNET20, TEST_NPZ, need_shared, one_line_error

from mixq_onnx.data import SUBSET_RULE, pick_subset, preprocessing_notes, read_labelled
from mixq_onnx.errors import MixqError
from mixq_onnx.models import Preprocessing

SORTED = np.repeat(np.arange(10), 50)  # 500 labels, sorted by class like the shared npz files

#: A model file: logits fall with the class index whatever the image, so top-1 is the share of class 0 in the
#: evaluated images and top-5 the share of classes 0-4 (both 100 % on a first-N prefix of a sorted file).
RANKED_PY = '''
import torch
import torch.nn as nn


class Ranked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(-torch.arange(10.0))

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def ranked():
    return Ranked()
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A class-sorted npz (200 images, 20 per class) and the ranked model file."""
    d = tmp_path_factory.mktemp("subsets")
    rng = np.random.default_rng(0)
    np.savez(d / "sorted.npz", x=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y=np.repeat(np.arange(10), 20))
    (d / "ranked.py").write_text(RANKED_PY)
    return {"npz": d / "sorted.npz", "model": d / "ranked.py", "root": d}


def test_stratified_counts_are_proportional_and_exact():
    idx, desc = pick_subset(SORTED, 500, 100)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(SORTED[idx], minlength=10).tolist() == [10] * 10
    assert desc == "100 of 500 images, class-stratified sample (seed 0)"
    idx, _ = pick_subset(SORTED, 500, 55)  # 5.5 per class: five classes get the extra image
    counts = np.bincount(SORTED[idx], minlength=10)
    assert len(idx) == 55 and sorted(counts.tolist()) == [5] * 5 + [6] * 5
    uneven = np.array([0] * 90 + [1] * 7 + [2] * 3)  # quotas 9, 0.7, 0.3: the largest remainder gets the 10th
    idx, _ = pick_subset(uneven, 100, 10)
    assert np.bincount(uneven[idx], minlength=3).tolist() == [9, 1, 0]


def test_same_seed_same_images_other_seed_other_images():
    a, _ = pick_subset(SORTED, 500, 50, seed=3)
    b, _ = pick_subset(SORTED, 500, 50, seed=3)
    c, desc = pick_subset(SORTED, 500, 50, seed=4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert np.bincount(SORTED[c], minlength=10).tolist() == [5] * 10 and "seed 4" in desc


def test_unlabelled_is_a_seeded_random_sample_and_limit_over_total_is_all():
    idx, desc = pick_subset(None, 1000, 30, seed=1)
    assert len(set(idx.tolist())) == 30 and np.all(np.diff(idx) > 0) and idx.max() > 100  # not a prefix
    assert idx.tolist() == pick_subset(None, 1000, 30, seed=1)[0].tolist()
    assert idx.tolist() != pick_subset(None, 1000, 30, seed=2)[0].tolist()
    assert desc == "30 of 1000 images, random sample (seed 1)"
    for limit in (None, 1000, 5000):
        idx, desc = pick_subset(None, 1000, limit)
        assert idx.tolist() == list(range(1000)) and desc == "all 1000 images"
    with pytest.raises(MixqError, match="--limit"):
        pick_subset(SORTED, 500, 0)


def test_a_class_folder_is_sampled_per_class(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    d = read_labelled(tmp_path, 16, limit=6)
    assert d.images.shape == (6, 16, 16, 3) and d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.subset == "6 of 12 images, class-stratified sample (seed 0)"
    assert d.source_hw == (40, 48) and d.resized_on_load


def test_eval_limit_spans_every_class(world, run_cli):
    """End to end: the subset line, the JSON field, and numbers that only a stratified sample gives."""
    r = run_cli("eval", "--model", f"{world['model']}:ranked", "--input-size", "32", "--data", world["npz"],
                "--limit", "50", "--json")
    assert r.code == 0, r.err
    assert "data: 50 of 200 images, class-stratified sample (seed 0)" in r.err.splitlines()
    res = json.loads(r.last_line)
    assert res["subset"] == "50 of 200 images, class-stratified sample (seed 0)" and res["n"] == 50
    assert res["top1"] == 10.0 and res["top5"] == 50.0  # 5 images of each class; a prefix would give 100 / 100


def test_preprocessing_line_and_the_upsampling_warning(world, run_cli):
    """A model file gets 224x224 bicubic ImageNet preprocessing: eval says so and warns on 32 -> 224."""
    r = run_cli("eval", "--model", f"{world['model']}:ranked", "--data", world["npz"], "--limit", "20")
    assert r.code == 0, r.err
    lines = r.err.splitlines()
    pre = [ln for ln in lines if ln.startswith("preprocessing:")]
    assert pre == ["preprocessing: 224x224 input, data 32x32, resize bicubic, mean (0.485, 0.456, 0.406) "
                   "std (0.229, 0.224, 0.225)"]
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == 1 and "upsampled 7.0x" in warn[0] and "--input-size 32" in warn[0]
    r = run_cli("eval", "--model", f"{world['model']}:ranked", "--input-size", "32", "--data", world["npz"],
                "--limit", "20")
    assert r.code == 0 and "warning:" not in r.err
    assert "preprocessing: 32x32 input, data 32x32, no resize, mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)" \
        in r.err.splitlines()


def test_resize_warning_threshold_is_2x_either_way():
    pre = Preprocessing(input_size=(3, 64, 64), interpolation="bilinear")
    assert len(preprocessing_notes(pre, (32, 32))) == 1  # exactly 2x: no warning
    assert len(preprocessing_notes(pre, (31, 31))) == 2
    down = preprocessing_notes(pre, (160, 160))
    assert len(down) == 2 and "downsampled 2.5x" in down[1] and "--input-size 160" in down[1]


def test_cache_size_error_names_input_size(world, run_cli, tmp_path):
    root = tmp_path / "cache"
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "32", "--cache-root", root, "-q")
    assert r.code == 0, r.err
    cache = r.last_line
    msg = one_line_error(run_cli("quantize", "--model", f"{world['model']}:ranked", "--calib", cache,
                                 "--method", "rtn", "--out", tmp_path / "q"))
    assert "--size 224" in msg and "--input-size 32" in msg


def test_training_data_limit_is_stratified_and_reported(world):
    from mixq_onnx.models import load_model
    from mixq_onnx.training import load_training_data

    model = load_model(f"{world['model']}:ranked", input_size=32)
    lines: list[str] = []
    data = load_training_data(world["npz"], model, limit=30, log=lines.append)
    assert data.inputs.shape == (30, 3, 32, 32)
    assert np.bincount(data.labels.numpy(), minlength=10).tolist() == [3] * 10
    assert lines[0] == "data: 30 of 200 images, class-stratified sample (seed 0)"
    assert lines[1].startswith("preprocessing: 32x32 input, data 32x32, no resize")


def test_a_real_cache_is_stored_shuffled_and_its_limit_is_stratified(world, run_cli, tmp_path):
    """`quantize --num-samples N` takes a cache's first N: fair, because a real cache stores a seeded shuffle;
    training `--limit` on such a cache samples each class in proportion."""
    from mixq_onnx.calib import load_calibration
    from mixq_onnx.models import load_model
    from mixq_onnx.training import load_training_data

    r = run_cli("calib", "--generator", "real", "--source", world["npz"], "--num", "100", "--cache-root",
                tmp_path, "-q")
    assert r.code == 0, r.err
    assert "data: 100 of 200 images of sorted.npz, random sample (seed 0)" in r.err.splitlines()
    model = load_model(f"{world['model']}:ranked", input_size=32)
    ds = load_calibration(r.last_line, model)
    labels = ds.labels()
    assert labels is not None and len(set(labels[:20].tolist())) >= 6  # the first 20 span most classes
    lines: list[str] = []
    data = load_training_data(r.last_line, model, limit=20, log=lines.append)
    assert data.inputs.shape == (20, 3, 32, 32) and "class-stratified sample (seed 0)" in lines[0]
    idx, _ = pick_subset(labels, len(labels), 20)
    assert torch.equal(data.inputs, ds.take(idx))


def test_sweep_fingerprint_names_the_subset_rule():
    from mixq_onnx.sweep import subset_key

    assert subset_key(None) is None  # all images: cells of earlier runs stay valid
    assert subset_key(500) == [500, SUBSET_RULE, 0]


@need_shared(RESNET20, TEST_NPZ)
def test_limit_500_on_the_shared_test_set_matches_the_full_set(run_cli):
    """The old first-500 prefix was airplanes only. A stratified 500 (50 per class) lands within 2 points of
    the same model on all 5,000 images, measured here beside it."""
    args = ("eval", "--model", "cifar_resnet20", "--checkpoint", RESNET20, "--data", TEST_NPZ, "--json")
    full, sub = (run_cli(*args, *extra) for extra in ((), ("--limit", "500")))
    assert full.code == 0 and sub.code == 0, (full.err, sub.err)
    full, sub = json.loads(full.last_line), json.loads(sub.last_line)
    assert full["n"] == 5000 and sub["n"] == 500
    assert abs(sub["top1"] - full["top1"]) <= 2.0, (sub, full)
    y = read_labelled(TEST_NPZ, 32, limit=500).labels.numpy()  # the sample eval --limit 500 read
    assert np.bincount(y, minlength=10).tolist() == [50] * 10


def test_verify_reports_its_subset(world, run_cli, tmp_path):
    from mixq_onnx.models import load_model
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.quant import QuantConfig, quantize, save_quantized

    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
    folder = save_quantized(q, tmp_path / "r20")
    onnx_path = export_qdq(q, tmp_path / "r20.onnx")
    r = run_cli("verify", onnx_path, "--quantized", folder, "--data", world["npz"], "--limit", "30", "--json")
    assert r.code == 0, r.err
    assert "data: 30 of 200 images, class-stratified sample (seed 0)" in r.err.splitlines()
    res = json.loads(r.last_line)
    assert res["n"] == 30 and res["subset"] == "30 of 200 images, class-stratified sample (seed 0)"
