"""Files a user received from someone else: links, devices and pipes where data should be, external data
outside the graph's folder, hub specs, JSON nested past Python's recursion limit, absurd shapes. Each is a
one-line `error:` (exit 2) or, where the tool can only follow a link, nothing outside the command's own
output changes. Found by an audit that ran each case for real (strace showed the reads)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import clean_error, random_r20_rtn, snapshot

from mixq_onnx.calib import cache as C
from mixq_onnx.onnx import export_qdq
from mixq_onnx.quant import save_quantized
from mixq_onnx.trt.builder import meta_path_for


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recv")
    _, q = random_r20_rtn(8)
    out = {"q": save_quantized(q, d / "q"), "onnx": export_qdq(q, d / "m.onnx")}
    rng = np.random.default_rng(0)
    out["npz"] = d / "data.npz"
    np.savez(out["npz"], x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 10)
    return out


def _noise_cache(root: Path, run_cli) -> Path:
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--cache-root", root, "-q")
    assert r.code == 0, r.err
    return Path(r.last_line)


def _nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- caches
def test_a_lock_link_in_a_received_cache_is_never_written_through(tmp_path, run_cli):
    """The lock file is truncated and rewritten with the pid: through a link it overwrote any file."""
    root = tmp_path / "root"
    d = _noise_cache(root, run_cli)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (d / C.LOCK).unlink()
    (d / C.LOCK).symlink_to(victim)
    (d / "x.stats.json").write_text("{}")  # a leftover: calib's re-run takes the lock to sweep it
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--cache-root", root, "-q")
    assert r.code == 0 and r.last_line == str(d)  # complete and usable: the sweep of leftovers is skipped
    assert (d / "x.stats.json").exists() and victim.read_text() == "keep me"
    msg = clean_error(run_cli, [victim], "cache", "rm", d, "--cache-root", root)
    assert "symbolic link" in msg and ".lock" in msg
    assert victim.read_text() == "keep me"


def test_calib_never_writes_into_a_cache_folder_that_links_elsewhere(tmp_path, run_cli):
    root = tmp_path / "root"
    d = _noise_cache(root, run_cli)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(d, elsewhere)
    (elsewhere / "shard-00000.safetensors").unlink()  # damaged: a re-run would regenerate it there
    (elsewhere / "experiment.stats.json").write_text("the user's")
    d.symlink_to(elsewhere, target_is_directory=True)
    msg = clean_error(run_cli, [elsewhere], "calib", "--generator", "noise", "--num", "4", "--cache-root", root, "-q")
    assert "symbolic link" in msg
    assert (elsewhere / "experiment.stats.json").read_text() == "the user's"


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_a_device_or_a_pipe_in_place_of_data_is_refused_at_once(world, tmp_path, run_cli, kind):
    """/dev/zero read to the end grew to 8 GB before a MemoryError; a FIFO made eval hang."""
    q = tmp_path / "q"
    shutil.copytree(world["q"], q)
    root = tmp_path / "root"
    d = _noise_cache(root, run_cli)
    for f in (q / "weights.safetensors", d / "shard-00000.safetensors"):
        f.unlink()
        if kind == "dev-zero":
            f.symlink_to("/dev/zero")
        else:
            os.mkfifo(f)
    done: dict[str, str] = {}

    def go() -> None:
        done["eval"] = clean_error(run_cli, [q], "eval", "--quantized", q, "--data", world["npz"])
        done["quantize"] = clean_error(run_cli, [root], "quantize", "--model", "cifar_resnet20", "--random-weights",
                                       "--calib", d, "--out", tmp_path / "out", "--wbits", "8", "--abits", "8",
                                       "--method", "rtn")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "a reader hung on a pipe"
    assert "not a regular file" in done["eval"] and "not a regular file" in done["quantize"], done
    r = run_cli("cache", "verify", d)
    assert r.code == 1 and "not a regular file" in r.out + r.err


def test_a_manifest_without_its_recipe_hash_is_refused(tmp_path, run_cli):
    d = _noise_cache(tmp_path / "root", run_cli)
    m = json.loads((d / C.MANIFEST).read_text())
    m.pop("hash")
    m["recipe"]["size"] = 10**30  # an edited recipe that the missing hash would have let through
    (d / C.MANIFEST).write_text(json.dumps(m))
    msg = clean_error(run_cli, [d], "cache", "info", d)
    assert "no recipe 'hash'" in msg


def test_a_refused_pipeline_leaves_no_half_made_cache(tmp_path, run_cli):
    """A pipeline folder naming its own code is refused when it is loaded, after the cache folder was made:
    it used to stay behind (recipe.json and .lock), listed as an incomplete cache."""
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "_diffusers_version": "0.30.0", "unet": ["evilmod", "Evil"]}))
    (pipe / "evilmod.py").write_text("import pathlib\npathlib.Path('MARKER').write_text('ran')\nclass Evil: pass\n")
    root = tmp_path / "root"
    msg = clean_error(run_cli, [pipe], "calib", "--generator", "diffusion", "--pipeline", pipe, "--classes",
                      "cifar10", "--num", "2", "--size", "32", "--cache-root", root, "-q")
    assert "cannot load diffusion pipeline" in msg
    assert not root.exists() and not Path("MARKER").exists() and not (pipe / "MARKER").exists()


# ----------------------------------------------------------------------------- graphs and plans
def _external(src: Path, folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src))
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=256)  # the weights out, small constants inline (as onnx does)
    return folder / "m.onnx"


def test_external_data_is_read_from_the_graphs_folder_only(world, tmp_path, run_cli, monkeypatch):
    """verify resolved external data against the current folder (a graph run from elsewhere failed with a
    traceback, or read a file of the current folder); build let TensorRT-RTX read a linked file outside."""
    good = _external(world["onnx"], tmp_path / "good")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run_cli("verify", good, "--quantized", world["q"], "--data", world["npz"], "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.last_line)
    assert rep["max_abs_diff"] == 0.0 and rep["top1_agreement"] == 100.0
    bad = _external(world["onnx"], tmp_path / "linked")
    secret = tmp_path / "secret.bin"
    shutil.move(bad.parent / "w.bin", secret)
    (bad.parent / "w.bin").symlink_to(secret)
    watch = [tmp_path / "linked", secret]
    msg = clean_error(run_cli, watch, "build", bad, "--out", tmp_path / "o.plan", "--backend", "tensorrt-rtx")
    assert "external data" in msg and "symbolic link" in msg and not (tmp_path / "o.plan").exists()
    msg = clean_error(run_cli, watch, "verify", bad, "--quantized", world["q"], "--data", world["npz"])
    assert "symbolic link" in msg


def test_build_checks_external_data_without_reading_it(world, tmp_path, run_cli):
    """build handed the graph to TensorRT's parser only after onnx's loader had read every weight into memory to
    check its location (2.5 GB for a float ViT-H, read again by the hash and the parser): the checks now look at
    the files, and a received graph's linked folder, pipe or short data file is still refused before the parser."""
    from mixq_onnx.onnx.graph import checked_external_data

    folder = tmp_path / "nested"
    good = _external(world["onnx"], folder)
    assert checked_external_data(good) == ["w.bin"] and checked_external_data(world["onnx"]) == []
    # the data in a linked subfolder: the link is the path's second part, not its last
    (tmp_path / "outside").mkdir()
    shutil.move(folder / "w.bin", tmp_path / "outside" / "w.bin")
    m = onnx.load(str(good), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "sub/w.bin"
    onnx.save(m, str(good))
    (folder / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    watch = [folder, tmp_path / "outside"]
    msg = clean_error(run_cli, watch, "build", good, "--out", tmp_path / "o.plan", "--backend", "tensorrt-rtx")
    assert "sub is a symbolic link" in msg and not (tmp_path / "o.plan").exists()
    # a pipe where the data should be: refused at once (a reader would wait on it for ever)
    (folder / "sub").unlink()
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "w.bin")
    msg = clean_error(run_cli, watch, "build", good, "--out", tmp_path / "o.plan", "--backend", "tensorrt-rtx")
    assert "sub/w.bin is not a regular file" in msg
    # a data file cut short: the tensor past its end is named
    (folder / "sub" / "w.bin").unlink()
    data = (tmp_path / "outside" / "w.bin").read_bytes()
    (folder / "sub" / "w.bin").write_bytes(data[: len(data) // 2])
    msg = clean_error(run_cli, watch, "build", good, "--out", tmp_path / "o.plan", "--backend", "tensorrt-rtx")
    assert "lies beyond the end of sub/w.bin" in msg and "truncated" in msg
    (folder / "sub" / "w.bin").write_bytes(data)  # whole again: the checks pass (build itself needs tensorrt_rtx)
    assert checked_external_data(good) == ["sub/w.bin"]


@pytest.fixture(scope="module")
def plan(world, tmp_path_factory) -> Path:
    pytest.importorskip("tensorrt_rtx")
    from mixq_onnx.trt.builder import BuildConfig, build_engine

    p = tmp_path_factory.mktemp("plan") / "m.plan"
    build_engine(world["onnx"], p, BuildConfig(batch=(1, 2, 4)))
    return p


def test_inspect_reads_only_the_graph_the_plan_was_built_from(world, plan, tmp_path, run_cli):
    """The graph comes from PLAN.json's onnx.path, which a received file can point anywhere: it was parsed
    before its sha256 was compared, and a mismatch was only a warning (with --onnx, until 2026-12-01)."""
    p = tmp_path / "p"
    p.mkdir()
    shutil.copy(plan, p / "m.plan")
    meta = json.loads(meta_path_for(plan).read_text())
    other = tmp_path / "other.onnx"
    shutil.copy(world["onnx"], other)
    m = onnx.load(str(other))
    m.doc_string = "changed"
    onnx.save(m, str(other))
    meta["onnx"]["path"] = str(other)
    meta_path_for(p / "m.plan").write_text(json.dumps(meta))
    msg = clean_error(run_cli, [p, other], "inspect", p / "m.plan")
    assert "is not the graph the plan was built from" in msg and "--onnx" in msg
    # the user's own choice is held to the same hash: a report mapped onto another graph would be wrong
    msg = clean_error(run_cli, [p, other], "inspect", p / "m.plan", "--onnx", other)
    assert msg.startswith(f"error: --onnx {other} is not the graph the plan was built from")
    moved = tmp_path / "moved.onnx"  # the graph itself, moved: --onnx finds it
    shutil.copy(world["onnx"], moved)
    r = run_cli("inspect", p / "m.plan", "--onnx", moved)
    assert r.code == 0 and "warning" not in r.err
    meta["onnx"]["path"] = str(world["onnx"])
    meta_path_for(p / "m.plan").write_text(json.dumps(meta))
    assert run_cli("inspect", p / "m.plan").code == 0


@pytest.mark.parametrize("opt", [[100000, 3, 1000, 1000], [1e30, 3, 32, 32], [True, 3, 32, 32]])
def test_absurd_shapes_in_a_plan_json_are_damage(plan, tmp_path, run_cli, opt):
    p = tmp_path / "m.plan"
    shutil.copy(plan, p)
    meta = json.loads(meta_path_for(plan).read_text())
    meta["inputs"][0]["opt"] = opt
    meta_path_for(p).write_text(json.dumps(meta))
    for cmd in ("inspect", "run"):
        msg = clean_error(run_cli, [tmp_path], cmd, p)
        assert "is damaged" in msg and "opt shape" in msg


# ----------------------------------------------------------------------------- JSON and specs
def test_json_nested_past_the_recursion_limit_is_one_error_line(world, plan, tmp_path, run_cli):
    """json.loads raises RecursionError, which no reader caught: a traceback with exit 1 (and `cache ls`
    lost its whole listing to one bad cache)."""
    root = tmp_path / "root"
    d = _noise_cache(root, run_cli)
    (d / C.MANIFEST).write_text(_nested())
    msg = clean_error(run_cli, [d], "cache", "info", d)
    assert "cannot read" in msg
    r = run_cli("cache", "ls", "--cache-root", root, "--json")
    assert r.code == 0 and json.loads(r.last_line)[0]["status"] == "broken"
    p = tmp_path / "m.plan"
    shutil.copy(plan, p)
    meta_path_for(p).write_text(_nested())
    assert "cannot read" in clean_error(run_cli, [tmp_path / "m.plan"], "inspect", p)
    ck = tmp_path / "ck.safetensors"
    from safetensors.torch import save_file

    from mixq_onnx.models import load_model

    save_file(load_model("cifar_resnet20", random_init=True).state_dict(), str(ck))
    (tmp_path / "ck.safetensors.json").write_text(_nested())  # unreadable: it cannot switch the sha256 check off
    msg = clean_error(run_cli, [], "eval", "--model", "cifar_resnet20", "--checkpoint", ck, "--data", world["npz"])
    assert "is not readable JSON" in msg
    (tmp_path / "ck.safetensors.json").unlink()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    args = ("sweep", "--model", "cifar_resnet20", "--checkpoint", ck, "--calib", d, "--data", world["npz"],
            "--out", sweep, "--bits", "W8A8", "--method", "rtn")
    for bad in (_nested(), json.dumps({"version": 1, "cells": [{"key": [1]}]})):
        (sweep / "sweep.json").write_text(bad)
        msg = clean_error(run_cli, [sweep], *args)
        assert "sweep.json" in msg


def test_a_hub_spec_in_a_received_folder_is_not_fetched_unasked(world, tmp_path, run_cli):
    """`hf-hub:` makes timm ask the network for the model's config (and write the hub cache)."""
    q = tmp_path / "q"
    shutil.copytree(world["q"], q)
    meta = json.loads((q / "quant.json").read_text())
    meta["model"]["spec"] = "hf-hub:someone/evil"
    (q / "quant.json").write_text(json.dumps(meta))
    before = snapshot(q)
    for cmd in (("eval", "--quantized", q, "--data", world["npz"]), ("export", "--quantized", q, "--out",
                                                                     tmp_path / "x.onnx")):
        msg = clean_error(run_cli, [q], *cmd)
        assert "Hugging Face hub model" in msg and "--trust-model-code" in msg
    assert snapshot(q) == before
