"""Hardening of quantized result folders (quant.json + weights.safetensors): they can come from anyone.

Loading one never runs code it names, writing one never deletes the user's files, every quantizer is
validated (loader and exporter share `validate_record`), `check` sees a bad rescale constant, and
checkpoints with NaN/inf or a truncated pickle are refused with a message that never advises
`weights_only=False`.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL_NET_PY as NET
from conftest import one_line_error, random_r20_rtn, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from mixq_onnx.errors import MixqError
from mixq_onnx.models import canonical_spec, is_code_spec, load_model, same_spec
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import lint
from mixq_onnx.quant import QuantConfig, WeightQuantizer, load_quantized, quantize, quantizers
from mixq_onnx.quant.io import (
    check_output_dir,
    load_quantized_dir,
    load_source_model,
    read_quant_json,
    save_quantized,
    validate_quantized_model,
)
from mixq_onnx.quant.quantizer import quantizer_state, validate_record

CONV = "layer1.0.conv1.weight"  # a 4-bit weight quantizer of cifar_resnet20 (first/last layers are 8-bit)
ACT = "layer1.0.conv1.input"


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def r20(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A random-weight cifar_resnet20, quantized W4A4 with rtn on 8 random images, and its folder."""
    model, q = random_r20_rtn(8)
    return model, save_quantized(q, tmp_path_factory.mktemp("q") / "r20")


@pytest.fixture(scope="module")
def r20_w8(r20, tmp_path_factory) -> Path:
    """The same network quantized W8A8: a second, different folder."""
    _, q = random_r20_rtn(8, bits=8, model=r20[0])
    return save_quantized(q, tmp_path_factory.mktemp("q8") / "r20")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_json(d: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((d / "quant.json").read_text())
    fn(meta)
    (d / "quant.json").write_text(json.dumps(meta, indent=2))


def _record(meta: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in meta["quantizers"] if r["name"] == name)


def _edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None], fix_sha: bool = True) -> None:
    """Change weights.safetensors; with fix_sha, record its new sha256 (a deliberate, consistent edit)."""
    ts = load_file(str(d / "weights.safetensors"))
    fn(ts)
    save_file({k: v.contiguous() for k, v in ts.items()}, str(d / "weights.safetensors"))
    if fix_sha:
        sha = _sha(d / "weights.safetensors")
        _edit_json(d, lambda m: m.__setitem__("weights_sha256", sha))


def _set(t: torch.Tensor, i: int, v: float) -> None:
    t.view(-1)[i] = v


# ----------------------------------------------------------------------------- 1. never run recorded code
@pytest.fixture
def code_world(tmp_path, monkeypatch) -> dict[str, Any]:
    """cwd = tmp_path holding good.py (a benign factory) and evil/model.py + evil_mod.py, which create
    `marker` when imported; `qdir` was quantized from 'good.py:make'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "EVIL_RAN"
    side = f"pathlib.Path({str(marker)!r}).write_text('the folder ran code')"
    (tmp_path / "good.py").write_text(NET.format(side_effect=""))
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "model.py").write_text(NET.format(side_effect=side))
    (tmp_path / "evil_mod.py").write_text(NET.format(side_effect=side))
    torch.set_num_threads(1)
    model = load_model("good.py:make", random_init=True, input_size=(3, 16, 16))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(4, 3, 16, 16), progress=False)
    return {"qdir": save_quantized(q, tmp_path / "q"), "marker": marker, "tmp": tmp_path}


def _respec(qdir: Path, spec: str) -> None:
    """Make `qdir` record `spec` (and no model file sha256, as if it had been made from that code)."""
    def edit(m: dict[str, Any]) -> None:
        m["model"]["spec"] = spec
        m["model"].pop("model_sha256", None)

    _edit_json(qdir, edit)


def test_is_code_spec_and_canonical_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_code_spec("evil/model.py:make") and is_code_spec("pkg.mod:make") and is_code_spec("m.py:f")
    assert not is_code_spec("cifar_resnet20") and not is_code_spec("resnet18")
    assert not is_code_spec("hf-hub:timm/resnet18.a1_in1k") and not is_code_spec("timm/resnet18.a1_in1k")
    assert canonical_spec("m.py:f") == f"{tmp_path / 'm.py'}:f"
    assert same_spec("m.py:f", f"{tmp_path}/m.py:f") and same_spec("./sub/../m.py:f", "m.py:f")
    assert not same_spec("m.py:f", "m.py:g") and not same_spec("cifar_resnet20", "cifar_resnet32")


@pytest.mark.parametrize("spec", ["evil/model.py:make", "evil_mod:make"])
def test_result_folder_never_runs_the_code_it_names(code_world, spec):
    qdir, marker = code_world["qdir"], code_world["marker"]
    _respec(qdir, spec)
    for load in (load_quantized_dir, load_source_model):
        with pytest.raises(MixqError) as e:
            load(qdir)
        msg = str(e.value)
        assert f"names model code {spec!r}" in msg and "--trust-model-code" in msg and "--model SPEC" in msg
        assert not marker.exists()
    # trusting it does import it: the file really would have run
    q = load_quantized_dir(qdir, trust_model_code=True)
    assert marker.exists() and len(quantizers(q)) == 5  # conv and fc weights and inputs, the pool's input


def test_cli_export_and_verify_never_run_the_code_a_folder_names(code_world, run_cli):
    qdir, marker, tmp = code_world["qdir"], code_world["marker"], code_world["tmp"]
    _respec(qdir, "evil/model.py:make")
    msg = one_line_error(run_cli("export", "--quantized", qdir, "--out", tmp / "m.onnx"))
    assert "names model code 'evil/model.py:make'" in msg and "--trust-model-code" in msg
    (tmp / "g.onnx").write_bytes(b"")
    msg = one_line_error(run_cli("verify", tmp / "g.onnx", "--quantized", qdir, "--data", tmp))
    assert "names model code" in msg
    assert not marker.exists() and not (tmp / "m.onnx").exists()


def test_cli_eval_and_fp_export_never_run_the_code_a_folder_names(code_world, run_cli):
    qdir, marker, tmp = code_world["qdir"], code_world["marker"], code_world["tmp"]
    _respec(qdir, "evil/model.py:make")
    np.savez(tmp / "d.npz", x=np.zeros((2, 16, 16, 3), np.uint8), y=np.zeros(2, np.int64))
    msgs = [one_line_error(run_cli("eval", "--quantized", qdir, "--data", tmp / "d.npz")),
            one_line_error(run_cli("export", "--fp", "--quantized", qdir, "--out", tmp / "fp.onnx"))]
    assert all("names model code" in m for m in msgs) and not marker.exists()


def test_user_model_must_be_the_recorded_one(code_world, r20, tmp_path):
    qdir = code_world["qdir"]  # recorded spec: good.py (made from 'good.py:make' in the cwd) and its sha256
    size = (3, 16, 16)
    same = load_model(f"{code_world['tmp'] / 'good.py'}:make", random_init=True, input_size=size)
    assert len(quantizers(load_quantized(same, qdir))) == 5  # the same file, spelled differently
    (code_world["tmp"] / "other.py").write_text((code_world["tmp"] / "good.py").read_text() + "# edited\n")
    other = load_model("other.py:make", random_init=True, input_size=size)
    with pytest.raises(MixqError, match=r"model file other.py does not match .*quant.json: its sha256 is"):
        load_quantized(other, qdir)
    renamed = load_model("good.py:Net", random_init=True, input_size=size)
    with pytest.raises(MixqError, match=r"made from model '.*good.py:make', the model given is 'good.py:Net'"):
        load_quantized(renamed, qdir)

    model, r20_dir = r20
    with pytest.raises(MixqError, match=r"'cifar_resnet20'.*'cifar_resnet32'"):
        load_quantized(load_model("cifar_resnet32", random_init=True), r20_dir)
    ck = tmp_path / "r20.pt"
    torch.save(model.state_dict(), ck)
    with_ck = load_model("cifar_resnet20", ck)
    with pytest.raises(MixqError, match=r"made from no checkpoint .* has checkpoint sha256 [0-9a-f]{12}"):
        load_quantized(with_ck, r20_dir)
    # a folder made from one checkpoint, loaded on another
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(with_ck, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
    qck = save_quantized(q, tmp_path / "qck")
    sd = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "r20b.pt")
    sha_a, sha_b = _sha(ck)[:12], _sha(tmp_path / "r20b.pt")[:12]
    with pytest.raises(MixqError, match=rf"checkpoint sha256 {sha_a}.*checkpoint sha256 {sha_b}"):
        load_quantized(load_model("cifar_resnet20", tmp_path / "r20b.pt"), qck)


# ----------------------------------------------------------------------------- 2. never delete the user's files
def _user_files(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00" * 10)


def test_save_refuses_a_non_empty_folder(r20, tmp_path):
    model, src = r20
    q = load_quantized(model, src)
    out = tmp_path / "out"
    _user_files(out)
    before = snapshot(out)
    with pytest.raises(MixqError, match=r"exists and is not empty; pass --overwrite to replace its quant.json "
                                        r"and weights.safetensors"):
        save_quantized(q, out)
    assert snapshot(out) == before


def test_check_output_dir_matches_save(tmp_path):
    _user_files(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixqError, match="exists and is not empty; pass --overwrite"):
        check_output_dir(tmp_path / "full")
    with pytest.raises(MixqError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    for ok, over in ((tmp_path / "full", True), (tmp_path / "empty", False), (tmp_path / "new", False)):
        assert check_output_dir(ok, over) == ok


def test_save_on_a_file_is_an_error(r20, tmp_path):
    model, src = r20
    f = tmp_path / "out"
    f.write_text("a file")
    with pytest.raises(MixqError, match="exists and is not a directory"):
        save_quantized(load_quantized(model, src), f)
    assert f.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_new_and_empty_folders(r20, tmp_path):
    model, src = r20
    q = load_quantized(model, src)
    new = save_quantized(q, tmp_path / "a" / "b" / "new")
    assert sorted(p.name for p in new.iterdir()) == ["quant.json", "weights.safetensors"]
    assert sorted(p.name for p in new.parent.iterdir()) == ["new"]  # no temporary sibling left
    assert read_quant_json(new)["weights_sha256"] == _sha(new / "weights.safetensors")
    assert (new / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(q, empty)
    assert (empty / "quant.json").read_bytes() == (new / "quant.json").read_bytes()


def test_overwrite_replaces_only_quant_json_and_weights(r20, r20_w8, tmp_path):
    model, src = r20
    out = _copy(r20_w8, tmp_path / "out")
    _user_files(out)
    mine = {k: v for k, v in snapshot(out).items() if "notes" in k or "sub" in k}
    save_quantized(load_quantized(model, src), out, overwrite=True)
    after = snapshot(out)
    assert {k: after[k] for k in mine} == mine
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "quant.json", "sub", "weights.safetensors"]
    assert (out / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    meta = read_quant_json(out)
    assert meta["config"]["wbits"] == 4 and meta["weights_sha256"] == _sha(out / "weights.safetensors")
    assert len(quantizers(load_quantized(model, out))) == len(quantizers(load_quantized(model, src)))


def test_weights_from_another_save_are_detected(r20, r20_w8, tmp_path):
    """What an interrupted --overwrite leaves (new weights, old quant.json) never loads."""
    model, src = r20
    d = _copy(src, tmp_path / "d")
    shutil.copy(r20_w8 / "weights.safetensors", d / "weights.safetensors")
    with pytest.raises(MixqError, match=r"weights.safetensors does not match .*quant.json: its sha256 is"):
        load_quantized(model, d)


def test_old_folders_without_block_fields_load_but_not_without_the_weights_sha256(r20, tmp_path):
    """Folders from before block scales (no block_size/scale_shape) still load. A quant.json without the
    weights' sha256 is refused: with the field deleted, swapped weights would otherwise load unchecked."""
    model, src = r20
    d = _copy(src, tmp_path / "old")

    def strip(m: dict[str, Any]) -> None:
        for r in m["quantizers"]:
            r.pop("block_size", None)
            r.pop("scale_shape", None)

    _edit_json(d, strip)
    assert len(quantizers(load_quantized(model, d))) == len(quantizers(load_quantized(model, src)))
    _edit_json(d, lambda m: m.pop("weights_sha256"))
    with pytest.raises(MixqError, match=r"quant.json records no weights_sha256, so weights.safetensors cannot be checked"):
        load_quantized(model, d)


# ----------------------------------------------------------------------------- 3. validate every quantizer
def _both_scale(v: float) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _edit_tensors(d, lambda ts: _set(ts[f"{CONV}.scale"], 3, v))
        _edit_json(d, lambda m: _record(m, CONV)["scale"].__setitem__(3, v))
    return edit


def _rec_edit(name: str, fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda d: _edit_json(d, lambda m: fn(_record(m, name)))


def _t_edit(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    return lambda d: _edit_tensors(d, fn)


BAD_FOLDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "scale-0": (_both_scale(0.0), f"quantizer {CONV}: scale has 0 at channel 3"),
    "scale-negative": (_both_scale(-1.0), f"quantizer {CONV}: scale has -1 at channel 3"),
    "scale-nan": (_both_scale(math.nan), f"quantizer {CONV}: scale has nan at channel 3"),
    "scale-inf": (_both_scale(math.inf), f"quantizer {CONV}: scale has inf at channel 3"),
    "scale-overflow": (_both_scale(1e38), f"quantizer {CONV}: scale 1e+38 at channel 3 overflows"),
    "act-scale-0": (lambda d: (_edit_tensors(d, lambda ts: _set(ts[f"{ACT}.scale"], 0, 0.0)),
                               _edit_json(d, lambda m: _record(m, ACT).__setitem__("scale", 0.0))),
                    f"quantizer {ACT}: scale has 0 ("),
    "scale-only-in-json": (_rec_edit(CONV, lambda r: r["scale"].__setitem__(3, 0.5)),
                           f"quantizer {CONV}: scale in quant.json (0.5) differs from weights.safetensors"),
    "scale-only-in-tensors": (_t_edit(lambda ts: _set(ts[f"{CONV}.scale"], 2, 0.25)),
                              f"quantizer {CONV}: scale in quant.json"),
    "zero-point-in-json": (_rec_edit(CONV, lambda r: r["zero_point"].__setitem__(0, 1.0)),
                           f"quantizer {CONV}: zero_point in quant.json (1) differs"),
    "zero-point-fraction": (_t_edit(lambda ts: _set(ts[f"{CONV}.zero_point"], 1, 0.5)),
                            f"quantizer {CONV}: zero point 0.5 at channel 1 is not an integer in [-7, 7]"),
    "zero-point-off-grid": (_t_edit(lambda ts: _set(ts[f"{ACT}.zero_point"], 0, 300.0)),
                            f"quantizer {ACT}: zero point 300 is not an integer in [0, 15]"),
    "zero-point-symmetric": (_t_edit(lambda ts: _set(ts[f"{CONV}.zero_point"], 1, 2.0)),
                             f"quantizer {CONV}: zero point 2 at channel 1 is not 0"),
    "int-off-grid": (_t_edit(lambda ts: _set(ts[f"{CONV}.int"], 5, 100)),
                     f"quantizer {CONV}: integer weight 100 at index (0, 0, 1, 2) is outside the grid [-7, 7]"),
    "int-narrow-grid": (_t_edit(lambda ts: _set(ts[f"{CONV}.int"], 0, -8)),
                        f"quantizer {CONV}: integer weight -8 at index (0, 0, 0, 0) is outside the grid [-7, 7]"),
    "int-dtype": (_t_edit(lambda ts: ts.__setitem__(f"{CONV}.int", ts[f"{CONV}.int"].to(torch.int32))),
                  f"quantizer {CONV}: integer weights are torch.int32, expected torch.int8"),
    "scale-dtype": (_t_edit(lambda ts: ts.__setitem__(f"{CONV}.scale", ts[f"{CONV}.scale"].double())),
                    f"quantizer {CONV}: scale tensor is torch.float64, expected float32"),
    "int-shape": (_t_edit(lambda ts: ts.__setitem__(f"{CONV}.int", ts[f"{CONV}.int"][:, :, :2])),
                  f"quantizer {CONV}: integer weights have shape [16, 16, 2, 3], the model's weight is [16, 16, 3, 3]"),
    "scale-shape": (_t_edit(lambda ts: ts.__setitem__(f"{CONV}.scale", ts[f"{CONV}.scale"][:-1])),
                    f"quantizer {CONV}: scale tensor has 15 values, the model needs 16"),
    "record-shape": (_rec_edit(CONV, lambda r: r.__setitem__("shape", [16, 16, 3, 1])),
                     f"quantizer {CONV}: shape [16, 16, 3, 1] in quant.json, the model's weight is [16, 16, 3, 3]"),
    "scale-shape-record": (_rec_edit(CONV, lambda r: r.__setitem__("scale_shape", [8, 2])),
                           f"quantizer {CONV}: scale_shape [8, 2] in quant.json"),
    "bits-16": (_rec_edit(CONV, lambda r: r.__setitem__("bits", 16)), f"quantizer {CONV}: bits 16 is not supported"),
    "bits-1": (_rec_edit(CONV, lambda r: r.__setitem__("bits", 1)), f"quantizer {CONV}: bits 1 is not supported"),
    "bits-string": (_rec_edit(CONV, lambda r: r.__setitem__("bits", "4")),
                    f"quantizer {CONV}: bits is '4', expected an integer"),
    "bits-null": (_rec_edit(CONV, lambda r: r.__setitem__("bits", None)),
                  f"quantizer {CONV}: bits is None, expected an integer"),
    "bits-vs-grid": (_rec_edit(CONV, lambda r: r.__setitem__("bits", 8)),
                     f"quantizer {CONV}: qmin/qmax [-7, 7] disagree with the grid [-127, 127] of 8-bit"),
    "qmax-edited": (_rec_edit(CONV, lambda r: r.__setitem__("qmax", 100)), f"quantizer {CONV}: qmin/qmax [-7, 100]"),
    "act-signed-flipped": (_rec_edit(ACT, lambda r: r.__setitem__("signed", not r["signed"])),
                           f"quantizer {ACT}: qmin/qmax"),
    "missing-key": (_rec_edit(CONV, lambda r: r.pop("qmin")), f"quantizer {CONV}: record lacks 'qmin'"),
    "act-missing-key": (_rec_edit(ACT, lambda r: r.pop("signed")), f"quantizer {ACT}: record lacks 'signed'"),
    "axis-edited": (_rec_edit(CONV, lambda r: r.__setitem__("axis", 1)),
                     f"quantizer {CONV}: axis 1 in quant.json, the model quantizes along axis 0"),
    "missing-tensor": (_t_edit(lambda ts: ts.pop(f"{CONV}.zero_point")),
                       f"quantizer {CONV}: weights.safetensors lacks its zero_point tensor"),
    "record-deleted": (lambda d: _edit_json(d, lambda m: m["quantizers"].remove(_record(m, CONV))),
                       f"quantizers only in the file [], only in the model ['{CONV}']"),
    "record-twice": (lambda d: _edit_json(d, lambda m: m["quantizers"].append(_record(m, CONV))),
                     f"quantizer {CONV} is recorded twice"),
    "top-level-config": (lambda d: _edit_json(d, lambda m: m.pop("config")), "quant.json lacks 'config'"),
    "top-level-quantizers": (lambda d: _edit_json(d, lambda m: m.__setitem__("quantizers", {})),
                             "quantizers is dict, expected list"),
    "config-bits": (lambda d: _edit_json(d, lambda m: m["config"].__setitem__("wbits", 12)),
                    "config is not valid: --wbits must be between 2 and 8"),
    "sha-edited-weights": (lambda d: _edit_tensors(d, lambda ts: _set(ts[f"{CONV}.scale"], 0, 1.0), fix_sha=False),
                           "weights.safetensors does not match"),
    "truncated-weights": (lambda d: ((d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:999]),
                                     _edit_json(d, lambda m: m.__setitem__("weights_sha256",
                                                                           _sha(d / "weights.safetensors")))),
                          "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_loader_validates_every_quantizer(r20, tmp_path, case):
    model, src = r20
    edit, expect = BAD_FOLDERS[case]
    d = _copy(src, tmp_path / "d")
    edit(d)
    with pytest.raises(MixqError) as e:
        load_quantized(model, d)
    assert expect in str(e.value), str(e.value)


def test_cli_refuses_an_edited_folder_in_one_line(r20, tmp_path, run_cli):
    _, src = r20
    d = _copy(src, tmp_path / "d")
    _both_scale(0.0)(d)
    msg = one_line_error(run_cli("export", "--quantized", d, "--out", tmp_path / "m.onnx"))
    assert f"quantizer {CONV}: scale has 0 at channel 3" in msg and not (tmp_path / "m.onnx").exists()


def test_export_runs_the_same_validator(r20, tmp_path):
    model, src = r20
    q = load_quantized(model, src)
    validate_quantized_model(q)  # a good model passes
    for name, qz in quantizers(q).items():  # the state export validates is the state save writes
        rec, ts = quantizer_state(qz)
        assert rec == _record(read_quant_json(src), name)
    wq = quantizers(q)[CONV]
    wq.scale.data[3] = 0.0
    with pytest.raises(MixqError, match=f"quantizer {CONV}: scale has 0 at channel 3"):
        export_qdq(q, tmp_path / "m.onnx")
    wq.scale.data[3] = 0.01
    wq.int_weight.view(-1)[0] = 9
    with pytest.raises(MixqError, match=rf"quantizer {CONV}: integer weight 9 at index \(0, 0, 0, 0\)"):
        export_qdq(q, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_asymmetric_folder_passes_validation(r20, tmp_path):
    """Asymmetric grids (uint8 integers, integral zero points) are valid, not mistaken for edits."""
    model, _ = r20
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", symmetric=False), calib, progress=False)
    validate_quantized_model(q)
    d = save_quantized(q, tmp_path / "asym")
    q2 = load_quantized(model, d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    zp = quantizers(q2)[CONV].zero_point
    assert bool((zp != 0).any())  # the zero-point checks really ran on non-trivial values


def test_validate_record_names_the_quantizer_for_any_record():
    for rec in (None, [], {"name": "x"}, {"name": "x", "kind": "bias"}):
        with pytest.raises(MixqError, match=r"^(quantizer x|a quantizer record): "):
            validate_record(rec, {})


# ----------------------------------------------------------------------------- 4. fuzz
NAN, INF = math.nan, math.inf
_idx = st.integers(0, 10**6)
_MUTATION = st.one_of(
    st.tuples(st.just("scale"), _idx, _idx, st.sampled_from([0.0, -1.0, NAN, INF, 1e30]),
              st.sampled_from(["json", "tensor", "both"])),
    st.tuples(st.just("bits"), _idx, st.sampled_from([1, 16, 9, "4", None, 2, 8])),
    st.tuples(st.just("shape"), _idx, st.sampled_from(["int", "scale", "zero_point", "record", "scale_shape"])),
    st.tuples(st.just("int"), _idx, _idx, st.integers(-128, 127)),
    st.tuples(st.just("zero_point"), _idx, st.sampled_from([0.5, 3.0, -200.0, NAN]), st.booleans()),
    st.tuples(st.just("drop_key"), _idx, st.sampled_from(["name", "kind", "bits", "signed", "symmetric", "axis",
                                                          "qmin", "qmax", "scale", "zero_point", "shape",
                                                          "scale_shape", "block_size", "placement"])),
    st.tuples(st.just("drop_top"), st.sampled_from(["format", "config", "model", "quantizers", "units", "report",
                                                    "weights_sha256"])),
    st.tuples(st.just("drop_tensor"), _idx, st.sampled_from(["scale", "zero_point", "int"])),
    st.tuples(st.just("delete_record"), _idx),
    st.tuples(st.just("truncate"), _idx),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
)


def _mutate(meta: dict[str, Any], ts: dict[str, torch.Tensor], m: tuple) -> bytes | None:
    """Apply one mutation in memory; returns raw weights bytes for the file-level ones."""
    recs = meta.get("quantizers") if isinstance(meta.get("quantizers"), list) else []
    r = recs[m[1] % len(recs)] if recs and isinstance(m[1], int) else None
    name = r.get("name") if isinstance(r, dict) else None
    kind = m[0]
    if kind == "scale" and r is not None:
        _, _, ch, v, where = m
        if where in ("json", "both") and "scale" in r:
            if isinstance(r["scale"], list) and r["scale"]:
                r["scale"][ch % len(r["scale"])] = v
            else:
                r["scale"] = v
        t = ts.get(f"{name}.scale")
        if where in ("tensor", "both") and t is not None and t.numel():
            _set(t, ch % t.numel(), v)
    elif kind == "bits" and r is not None:
        r["bits"] = m[2]
    elif kind == "shape" and r is not None:
        what = m[2]
        if what == "record" and isinstance(r.get("shape"), list) and r["shape"]:
            r["shape"][0] += 1
        elif what == "scale_shape" and isinstance(r.get("scale_shape"), list):
            r["scale_shape"].append(1)
        elif f"{name}.{what}" in ts:
            t = ts[f"{name}.{what}"]
            ts[f"{name}.{what}"] = t.reshape(-1)[:-1] if t.numel() > 1 else torch.cat([t.reshape(-1)] * 2)
    elif kind == "int" and f"{name}.int" in ts:
        t = ts[f"{name}.int"]
        _set(t, m[2] % t.numel(), m[3])
    elif kind == "zero_point" and r is not None:
        t = ts.get(f"{name}.zero_point")
        if t is not None and t.numel():
            _set(t, 0, m[2])
        if m[3] and "zero_point" in r:
            if isinstance(r["zero_point"], list) and r["zero_point"]:
                r["zero_point"][0] = m[2]
            else:
                r["zero_point"] = m[2]
    elif kind == "drop_key" and r is not None:
        r.pop(m[2], None)
    elif kind == "drop_top":
        meta.pop(m[1], None)
    elif kind == "drop_tensor":
        ts.pop(f"{name}.{m[2]}", None)
    elif kind == "delete_record" and r is not None:
        recs.remove(r)
    elif kind == "truncate":
        return b"truncate"
    elif kind == "garbage":
        return m[1]
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(muts=st.lists(_MUTATION, min_size=1, max_size=3), sha=st.sampled_from(["fix", "keep", "drop"]),
       cut=st.integers(0, 10**6))
def test_fuzz_loader_raises_only_mixq_error_and_never_returns_a_broken_grid(r20, muts, sha, cut):
    model, src = r20
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(src, Path(tmp) / "d")
        meta = json.loads((d / "quant.json").read_text())
        ts = load_file(str(d / "weights.safetensors"))
        raw = None
        for m in muts:
            raw = _mutate(meta, ts, m) or raw
        save_file({k: v.contiguous() for k, v in ts.items()}, str(d / "weights.safetensors"))
        data = (d / "weights.safetensors").read_bytes()
        if raw == b"truncate":
            data = data[: cut % len(data)]
        elif raw is not None:
            data = raw
        (d / "weights.safetensors").write_bytes(data)
        if sha == "fix" and "weights_sha256" in meta:
            meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
        elif sha == "drop":
            meta.pop("weights_sha256", None)
        (d / "quant.json").write_text(json.dumps(meta))
        try:
            q = load_quantized(model, d)
        except MixqError:
            return
    for name, qz in quantizers(q).items():
        lo, hi = qz.qrange
        s = qz.scale.detach()
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), name
        z = qz.zero_point
        assert bool(((z >= lo) & (z <= hi) & (z == torch.round(z))).all()), name
        if isinstance(qz, WeightQuantizer):
            assert qz.int_weight.numel() and lo <= int(qz.int_weight.min()) and int(qz.int_weight.max()) <= hi, name
            assert 2 <= qz.bits <= 8


# ----------------------------------------------------------------------------- 5. check: the integer layout's rescale
@pytest.fixture(scope="module")
def r20_onnx(r20, tmp_path_factory) -> Path:
    model, src = r20
    return export_qdq(load_quantized(model, src), tmp_path_factory.mktemp("onnx") / "r20.onnx")


def _rescale(m: onnx.ModelProto, node: str) -> onnx.TensorProto:
    mul = next(n for n in m.graph.node if n.name == node)
    assert mul.op_type == "Mul"
    inits = {i.name: i for i in m.graph.initializer}
    return next(inits[i] for i in mul.input if i in inits)


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf])
def test_lint_flags_a_bad_rescale_constant(r20_onnx, value):
    m = onnx.load(str(r20_onnx))
    node = "layer1.0.conv1/Rescale"
    t = _rescale(m, node)
    a = numpy_helper.to_array(t).copy()
    a.reshape(-1)[3] = value
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    hits = [v for v in lint(m) if v.rule == "rescale"]
    assert [v.node for v in hits] == [node] and "at channel 3" in hits[0].message


def test_check_cli_names_a_zero_rescale(r20_onnx, tmp_path, run_cli):
    r = run_cli("check", r20_onnx)
    assert r.code == 0, r.err
    m = onnx.load(str(r20_onnx))
    node = "layer2.1.conv2/Rescale"
    t = _rescale(m, node)
    a = numpy_helper.to_array(t).copy()
    a.reshape(-1)[3] = 0.0
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    r = run_cli("check", bad)
    assert r.code == 1 and f"error: [rescale] {node}: rescale constant" in r.err and "has 0 at channel 3" in r.err
    assert "Traceback" not in r.err


# ----------------------------------------------------------------------------- 6. checkpoints
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, run_cli, value):
    sd = load_model("cifar_resnet20", random_init=True).state_dict()
    sd["layer2.0.conv1.weight"].view(-1)[7] = value
    sd["linear.weight"].view(-1)[0] = value  # a later one: the first is named
    ck = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, ck)
    word = "NaN" if math.isnan(value) else "inf"
    with pytest.raises(MixqError, match=rf"checkpoint .*bad.pt has {word} values in tensor layer2.0.conv1.weight"):
        load_model("cifar_resnet20", ck)
    msg = one_line_error(run_cli("export", "--fp", "--model", "cifar_resnet20", "--checkpoint", ck,
                                 "--out", tmp_path / "m.onnx"))
    assert "layer2.0.conv1.weight" in msg and not (tmp_path / "m.onnx").exists()


def test_truncated_checkpoint_never_suggests_weights_only_false(tmp_path, run_cli):
    sd = load_model("cifar_resnet20", random_init=True).state_dict()
    full = tmp_path / "full.pt"
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, full)
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    ck = tmp_path / "cut.pt"
    cases = [(full, n) for n in (3, 100, full.stat().st_size // 2)] + \
            [(legacy, n) for n in (10, 60, 120, 153, legacy.stat().st_size // 2)]
    for src, n in cases:
        ck.write_bytes(src.read_bytes()[:n])
        with pytest.raises(MixqError) as e:
            load_model("cifar_resnet20", ck)
        msg = str(e.value)
        assert "truncated or not a PyTorch checkpoint" in msg, (src.name, n, msg)
        assert "weights_only" not in msg.lower().replace(" ", "_") and "trusted" not in msg, msg
    msg = one_line_error(run_cli("export", "--fp", "--model", "cifar_resnet20", "--checkpoint", ck,
                                 "--out", tmp_path / "m.onnx"))
    assert "truncated or not a PyTorch checkpoint" in msg and "weights_only" not in msg


def test_pickled_module_is_refused_without_unpickling(tmp_path):
    ck = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), ck)
    with pytest.raises(MixqError, match=r"pickles torch.nn.modules.container.Sequential, not just tensors") as e:
        load_model("cifar_resnet20", ck)
    assert "weights_only" not in str(e.value)


def test_a_grid_that_does_not_fit_its_container_is_refused(r20, r20_w8, tmp_path):
    """An 8-bit symmetric activation edited to unsigned [0, 255] validated, exported, passed check, and the
    graph's INT8 QuantizeLinear saturated at 127 where PyTorch kept 255 (review, 2026-11-30)."""
    d = _copy(r20_w8, tmp_path / "unsigned8")

    def edit(m: dict[str, Any]) -> None:
        _record(m, ACT).update(signed=False, qmin=0, qmax=255)

    _edit_json(d, edit)
    with pytest.raises(MixqError, match=rf"quantizer {ACT}: its grid \[0, 255\] does not fit the INT8"):
        load_quantized(r20[0], d)
