"""Cache mechanics with the cheap generators (noise, real): keys, determinism, resume, verify, locks."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_NPZ, need_shared

from mixq_onnx.calib import CalibConfig, CalibrationSet, load_images, make_calibration_cache, verify
from mixq_onnx.calib import cache as C
from mixq_onnx.models import load_model

NOISE = ["calib", "--generator", "noise", "--size", "32", "-q"]


def test_same_command_same_bytes_and_resume_noop(tmp_path, run_cli):
    a = run_cli(*NOISE, "--num", "20", "--shard-size", "8", "--cache-root", tmp_path / "a")
    b = run_cli(*NOISE, "--num", "20", "--shard-size", "8", "--cache-root", tmp_path / "b")
    assert a.code == b.code == 0
    pa, pb = Path(a.last_line), Path(b.last_line)
    assert pa.name == pb.name  # recipe hash is location-independent
    files = sorted(f.name for f in pa.glob("shard-*"))
    assert files == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for f in files:
        assert (pa / f).read_bytes() == (pb / f).read_bytes()
    again = run_cli(*NOISE, "--num", "20", "--shard-size", "8", "--cache-root", tmp_path / "a")
    assert again.code == 0 and again.last_line == str(pa) and "already complete" in again.err
    other = run_cli(*NOISE, "--num", "20", "--seed", "1", "--shard-size", "8", "--cache-root", tmp_path / "a")
    assert Path(other.last_line).name != pa.name


def test_verify_detects_flipped_byte_and_missing_shard(tmp_path, run_cli):
    p = Path(run_cli(*NOISE, "--num", "12", "--shard-size", "4", "--cache-root", tmp_path).last_line)
    ok = run_cli("cache", "verify", p)
    assert ok.code == 0 and "12 images" in ok.out
    f = p / "shard-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    bad = run_cli("cache", "verify", p)
    assert bad.code == 1 and "shard-00001.safetensors" in bad.err
    f.unlink()
    gone = run_cli("cache", "verify", p)
    assert gone.code == 1 and "missing shard shard-00001" in gone.err


def test_sigkill_then_resume(tmp_path):
    """Kill a running calib mid-way; the re-run finishes with exactly --num unique images."""
    root = tmp_path / "cache"
    cmd = [sys.executable, "-m", "mixq_onnx.cli", *NOISE[:-1], "--size", "256", "--num", "600", "--shard-size", "16",
           "--cache-root", str(root), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(root.glob("*/shard-0000[1-9].safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (d,) = list(root.iterdir())
    assert not (d / C.MANIFEST).exists(), "killed too late: the run had already finished"
    done_before = len(list(d.glob("shard-*.safetensors")))
    assert 0 < done_before < 38
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(d)
    res = verify(d)
    assert res.ok and res.num_images == 600
    images, records = load_images(d)
    assert sorted(r["index"] for r in records) == list(range(600))
    assert not list(d.glob(".*.tmp"))


def test_lock_no_wait(tmp_path, run_cli):
    args = [*NOISE, "--num", "4", "--cache-root", tmp_path]
    cfg = CalibConfig(generator="noise", num=4, size=32)
    key = None
    # find the key without generating: run once to a scratch root
    key = Path(make_calibration_cache(cfg, tmp_path / "scratch", progress=False)).name
    d = tmp_path / key
    with C.cache_lock(d):
        r = run_cli(*args, "--no-wait")
    assert r.code == 2 and "being written by another process" in r.err
    assert run_cli(*args).code == 0


def test_cache_ls_info_rm(tmp_path, run_cli):
    p = Path(run_cli(*NOISE, "--num", "4", "--cache-root", tmp_path).last_line)
    ls = run_cli("cache", "ls", "--cache-root", tmp_path, "--json")
    rows = json.loads(ls.last_line)
    assert rows[0]["hash"] == p.name and rows[0]["status"] == "complete" and rows[0]["images"] == 4
    info = run_cli("cache", "info", p.name[:6], "--cache-root", tmp_path, "--json")
    assert json.loads(info.last_line)["recipe"]["generator"]["name"] == "noise"
    assert run_cli("cache", "rm", p, "--cache-root", tmp_path).code == 0 and not p.exists()
    r = run_cli("cache", "info", "deadbeef", "--cache-root", tmp_path)
    assert r.code == 2 and r.err.startswith("error: no calibration cache")


@need_shared(TRAIN_NPZ)
def test_real_import_1024(tmp_path, run_cli):
    r = run_cli("calib", "--generator", "real", "--source", TRAIN_NPZ, "--num", "1024", "--cache-root", tmp_path, "-q")
    assert r.code == 0
    p = Path(r.last_line)
    assert verify(p).ok
    images, records = load_images(p)
    assert images.shape == (1024, 32, 32, 3) and images.dtype == torch.uint8
    assert len({r["source_index"] for r in records}) == 1024
    labels = torch.tensor([r["label"] for r in records])
    assert labels.bincount(minlength=10).min() > 60  # a random subset covers every class
    ds = CalibrationSet(p, load_model("cifar_resnet20", random_init=True))
    x = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    ds224 = CalibrationSet(p, load_model("resnet18", random_init=True))
    assert ds224[3].shape == (3, 224, 224)


def _reforge(src: Path, root: Path, edit) -> Path:
    """A received cache: `src` with its manifest's recipe edited, then re-hashed and named consistently (every
    hash matches; only the types are wrong)."""
    import shutil

    m = json.loads((src / "manifest.json").read_text())
    edit(m)
    m["hash"] = C.recipe_hash(m["recipe"])
    dst = root / m["hash"]
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "recipe.json").write_text(json.dumps(m["recipe"]))
    return dst


def test_a_consistently_hashed_but_mistyped_cache_is_refused_not_a_traceback(tmp_path, run_cli):
    """`cache verify` and `load_images` turned a recipe count of "x" or 1e400, or shard records that are no
    list, into a ValueError/OverflowError/TypeError traceback."""
    import hashlib

    from safetensors.torch import load, save

    p = Path(run_cli(*NOISE, "--num", "8", "--shard-size", "4", "--cache-root", tmp_path / "a").last_line)
    for k, edit in enumerate([lambda m: m["recipe"].__setitem__("keep", "x"),
                              lambda m: m["recipe"].__setitem__("num", 1e400),
                              lambda m: m["recipe"].__setitem__("num", True)]):
        bad = _reforge(p, tmp_path / f"r{k}", edit)
        r = run_cli("cache", "verify", bad)
        assert r.code == 1 and "FAIL" in r.err and "Traceback" not in r.err and "'num'" in r.err, r.err
        with pytest.raises(C.CorruptCacheError, match="'num'"):
            load_images(bad)
    forged = tmp_path / "s" / p.name
    import shutil

    shutil.copytree(p, forged)
    shard = forged / "shard-00000.safetensors"
    data = save({"images": load(shard.read_bytes())["images"]}, metadata={"records": "5"})
    shard.write_bytes(data)
    m = json.loads((forged / "manifest.json").read_text())
    m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (forged / "manifest.json").write_text(json.dumps(m))
    r = run_cli("cache", "verify", forged)
    assert r.code == 1 and "records are not a list" in r.err and "Traceback" not in r.err, r.err
    with pytest.raises(C.CorruptCacheError, match="records are not a list"):
        load_images(forged)
