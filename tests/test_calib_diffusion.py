"""`mixq-onnx calib --generator diffusion` end to end through real diffusers code on a tiny random pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixq_onnx.calib import CalibConfig, load_images, make_calibration_cache, verify
from mixq_onnx.calib.classes import CIFAR10
from mixq_onnx.errors import MixqError

COMMON = ["--generator", "diffusion", "--classes", "cifar10", "--size", "32", "--steps", "2", "--batch-size", "2",
          "--shard-size", "4", "-q"]


def _classes_named(prompt: str) -> list[str]:
    words = prompt.replace(",", " ").split()
    return [c for c in CIFAR10 if c in words]


def _manifest(p: Path) -> dict:
    return json.loads((p / "manifest.json").read_text())


@pytest.mark.parametrize("strategy,k", [("mixup", 2), ("single", 1)])
def test_prompts_in_manifest(tmp_path, run_cli, tiny_pipeline, strategy, k):
    r = run_cli("calib", *COMMON, "--pipeline", tiny_pipeline, "--prompts", strategy, "--num", "16",
                "--cache-root", tmp_path)
    assert r.code == 0, r.err
    p = Path(r.last_line)
    m = _manifest(p)
    assert len(m["images"]) == 16 and verify(p).ok
    for rec in m["images"]:
        named = _classes_named(rec["prompt"])
        assert len(named) == k and len(set(named)) == k, rec["prompt"]
        assert sorted(CIFAR10.index(c) for c in named) == sorted(rec["classes"])
    images, _ = load_images(p)
    assert images.shape == (16, 32, 32, 3)
    assert m["recipe"]["generator"]["name"] == "diffusion"
    assert m["recipe"]["prompts"]["strategy"] == strategy


def test_mixup_embed_records_weights(tmp_path, run_cli, tiny_pipeline):
    r = run_cli("calib", *COMMON, "--pipeline", tiny_pipeline, "--prompts", "mixup-embed", "--num", "4",
                "--cache-root", tmp_path)
    assert r.code == 0, r.err
    for rec in _manifest(Path(r.last_line))["images"]:
        assert len(rec["classes"]) == 2 and abs(sum(rec["weights"]) - 1) < 1e-5 and len(rec["sub_prompts"]) == 2


def _shards(p: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(p.glob("shard-*.safetensors"))}


def test_deterministic_and_torchrun_matches_single_process(tmp_path, tiny_pipeline):
    """Same command twice in fresh dirs -> identical shards; 2-process torchrun (gloo) -> the same shards.

    CPU float results depend on the intra-op thread count, and torchrun pins OMP_NUM_THREADS=1, so
    every run here uses one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    args = ["calib", *COMMON, "--pipeline", str(tiny_pipeline), "--num", "12"]
    outs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "mixq_onnx.cli", *args, "--cache-root", str(tmp_path / name)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        outs.append(Path(res.stdout.strip().splitlines()[-1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python", "--", "mixq-onnx",
           *args, "--cache-root", str(tmp_path / "dist")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    dist = Path(res.stdout.strip().splitlines()[-1])
    a, b, d = _shards(outs[0]), _shards(outs[1]), _shards(dist)
    assert len(a) == 3 and a == b == d
    assert outs[0].name == dist.name
    assert verify(dist).ok and _manifest(dist)["images"] == _manifest(outs[0])["images"]


def test_offline_hub_id_is_one_line_error(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "cache"
    r = run_cli("calib", "--generator", "diffusion", "--pipeline", "nobody/no-such-pipeline", "--classes", "cifar10",
                "--num", "2", "--cache-root", root)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "--pipeline path/to" in r.err and not root.exists()


def test_library_api_matches_cli(tmp_path, run_cli, tiny_pipeline):
    """The same recipe through `make_calibration_cache` and through `mixq-onnx calib`: the same cache key,
    the same images byte for byte, the same manifest records."""
    cfg = CalibConfig(generator="diffusion", num=2, size=32, classes="cifar10", shard_size=2,
                      options={"pipeline": str(tiny_pipeline), "steps": 2, "batch_size": 2})
    p = make_calibration_cache(cfg, tmp_path / "lib", progress=False)
    assert verify(p).ok
    r = run_cli("calib", "--generator", "diffusion", "--num", "2", "--size", "32", "--classes", "cifar10",
                "--shard-size", "2", "--pipeline", tiny_pipeline, "--steps", "2", "--batch-size", "2",
                "--cache-root", tmp_path / "cli", "-q")
    assert r.code == 0, r.err
    c = Path(r.last_line)
    assert verify(c).ok
    assert c.name == p.name  # the recipe hash
    assert _shards(c) == _shards(p) and len(_shards(p)) == 1
    assert _manifest(c)["recipe"] == _manifest(p)["recipe"] and _manifest(c)["images"] == _manifest(p)["images"]
    with pytest.raises(MixqError):
        make_calibration_cache(CalibConfig(generator="diffusion", num=2, classes="cifar10",
                                           options={"pipeline": str(tmp_path / "nope")}), tmp_path / "x")
