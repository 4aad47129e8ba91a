"""Hardening from a read-only audit of qat, robustify, sweep, quantize and the cache commands (2026-12-01): an
output folder that holds the command's own checkpoint, outputs written inside the input data or a calibration
cache (which `cache rm` then deleted with the cache), a damaged checkpoint sidecar that switched the hash check
off, a resumed calib that re-sealed an edited shard, and sweep.json cells reused unchecked.

Each refusal is one `error:` line, exit 2, with nothing created or changed (`clean_error`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_error, one_line_error

from mixq_onnx.calib import CalibConfig, make_calibration_cache
from mixq_onnx.calib import cache as C
from mixq_onnx.errors import MixqError
from mixq_onnx.models import load_model
from mixq_onnx.sweep import SweepConfig, read_sweep
from mixq_onnx.utils import canonical_json, sha256_bytes

R20 = ("--model", "cifar_resnet20")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A noise cache (4 images, shards of 2), a tiny labelled npz, an image folder, and a random ResNet-20
    checkpoint."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("apart")
    root = d / "cc"
    cache = make_calibration_cache(CalibConfig(generator="noise", num=4, shard_size=2, size=32), root,
                                   progress=False, log=lambda m: None)
    rng = np.random.default_rng(0)
    npz = d / "data.npz"
    np.savez(npz, x=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y=np.arange(12) % 10)
    imgs = d / "imgs"
    from PIL import Image

    for c in range(2):
        (imgs / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(imgs / f"c{c}" / "a.png")
    ck = d / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("cifar_resnet20", random_init=True).state_dict().items()},
              str(ck))
    return {"root": root, "cache": cache, "npz": npz, "imgs": imgs, "ck": ck}


# ----------------------------------------------------------------------------- outputs apart from inputs
def test_qat_and_quantize_refuse_an_out_folder_that_holds_their_checkpoint(world, tmp_path, run_cli):
    """`qat --checkpoint rw/weights.safetensors --out rw --overwrite` replaced the checkpoint it trained from."""
    rw = tmp_path / "rw"
    rw.mkdir()
    ck = rw / "weights.safetensors"
    ck.write_bytes(world["ck"].read_bytes())
    msg = clean_error(run_cli, [tmp_path], "qat", *R20, "--checkpoint", ck, "--data", world["npz"], "--method", "lsq",
                      "--wbits", "4", "--abits", "4", "--epochs", "1", "--final-epochs", "0", "--out", rw, "--overwrite")
    assert msg == f"error: --out {rw} holds the input {ck}: write somewhere else", msg
    msg = clean_error(run_cli, [tmp_path], "quantize", *R20, "--checkpoint", ck, "--calib", world["cache"],
                      "--method", "rtn", "--out", rw, "--overwrite")
    assert "holds the input" in msg


def test_outputs_inside_a_calibration_cache_or_the_input_data_are_refused(world, tmp_path, run_cli):
    cache, root = world["cache"], world["root"]
    ref = cache.name[:8]  # a hash prefix under --cache-root, as users pass it
    watch = [cache, world["imgs"], tmp_path]
    msg = clean_error(run_cli, watch, "robustify", *R20, "--checkpoint", world["ck"], "--data", ref, "--cache-root",
                      root, "--epochs", "1", "--out", cache / "evil.safetensors")
    assert msg.startswith(f"error: --out {cache / 'evil.safetensors'} would overwrite the input {cache}"), msg
    msg = clean_error(run_cli, watch, "qat", *R20, "--checkpoint", world["ck"], "--data", ref, "--cache-root", root,
                      "--method", "lsq", "--wbits", "4", "--abits", "4", "--out", cache, "--overwrite")
    assert "would overwrite the input" in msg, msg
    msg = clean_error(run_cli, watch, "sweep", *R20, "--checkpoint", world["ck"], "--calib", ref, "--cache-root", root,
                      "--data", world["npz"], "--method", "rtn", "--bits", "W8A8", "--out", cache / "sweepout")
    assert "would overwrite the input" in msg, msg
    # a sweep inside its image-folder data became an 11th class (its sweep.png), and every later read failed
    msg = clean_error(run_cli, watch, "sweep", *R20, "--checkpoint", world["ck"], "--calib", ref, "--cache-root", root,
                      "--data", world["imgs"], "--method", "rtn", "--bits", "W8A8", "--out", world["imgs"] / "zsweep")
    assert "would overwrite the input" in msg, msg
    # the generic rule holds whatever the command knows it reads: no output lands inside a cache
    msg = clean_error(run_cli, watch, "export", "--model", "cifar_resnet20", "--random-weights", "--fp", "--out",
                      cache / "fp.onnx")
    assert msg == f"error: --out {cache / 'fp.onnx'} lies inside the calibration cache {cache.resolve()}: write " \
                  "somewhere else", msg


def test_cache_rm_refuses_a_cache_holding_what_it_did_not_write(world, tmp_path, run_cli):
    """A result written into a cache folder went with it on `cache rm`."""
    root = tmp_path / "cc"
    cache = make_calibration_cache(CalibConfig(generator="noise", num=2, size=32), root, progress=False,
                                   log=lambda m: None)
    (cache / "notes.txt").write_text("mine")
    msg = clean_error(run_cli, [root], "cache", "rm", cache.name, "--cache-root", root)
    assert "holds 1 entry a cache does not (notes.txt): move them out first" in msg, msg
    (cache / "notes.txt").unlink()
    assert run_cli("cache", "rm", cache.name, "--cache-root", root).code == 0 and not cache.exists()


# ----------------------------------------------------------------------------- hashes the writer recorded
def test_a_damaged_checkpoint_sidecar_is_refused_not_ignored(world, tmp_path, run_cli):
    ck = tmp_path / "t.safetensors"
    ck.write_bytes(world["ck"].read_bytes())
    side = tmp_path / "t.safetensors.json"
    for text, want in (('{"sha256": ', "is not readable JSON"), ('{"sha256": 7}', "records no valid sha256")):
        side.write_text(text)
        msg = clean_error(run_cli, [tmp_path], "eval", *R20, "--checkpoint", ck, "--data", world["npz"])
        assert want in msg and "t.safetensors.json" in msg, msg
    side.write_text(json.dumps({"note": "my own json"}))  # not a sidecar mixq-onnx wrote: nothing to check
    assert run_cli("eval", *R20, "--checkpoint", ck, "--data", world["npz"]).code == 0


def test_a_resumed_calib_generates_an_edited_shard_again(tmp_path):
    """Resuming trusted any shard with the right image count and sealed its bytes: an edited shard of a cache
    whose manifest was lost came back as "ok"."""
    cfg = CalibConfig(generator="noise", num=4, shard_size=2, size=32)
    make = lambda: make_calibration_cache(cfg, tmp_path, progress=False, log=lambda m: None)  # noqa: E731
    cache = make()
    original = {f.name: f.read_bytes() for f in cache.glob("shard-*.safetensors")}
    shard = cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a pixel
    shard.write_bytes(bytes(data))
    (cache / C.MANIFEST).unlink()
    res = C.verify(cache)
    assert not res.ok and "missing manifest.json" in res.problems[0]
    assert make() == cache
    assert {f.name: f.read_bytes() for f in cache.glob("shard-*.safetensors")} == original
    assert C.verify(cache).ok


def test_cache_verify_without_a_manifest_is_a_failed_verdict_not_bad_input(tmp_path, run_cli):
    cache = make_calibration_cache(CalibConfig(generator="noise", num=2, size=32), tmp_path, progress=False,
                                   log=lambda m: None)
    (cache / C.MANIFEST).unlink()
    r = run_cli("cache", "verify", cache)
    assert r.code == 1 and "missing manifest.json" in r.out + r.err, (r.code, r.out, r.err)


# ----------------------------------------------------------------------------- sweep
def test_a_bit_width_listed_twice_in_two_spellings_is_refused():
    with pytest.raises(MixqError, match="a bit-width is listed twice: W8A8, W8A8"):
        SweepConfig(bits=("W8A8", "w08a8")).validate()
    assert SweepConfig(bits=("w04a4",)).validate().bits == ("W4A4",)


def _cell(**kw) -> dict:
    c = {"key": "m|rtn|W8A8|0", "label": "m", "method": "rtn", "bits": "W8A8", "seed": 0, "fingerprint": "f" * 16,
         "top1": 80.0, "top5": 99.0, "n": 10, "agreement": 97.0, "seconds": 1.0, **kw}
    return {**c, "sha256": sha256_bytes(canonical_json(c).encode())}


def test_sweep_cells_are_checked_before_reuse(tmp_path):
    """An edited top1 was reused into the table; a huge integer was a traceback (OverflowError)."""
    out = tmp_path / "s"
    out.mkdir()

    def write(cells: list) -> None:
        (out / "sweep.json").write_text(json.dumps({"version": 1, "cells": cells}))

    write([_cell()])
    assert read_sweep(out)["cells"][0]["top1"] == 80.0
    edited = _cell()
    edited["top1"] = 55.5
    write([edited])
    with pytest.raises(MixqError, match=r"cell 0 \(m rtn W8A8\) changed after the sweep wrote it"):
        read_sweep(out)
    (out / "sweep.json").write_text('{"version": 1, "cells": [{"key": "k", "label": "m", "method": "rtn", "bits": '
                                    '"W8A8", "fingerprint": "f", "top1": 1' + "0" * 400 + "}]}")
    with pytest.raises(MixqError, match="top1 a percentage"):
        read_sweep(out)
    for bad in (float("nan"), -1.0, 100.5):
        write([{**_cell(), "top1": bad}])
        with pytest.raises(MixqError, match="top1 a percentage"):
            read_sweep(out)
    old = _cell()
    del old["sha256"]  # a cell written before cells recorded their hash: still read, its numbers range-checked
    write([old])
    assert read_sweep(out)["cells"][0]["top1"] == 80.0


def test_sweep_with_a_huge_number_in_sweep_json_is_one_line(tmp_path, world, run_cli):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text('{"version": 1, "cells": [{"key": "k", "label": "m", "method": "rtn", "bits": '
                                    '"W8A8", "fingerprint": "f", "top1": 1' + "0" * 400 + "}]}")
    r = run_cli("sweep", *R20, "--checkpoint", world["ck"], "--calib", world["cache"], "--data", world["npz"],
                "--method", "rtn", "--bits", "W8A8", "--out", out)
    assert "top1 a percentage" in one_line_error(r)
