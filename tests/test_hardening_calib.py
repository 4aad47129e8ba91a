"""Hardening of the calibration cache and data loading: `cache rm` only removes real caches under the
root, every reader checks shard hashes, `cache verify`/`ls`/`info` see hand edits, and bad calib input
gives one `error:` line with nothing left behind.

Every error case asserts the exit code, a single `error:` line on stderr (no traceback), and that no
file outside the command's own output was created, changed or removed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clean_error, one_line_error

from mixq_onnx.calib import CalibConfig, CalibrationSet, load_images, make_calibration_cache, remove, verify
from mixq_onnx.calib import cache as C
from mixq_onnx.calib import run as R
from mixq_onnx.errors import CorruptCacheError, MixqError

NOISE = ["calib", "--generator", "noise", "-q"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_cache(root: Path, num: int = 8, size: int = 16, shard: int = 4, seed: int = 0) -> Path:
    """A tiny noise cache under `root` (the library call, no CLI)."""
    cfg = CalibConfig(generator="noise", num=num, size=size, shard_size=shard, seed=seed)
    return Path(make_calibration_cache(cfg, root, device="cpu", progress=False, log=lambda m: None))


def flip_byte(f: Path, at: int = -5) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0x01
    f.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 1. cache rm
@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A cache root holding one real cache; the default root points there too (never ./calib_cache)."""
    r = tmp_path / "cache"
    make_cache(r)
    monkeypatch.setenv("MIXQ_CACHE_ROOT", str(r))
    return r


def test_rm_refuses_a_folder_outside_the_root_that_holds_a_manifest(tmp_path, root, run_cli):
    v = tmp_path / "v"
    (v / "src").mkdir(parents=True)
    (v / "src" / "keep.py").write_text("precious\n")
    (v / "manifest.json").write_text("{}")
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", v)
    assert "refusing to remove" in msg and "cache root" in msg
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", v, "--cache-root", root)
    assert (v / "src" / "keep.py").read_text() == "precious\n"
    # the same folder moved under the root is still refused: its name is not a recipe hash
    shutil.move(str(v), root / "v")
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", root / "v")
    assert "not the hash of its recipe" in msg


def test_rm_refuses_an_empty_reference(tmp_path, root, run_cli):
    assert len(list(root.iterdir())) == 1  # "" used to be a prefix of exactly this one cache
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", "")
    assert "empty cache reference" in msg
    msg = clean_error(run_cli, [tmp_path], "cache", "info", "", "--cache-root", root)
    assert "empty cache reference" in msg
    with pytest.raises(MixqError, match="empty cache reference"):
        C.resolve_cache("", root)
    with pytest.raises(MixqError, match="empty cache reference"):
        remove("", root)


def test_rm_refuses_a_symlink_out_of_the_root(tmp_path, root, run_cli):
    elsewhere = make_cache(tmp_path / "elsewhere", seed=7)
    link = root / elsewhere.name
    link.symlink_to(elsewhere, target_is_directory=True)
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", elsewhere.name[:8])
    assert "symbolic link" in msg
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", link)
    assert "symbolic link" in msg
    assert (elsewhere / C.MANIFEST).is_file() and link.is_symlink()
    # a symlinked root itself is fine: the cache really is directly under it
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    (own,) = [d for d in root.iterdir() if not d.is_symlink()]
    assert run_cli("cache", "rm", alias / own.name, "--cache-root", alias).code == 0 and not own.exists()


def test_rm_refuses_dotdot_paths(tmp_path, root, run_cli, monkeypatch):
    other = make_cache(tmp_path / "other", seed=3)
    dotted = root / ".." / "other" / other.name
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", dotted)
    assert "'..'" in msg
    (own,) = list(root.iterdir())
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", root / ".." / "cache" / own.name)  # even back inside
    assert "'..'" in msg
    with pytest.raises(MixqError, match=r"'\.\.'"):
        remove(dotted, root)
    # a root that itself climbs (../cache from a sibling folder) is the user's choice: its caches go by hash
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("MIXQ_CACHE_ROOT", "../cache")
    assert run_cli("cache", "rm", own.name[:6]).code == 0 and not own.exists()


def test_rm_refuses_a_cache_whose_name_is_not_its_hash(tmp_path, root, run_cli):
    (own,) = list(root.iterdir())
    renamed = root / "0123456789abcdef"
    shutil.copytree(own, renamed)
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", renamed)
    assert "not the hash of its recipe" in msg
    # a recipe edited after the fact no longer hashes to the folder name either
    rec = json.loads((own / C.RECIPE).read_text())
    rec["seed"] = 99
    (own / C.RECIPE).write_text(json.dumps(rec))
    msg = clean_error(run_cli, [tmp_path], "cache", "rm", own)
    assert "not the hash of its recipe" in msg


def test_rm_checks_every_ref_before_removing_any(tmp_path, root, run_cli):
    (own,) = list(root.iterdir())
    v = tmp_path / "v"
    v.mkdir()
    (v / "recipe.json").write_text("{}")
    clean_error(run_cli, [tmp_path], "cache", "rm", own.name, v)
    assert own.is_dir()


def test_rm_removes_complete_and_partial_caches_under_the_root(tmp_path, root, run_cli):
    (own,) = list(root.iterdir())
    partial = make_cache(root, seed=5)
    (partial / C.MANIFEST).unlink()  # as if killed before sealing: recipe.json and shards remain
    keep = make_cache(root, seed=6)
    assert C.info(partial).complete is False
    r = run_cli("cache", "rm", own.name[:6], partial)
    assert r.code == 0, r.err
    assert not own.exists() and not partial.exists() and keep.is_dir()
    assert sorted(p.name for p in root.iterdir()) == [keep.name]  # no tomb left behind
    remove(keep, root)
    assert not keep.exists()


# --------------------------------------------------------------------------- 2. lock message
def test_rm_of_a_locked_cache_gives_advice_rm_can_follow(tmp_path, root, run_cli):
    (own,) = list(root.iterdir())
    with C.cache_lock(own):
        msg = clean_error(run_cli, [tmp_path], "cache", "rm", own.name)
    assert "being written by another process" in msg and "cache rm" in msg and "--no-wait" not in msg
    assert own.is_dir()


# --------------------------------------------------------------------------- 3. shard hashes on read
def test_quantize_refuses_a_flipped_shard(tmp_path, run_cli):
    p = make_cache(tmp_path / "cache", num=8, size=32, shard=4)
    flip_byte(p / "shard-00001.safetensors")
    out = tmp_path / "q"
    msg = clean_error(run_cli, [tmp_path], "quantize", "--calib", p, "--model", "cifar_resnet20", "--random-weights",
                      "--method", "rtn", "--out", out)
    assert "shard-00001.safetensors" in msg and "sha256" in msg
    assert not out.exists()


def test_every_reader_checks_shard_hashes(tmp_path):
    from mixq_onnx.models import load_model

    p = make_cache(tmp_path / "cache", num=8, size=16, shard=4)
    images, records = load_images(p)
    assert images.shape == (8, 16, 16, 3) and [r["index"] for r in records] == list(range(8))
    flip_byte(p / "shard-00000.safetensors", at=40)  # inside the header's metadata this time
    with pytest.raises(CorruptCacheError, match="shard-00000.safetensors"):
        load_images(p)
    with pytest.raises(CorruptCacheError, match="shard-00000.safetensors.*sha256"):
        CalibrationSet(p, load_model("cifar_resnet20", random_init=True))
    (p / "shard-00001.safetensors").unlink()
    flip_byte(p / "shard-00000.safetensors", at=40)  # repaired; the next shard is now missing
    with pytest.raises(CorruptCacheError, match="missing shard shard-00001"):
        load_images(p)


def test_decode_shard_matches_safe_open(tmp_path):
    p = make_cache(tmp_path / "cache", num=6, size=8, shard=6)
    f = p / "shard-00000.safetensors"
    a, ra = C.read_shard(f)
    b, rb = C.decode_shard(f.read_bytes())
    assert torch.equal(a, b) and ra == rb


# --------------------------------------------------------------------------- 4. verify / ls / info
@pytest.fixture
def cache64(tmp_path) -> Path:
    return make_cache(tmp_path / "cache", num=64, size=8, shard=16)


def _verify_fails(run_cli, p: Path, needle: str) -> None:
    r = run_cli("cache", "verify", p)
    assert r.code == 1, (r.code, r.out, r.err)
    assert "Traceback" not in r.err and needle in r.err, r.err
    assert not verify(p).ok


def test_verify_catches_an_edited_index_in_the_manifest(cache64, run_cli):
    m = json.loads((cache64 / C.MANIFEST).read_text())
    m["images"][5]["index"] = 999
    (cache64 / C.MANIFEST).write_text(json.dumps(m))
    _verify_fails(run_cli, cache64, "image record 5 has index 999")
    _verify_fails(run_cli, cache64, "differ from the shards' records (first at image 5)")


def test_verify_catches_an_edited_index_in_a_shard(cache64, run_cli):
    """Shard records edited and the manifest's sha256 updated to match: only the cross-check sees it."""
    f = cache64 / "shard-00001.safetensors"
    images, records = C.read_shard(f)
    records[2]["index"] = 999
    sha = C.write_shard(f, images, records)
    m = json.loads((cache64 / C.MANIFEST).read_text())
    m["shards"][1]["sha256"] = sha
    (cache64 / C.MANIFEST).write_text(json.dumps(m))
    _verify_fails(run_cli, cache64, "differ from the shards' records (first at image 18)")
    # the same edit in both places: the index check still fails it
    m["images"][18]["index"] = 999
    (cache64 / C.MANIFEST).write_text(json.dumps(m))
    _verify_fails(run_cli, cache64, "image record 18 has index 999, expected 18")


def test_verify_catches_duplicate_and_reordered_indices(cache64, run_cli):
    m = json.loads((cache64 / C.MANIFEST).read_text())
    m["images"][3], m["images"][4] = m["images"][4], m["images"][3]
    (cache64 / C.MANIFEST).write_text(json.dumps(m))
    _verify_fails(run_cli, cache64, "image record 3 has index 4")


def test_verify_passes_an_untouched_cache(cache64, run_cli):
    r = run_cli("cache", "verify", cache64)
    assert r.code == 0 and "64 images" in r.out, r.err


def test_ls_shows_a_broken_cache_and_info_fails_in_one_line(tmp_path, cache64, run_cli):
    root = cache64.parent
    good = make_cache(root, num=4, size=8, shard=4, seed=1)
    (cache64 / C.MANIFEST).write_text('{"recipe": {')
    rows = {r["hash"]: r for r in json.loads(run_cli("cache", "ls", "--cache-root", root, "--json").last_line)}
    assert rows[good.name]["status"] == "complete"
    assert rows[cache64.name]["status"] == "broken" and "manifest.json" in rows[cache64.name]["reason"]
    text = run_cli("cache", "ls", "--cache-root", root)
    assert text.code == 0 and any(cache64.name in ln and "broken" in ln for ln in text.out.splitlines())
    msg = clean_error(run_cli, [tmp_path], "cache", "info", cache64.name, "--cache-root", root)
    assert "manifest.json" in msg
    msg = clean_error(run_cli, [tmp_path], "quantize", "--calib", cache64, "--model", "cifar_resnet20",
                      "--random-weights", "--method", "rtn", "--out", tmp_path / "q")
    assert "manifest.json" in msg
    _verify_fails(run_cli, cache64, "manifest.json")
    # valid JSON, wrong shape (and a shard path out of the cache): also broken, also one line
    recipe = json.loads((cache64 / C.RECIPE).read_text())
    bad = {"recipe": recipe, "hash": C.recipe_hash(recipe),
           "shards": [{"file": "../../etc/passwd", "sha256": "0", "count": 1, "start": 0}], "images": []}
    (cache64 / C.MANIFEST).write_text(json.dumps(bad))
    rows = {r["hash"]: r for r in json.loads(run_cli("cache", "ls", "--cache-root", root, "--json").last_line)}
    assert rows[cache64.name]["status"] == "broken" and "shard entry 0" in rows[cache64.name]["reason"]
    msg = clean_error(run_cli, [tmp_path], "cache", "info", cache64, "--cache-root", root)
    assert "shard entry 0" in msg
    with pytest.raises(CorruptCacheError, match="shard entry 0"):
        load_images(cache64)
    # its recipe.json still hashes to its name, so rm can clean it up
    (cache64 / C.MANIFEST).write_text('{"recipe": {')
    assert run_cli("cache", "rm", cache64, "--cache-root", root).code == 0 and not cache64.exists()


# --------------------------------------------------------------------------- 5. calib input
def _image_folder(d: Path, n_good: int = 7) -> Path:
    from PIL import Image

    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"img{i}.jpg", quality=90)
    data = (d / "img0.jpg").read_bytes()
    (d / "bad.jpg").write_bytes(data[: len(data) // 3])  # a truncated JPEG: the header parses, decoding fails
    return d


def test_calib_folder_with_a_corrupt_jpeg_fails_naming_it(tmp_path, run_cli):
    src = _image_folder(tmp_path / "imgs")
    root = tmp_path / "cache"
    msg = clean_error(run_cli, [tmp_path], *NOISE[:1], "--generator", "real", "--source", src, "--num", "8",
                      "--size", "16", "--cache-root", root, "-q")
    assert "bad.jpg" in msg and "--skip-bad-images" in msg
    assert not root.exists()


def test_calib_skip_bad_images_warns_and_records_the_skip(tmp_path, run_cli):
    src = _image_folder(tmp_path / "imgs")
    root = tmp_path / "cache"
    args = ["calib", "--generator", "real", "--source", src, "--num", "7", "--size", "16", "--cache-root", root, "-q"]
    r = run_cli(*args, "--skip-bad-images")
    assert r.code == 0, r.err
    warns = [ln for ln in r.err.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "bad.jpg" in warns[0]
    p = Path(r.last_line)
    m = json.loads((p / C.MANIFEST).read_text())
    assert m["recipe"]["generator"]["skipped"] == ["bad.jpg"]
    assert verify(p).ok and len(m["images"]) == 7
    again = run_cli(*args, "--skip-bad-images")
    assert again.code == 0 and again.last_line == str(p)  # same folder, same skip list, same cache
    # all 8 files needed: without the flag an error, with it too few readable images
    msg = clean_error(run_cli, [tmp_path], *args[:6], "8", *args[7:])
    assert "bad.jpg" in msg and "--skip-bad-images" in msg
    msg = clean_error(run_cli, [tmp_path], *args[:6], "8", *args[7:], "--skip-bad-images")
    assert "only 7 readable images (1 skipped, first bad.jpg)" in msg
    msg = clean_error(run_cli, [tmp_path], *NOISE, "--num", "4", "--skip-bad-images", "--cache-root", root)
    assert "--generator real" in msg


def test_a_clean_folder_keeps_its_cache_key_with_skip_bad_images(tmp_path, run_cli):
    src = tmp_path / "imgs"
    _image_folder(src)
    (src / "bad.jpg").unlink()
    base = ["calib", "--generator", "real", "--source", src, "--num", "5", "--size", "16", "-q"]
    a = run_cli(*base, "--cache-root", tmp_path / "a")
    b = run_cli(*base, "--cache-root", tmp_path / "b", "--skip-bad-images")
    assert a.code == b.code == 0 and Path(a.last_line).name == Path(b.last_line).name


@pytest.mark.parametrize("args,needle", [
    (["--num", "0"], "--num must be at least 1"),
    (["--num", "-3"], "--num must be at least 1"),
    (["--num", "100001"], "at most 100000"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--k", "1"], "--k must be at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--size", "100000"], "--size must be at least 8 and at most 1024"),
    (["--size", "4"], "--size must be at least 8"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--iters", "-1"], "--iters must be at least 0"),
    (["--num", "abc"], "'abc' is not a valid integer"),
    (["--filter", "energy", "--keep", "0"], "--keep must be at least 1"),
    (["--filter", "energy", "--num", "4", "--keep", "5"], "1 <= N <= --num (4)"),
])
def test_calib_rejects_bad_numbers(tmp_path, run_cli, args, needle):
    root = tmp_path / "cache"
    msg = clean_error(run_cli, [tmp_path], *NOISE, "--size", "16", *args, "--cache-root", root)
    assert needle in msg
    assert not root.exists()


def test_cli_limits_are_the_library_limits():
    from mixq_onnx.cli import calib

    opts = {p.name: p.type for p in calib.params}
    assert (opts["num"].min, opts["num"].max) == (1, R.MAX_NUM)
    assert (opts["size"].min, opts["size"].max) == (R.MIN_SIZE, R.MAX_SIZE)
    assert opts["keep"].max == R.MAX_NUM


def test_library_checks_size_num_and_memory(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    for cfg, needle in [(CalibConfig(generator="noise", num=4, size=100_000), "at most 1024"),
                        (CalibConfig(generator="noise", num=R.MAX_NUM + 1, size=8), "at most 100000")]:
        with pytest.raises(MixqError, match=needle):
            make_calibration_cache(cfg, root, device="cpu", progress=False)
    monkeypatch.setattr(R, "available_memory", lambda: 10 * 2**20)  # 10 MiB free
    with pytest.raises(MixqError, match="lower --shard-size"):
        make_calibration_cache(CalibConfig(generator="noise", num=64, size=512, shard_size=64), root, device="cpu",
                               progress=False)
    from mixq_onnx.models import load_model

    with pytest.raises(MixqError, match="lower --num"):
        make_calibration_cache(CalibConfig(generator="noise", num=64, size=256, shard_size=1, filter="energy",
                                           keep=8), root, model=load_model("cifar_resnet20", random_init=True),
                               device="cpu", progress=False)
    assert not root.exists()
    monkeypatch.undo()
    assert R.available_memory() is None or R.available_memory() > 0


def test_calib_memory_check_runs_before_the_cache_dir(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(R, "available_memory", lambda: 2**20)
    root = tmp_path / "cache"
    msg = clean_error(run_cli, [tmp_path], *NOISE, "--size", "1024", "--num", "8", "--cache-root", root)
    assert "GiB of memory" in msg and not root.exists()


@pytest.mark.parametrize("text,needle", [
    ("cat\ndog\n# comment\n\ncat\n", "lists 'cat' twice (lines 1 and 5)"),
    ("cat\n  Dog \ndog\n", "twice (lines 2 and 3)"),
    ("", "lists no classes"),
    ("# only a comment\n\n   \n", "lists no classes"),
])
def test_class_file_duplicates_and_empty(tmp_path, run_cli, text, needle):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    root = tmp_path / "cache"
    msg = clean_error(run_cli, [tmp_path], "calib", "--generator", "diffusion", "--classes", f, "--cache-root", root,
                      "-q")
    assert needle in msg and str(f) in msg


def _npz_cases(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cases = {"notzip": d / "notzip.npz", "npy": d / "single.npz", "count": d / "count.npz", "empty": d / "empty.npz",
             "2d": d / "labels2d.npz", "float": d / "floatlabels.npz"}
    cases["notzip"].write_bytes(b"these are not the bytes of a zip archive\n" * 4)
    with open(cases["npy"], "wb") as f:
        np.save(f, x)
    np.savez(cases["count"], x=x, y=np.arange(5))
    np.savez(cases["empty"], x=x[:0], y=np.arange(0))
    np.savez(cases["2d"], x=x, y=np.zeros((6, 1), dtype=np.int64))
    np.savez(cases["float"], x=x, y=np.zeros(6, dtype=np.float32))
    return cases


NPZ_NEEDLES = {"notzip": "not an npz (zip) archive", "npy": "is a single .npy array", "count": "5 labels 'y' for 6",
               "empty": "holds no images", "2d": "1-D integer array", "float": "1-D integer array"}


@pytest.mark.parametrize("case", sorted(NPZ_NEEDLES))
def test_load_labelled_rejects_bad_npz(tmp_path, case):
    from mixq_onnx.data import load_labelled

    path = _npz_cases(tmp_path)[case]
    with pytest.raises(MixqError, match=NPZ_NEEDLES[case].replace("(", r"\(").replace(")", r"\)")) as e:
        load_labelled(path, 32)
    assert "\n" not in str(e.value) and "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("case", ["notzip", "count", "empty"])
def test_eval_and_calib_on_bad_npz_fail_in_one_line(tmp_path, run_cli, case):
    (tmp_path / "data").mkdir()
    path = _npz_cases(tmp_path / "data")[case]
    msg = clean_error(run_cli, [tmp_path], "eval", "--model", "cifar_resnet20", "--random-weights", "--data", path)
    assert NPZ_NEEDLES[case] in msg
    root = tmp_path / "cache"
    msg = clean_error(run_cli, [tmp_path], "calib", "--generator", "real", "--source", path, "--num", "1",
                      "--cache-root", root, "-q")
    assert NPZ_NEEDLES[case] in msg
    assert not root.exists()


def test_load_labelled_accepts_a_good_npz_and_a_folder(tmp_path):
    from PIL import Image

    from mixq_onnx.data import load_labelled

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "ok.npz", x=rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), y=np.arange(5, dtype=np.int32))
    x, y = load_labelled(tmp_path / "ok.npz", 8, limit=3)
    assert x.shape == (3, 8, 8, 3) and y.dtype == torch.int64  # a seeded sample of 3 classes, in file order
    assert len(set(y.tolist())) == 3 and y.tolist() == sorted(y.tolist())
    for c in ("a", "b"):
        os.makedirs(tmp_path / "f" / c)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "f" / c / "0.png")
    x, y = load_labelled(tmp_path / "f", 8)
    assert x.shape == (2, 8, 8, 3) and y.tolist() == [0, 1]
    (tmp_path / "f" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(MixqError, match="1.png"):
        load_labelled(tmp_path / "f", 8)


def test_skip_bad_images_is_for_real_images_only(tmp_path, run_cli):

    root = tmp_path / "root"
    msg = one_line_error(run_cli("calib", "--generator", "noise", "--num", "4", "--size", "16", "--skip-bad-images",
                                 "--cache-root", root))
    assert "--skip-bad-images only applies to --generator real" in msg and not root.exists()


# --------------------------------------------------------------------------- readers hold what verify holds
def test_a_cache_in_another_recipes_folder_is_refused_everywhere(tmp_path, run_cli):
    """A cache copied under another recipe's hash was reused by calib, passed verify, and quantize recorded the
    folder's name as its recipe hash (review, 2026-11-30)."""
    root = tmp_path / "root"
    a = make_cache(root, num=8, size=8, shard=4)
    b = make_cache(root, num=8, size=8, shard=4, seed=1)
    b_key = b.name
    shutil.rmtree(b)
    shutil.copytree(a, b)  # a's cache sitting in b's place
    line = one_line_error(run_cli(*NOISE, "--num", "8", "--size", "8", "--shard-size", "4", "--seed", "1",
                                  "--cache-root", root))
    assert f"holds the cache of another recipe ({a.name})" in line, line
    _verify_fails(run_cli, b, f"the folder is named {b_key} but holds the cache of recipe {a.name}")
    with pytest.raises(CorruptCacheError, match="copied or renamed"):
        load_images(b)
    shutil.rmtree(b)
    mine = tmp_path / "mycalib"  # any other name is the user's choice: it loads, under its real hash
    shutil.copytree(a, mine)
    from mixq_onnx.models.preprocessing import Preprocessing

    assert CalibrationSet(mine, Preprocessing(input_size=(3, 8, 8))).provenance()["hash"] == a.name


def test_readers_refuse_what_verify_fails(cache64):
    """A manifest truncated by a whole shard, an edited record and a shard of other-sized images (its sha256
    updated) loaded, and quantize recorded 48 of 64 images (or crashed on torch.cat)."""
    man = cache64 / C.MANIFEST
    orig = man.read_text()
    m = json.loads(orig)
    m["shards"], m["images"] = m["shards"][:-1], m["images"][:-16]
    man.write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="holds 48 images .* asks for 64"):
        load_images(cache64)
    m = json.loads(orig)
    m["images"][3]["prompt"] = "edited"
    man.write_text(json.dumps(m))
    with pytest.raises(CorruptCacheError, match="does not match its manifest entry"):
        load_images(cache64)
    man.write_text(orig)
    f = cache64 / "shard-00001.safetensors"
    images, records = C.read_shard(f)
    sha = C.write_shard(f, images[:, :4, :4].contiguous(), records)
    m = json.loads(orig)
    m["shards"][1]["sha256"] = sha
    man.write_text(json.dumps(m))
    assert "shard shard-00001.safetensors holds 4x4 images, the recipe 8x8" in " ".join(verify(cache64).problems)
    with pytest.raises(CorruptCacheError, match="holds 4x4 images, its recipe 8x8"):
        load_images(cache64)


def test_an_edited_image_of_the_same_size_is_another_real_cache(tmp_path):
    """A folder source was keyed by file names and sizes: an image replaced by another of the same byte size
    reused the old cache (review, 2026-11-30). BMP files make equal sizes certain."""
    from PIL import Image

    rng = np.random.default_rng(0)
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.bmp")
    cfg = CalibConfig(generator="real", num=4, size=16, options={"source": str(src)})
    a = Path(make_calibration_cache(cfg, tmp_path / "root", progress=False, log=lambda m: None))
    size = (src / "1.bmp").stat().st_size
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(src / "1.bmp")
    assert (src / "1.bmp").stat().st_size == size
    b = Path(make_calibration_cache(cfg, tmp_path / "root", progress=False, log=lambda m: None))
    assert a != b
    assert not torch.equal(load_images(a)[0], load_images(b)[0])
