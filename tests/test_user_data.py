"""User-supplied images (npz files and image folders) as every command reads them: odd layouts, odd pixels and
odd names get a faithful read or a one-line error, never a traceback, a mislabelled class or a white image."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, snapshot
from PIL import Image

from mixq_onnx.calib.generators.real import folder_files, resize_center
from mixq_onnx.data import read_labelled
from mixq_onnx.errors import MixqError

TINY = ["--model", "test_resnet", "--input-size", "32", "--random-weights", "--threads", "1"]


def _png(path, value=(200, 30, 60), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path)


def test_an_npz_of_empty_images_is_one_line_and_makes_no_cache(tmp_path, run_cli):
    np.savez(tmp_path / "zero.npz", x=np.zeros((4, 0, 0, 3), np.uint8), y=np.arange(4))
    with pytest.raises(MixqError, match=r"H, W >= 1"):
        read_labelled(tmp_path / "zero.npz", 32)
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("calib", "--generator", "real", "--source", tmp_path / "zero.npz", "--num", "2",
                                  "--size", "32", "--cache-root", tmp_path / "cache", "-q"))
    assert "H, W >= 1" in line and snapshot(tmp_path) == before
    assert "H, W >= 1" in one_line_error(run_cli("eval", *TINY, "--data", tmp_path / "zero.npz"))


def test_16_bit_greyscale_images_are_scaled_down_not_clipped_white(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 100)  # 100 .. 63100 over 16 bits
    (tmp_path / "c0").mkdir()
    Image.fromarray(ramp).save(tmp_path / "c0" / "a.png")
    d = read_labelled(tmp_path, 8)
    got = d.images[0, ..., 0].numpy().astype(int)
    want = np.clip(np.rint(ramp / 257.0), 0, 255).astype(int)
    assert np.array_equal(got, want)
    assert torch.equal(d.images[0, ..., 0], d.images[0, ..., 2])  # grey on all three channels
    assert (got == 255).mean() < 0.05  # convert("RGB") made 99 % of it 255


def test_hidden_folders_are_not_classes_and_loose_images_beside_classes_are_refused(tmp_path):
    tree = tmp_path / "tree"
    for c in ("cat", "dog"):
        for i in range(2):
            _png(tree / c / f"{i}.png")
    _png(tree / ".ipynb_checkpoints" / "x.png")
    _png(tree / "cat" / ".ipynb_checkpoints" / "y.png")
    (tree / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS AppleDouble file
    _png(tree / "__MACOSX" / "cat" / "._1.png")
    files, labels, classes = folder_files(tree)
    assert classes == ["cat", "dog"] and labels == [0, 0, 1, 1]
    assert all(".ipynb" not in str(f) and not f.name.startswith(".") for f in files)

    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png")
    (flat / ".git").mkdir()
    files, labels, classes = folder_files(flat)
    assert len(files) == 3 and labels == [-1] * 3 and classes == []

    mixed = tmp_path / "mixed"
    for i in range(3):
        _png(mixed / f"{i}.png")
    _png(mixed / "thumbs" / "t.png")
    with pytest.raises(MixqError, match=r"holds 3 image\(s\) beside 1 sub-folder\(s\) \(thumbs"):
        folder_files(mixed)


def test_folder_entries_that_are_not_images_or_not_folders(tmp_path, run_cli):
    (tmp_path / "c0" / "sub.png").mkdir(parents=True)  # a folder named like an image
    _png(tmp_path / "c0" / "a.png")
    files, _, _ = folder_files(tmp_path)
    assert [f.name for f in files] == ["a.png"]
    if os.path.exists("/dev/null") and sys.platform != "win32":
        assert "neither an npz file nor a folder" in one_line_error(run_cli("eval", *TINY, "--data", "/dev/null"))


def test_an_exif_rotated_photo_is_read_upright(tmp_path):
    """A phone stores a portrait photo's pixels sideways with an EXIF orientation tag; every viewer (and the
    model's user) sees it upright. Read as stored, a calibration or test image was lying on its side."""
    upright = np.zeros((32, 16, 3), dtype=np.uint8)  # portrait: top half white, bottom half black
    upright[:16] = 255
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # the sensor's landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (tmp_path / "c0").mkdir()
    Image.fromarray(stored).save(tmp_path / "c0" / "p.png", exif=exif)
    got = read_labelled(tmp_path, (32, 16)).images[0].numpy()
    assert np.array_equal(got, upright)


def test_a_calibration_cache_of_exif_rotated_photos_is_upright_and_keyed_apart(tmp_path, run_cli):
    """`calib --generator real` reads a folder as `eval` does; the recipe says the orientation was applied only
    where a chosen file carries one, so a cache made before (its images sideways) is never reused for it, and
    a folder without such files keeps its key."""
    import json

    from safetensors.torch import load_file

    upright = np.zeros((16, 16, 3), dtype=np.uint8)
    upright[:8] = 255  # top half white
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "imgs" / "c0"
    src.mkdir(parents=True)
    Image.fromarray(upright).save(src / "plain.png")
    args = ["calib", "--generator", "real", "--source", tmp_path / "imgs", "--num", "1", "--size", "16",
            "--cache-root", tmp_path / "root", "-q"]
    plain = run_cli(*args)
    assert plain.code == 0, plain.err
    assert "exif_orientation" not in json.loads((Path(plain.last_line) / "manifest.json").read_text())["recipe"][
        "generator"]
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(src / "plain.png", exif=exif)
    turned = run_cli(*args)
    assert turned.code == 0, turned.err
    d = Path(turned.last_line)
    assert d != Path(plain.last_line)
    assert json.loads((d / "manifest.json").read_text())["recipe"]["generator"]["exif_orientation"] == "applied"
    assert np.array_equal(load_file(str(d / "shard-00000.safetensors"))["images"][0].numpy(), upright)


def test_non_square_inputs_keep_their_aspect(tmp_path):
    img = torch.zeros(32, 64, 3, dtype=torch.uint8)
    img[:, :32, 1] = 255  # left half green, right half red
    img[:, 32:, 0] = 255
    out = resize_center(img, (32, 64))
    assert torch.equal(out, img)  # already the size: nothing cropped or stretched
    assert torch.equal(resize_center(img, 16), resize_center(img, (16, 16)))
    (tmp_path / "c").mkdir()
    Image.fromarray(img.numpy()).save(tmp_path / "c" / "x.png")
    assert torch.equal(read_labelled(tmp_path, (32, 64)).images[0], img)


def test_verify_reads_unlabelled_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "nolabels.npz", x=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(MixqError, match="has no labels"):
        read_labelled(tmp_path / "nolabels.npz", 8)
    d = read_labelled(tmp_path / "nolabels.npz", 8, labelled=False)
    assert len(d.images) == 6 and d.labels.tolist() == [-1] * 6
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png")
    assert read_labelled(flat, 8, labelled=False).labels.tolist() == [-1] * 3


def test_sweep_fingerprints_what_the_reader_reads_with_any_file_names(tmp_path):
    from mixq_onnx.sweep import data_identity

    real = tmp_path / "real"
    _png(real / "0.png")
    tree = tmp_path / "tree"
    _png(tree / "cat" / "0.png")
    (tree / "dog").symlink_to(real, target_is_directory=True)
    before = data_identity(tree)
    _png(real / "1.png", value=(1, 2, 3))  # a new image inside the symlinked class folder: the reader reads it
    assert data_identity(tree) != before
    name = os.fsdecode(b"caf\xe9")  # not UTF-8: a lone surrogate in Python
    _png(tree / "cat" / f"{name}.png")
    assert len(data_identity(tree)) == 64


def test_a_file_or_a_mistyped_path_where_a_cache_may_go_says_what_it_is(tmp_path, run_cli):
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4))
    base = ["quantize", "--model", "cifar_resnet20", "--random-weights", "--out", tmp_path / "q", "-q"]
    line = one_line_error(run_cli(*base, "--calib", tmp_path / "ok.npz"))
    assert "is a file, not a calibration cache" in line and "calib --generator real --source" in line
    line = one_line_error(run_cli("qat", *TINY, "--data", tmp_path / "nosuch.npz", "--target-bits", "4",
                                  "--out", tmp_path / "o"))
    assert "data not found" in line and "nosuch.npz" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "o").exists()
