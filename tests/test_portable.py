"""Result folders are portable: quant.json records the model file and the checkpoint by absolute path and
sha256, so a folder reads the same from any directory, moved files are given back with --model/--checkpoint
(checked against the recorded sha256), and every output follows the user's umask."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_NET_PY as NET
from conftest import one_line_error

from mixq_onnx.errors import MixqError
from mixq_onnx.models import load_model
from mixq_onnx.quant import QuantConfig, quantize, save_quantized
from mixq_onnx.quant.io import folder_model, load_quantized_dir, read_quant_json
from mixq_onnx.utils import atomic_write_json, current_umask


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _npz(path: Path, n: int = 20, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y=np.arange(n) % 10)
    return path


@pytest.fixture
def py_world(tmp_path, monkeypatch, run_cli):
    """work/ holds my_model.py and its checkpoint; quantized there with the relative spec 'my_model.py:make'
    through the CLI (calib + quantize); other/ is a second working directory beside it."""
    torch.set_num_threads(1)
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    (work / "my_model.py").write_text(NET.format(side_effect=""))
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    torch.manual_seed(0)
    torch.save(load_model("my_model.py:make", random_init=True).state_dict(), work / "ck.pt")
    flags = ["--model", "my_model.py:make", "--checkpoint", "ck.pt", "--input-size", "16"]
    r = run_cli("calib", "--generator", "noise", "--num", "8", "--cache-root", "cache", "-q", *flags)
    assert r.code == 0, r.err
    cache = r.last_line
    r = run_cli("quantize", *flags, "--calib", cache, "--method", "rtn", "--wbits", "8", "--abits", "8",
                "--out", "q", "-q")
    assert r.code == 0, r.err
    _npz(other / "d.npz")
    return {"work": work, "other": other, "q": work / "q", "monkeypatch": monkeypatch}


def test_quant_json_records_absolute_paths_and_sha256(py_world):
    work = py_world["work"]
    src = read_quant_json(py_world["q"])["model"]
    assert src["spec"] == f"{work.resolve() / 'my_model.py'}:make"
    assert src["model_sha256"] == _sha(work / "my_model.py")
    assert src["checkpoint"] == str((work / "ck.pt").resolve()) and src["checkpoint_sha256"] == _sha(work / "ck.pt")


def test_py_folder_exports_from_another_directory(py_world, run_cli):
    work, other = py_world["work"], py_world["other"]
    py_world["monkeypatch"].chdir(other)
    q = os.path.relpath(py_world["q"])  # ../work/q
    # the safety rule holds from anywhere: the folder's code runs only when the user names it
    msg = one_line_error(run_cli("export", "--quantized", q, "--out", "m.onnx"))
    assert "names model code" in msg and "--model" in msg and not Path("m.onnx").exists()
    r = run_cli("export", "--quantized", q, "--model", "../work/my_model.py:make", "--out", "m.onnx")
    assert r.code == 0, r.err
    assert Path("m.onnx").stat().st_size > 0
    r = run_cli("export", "--quantized", q, "--trust-model-code", "--out", "t.onnx")
    assert r.code == 0, r.err
    assert Path("t.onnx").read_bytes() == Path("m.onnx").read_bytes()
    # eval and verify read the same folder from here too, with the checkpoint found where it was recorded
    r = run_cli("eval", "--quantized", q, "--model", f"{work}/my_model.py:make", "--data", "d.npz", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.last_line)
    assert res["n"] == 20 and res["agreement"] >= 90
    r = run_cli("verify", "m.onnx", "--quantized", q, "--model", "../work/my_model.py:make", "--data", "d.npz",
                "--json")
    assert r.code == 0, r.err
    assert json.loads(r.last_line)["ok"]


def test_moved_model_file_and_checkpoint_are_found_by_their_sha256(py_world, run_cli, tmp_path):
    work, other = py_world["work"], py_world["other"]
    moved = tmp_path / "elsewhere"
    shutil.move(str(work), str(moved))  # the folder, the model file and the checkpoint all move
    py_world["monkeypatch"].chdir(other)
    q = moved / "q"
    msg = one_line_error(run_cli("export", "--quantized", q, "--model", f"{moved}/my_model.py:make",
                                 "--out", "m.onnx"))
    assert f"checkpoint recorded in {q / 'quant.json'} is missing: {work / 'ck.pt'}" in msg
    assert "--checkpoint FILE" in msg and _sha(moved / "ck.pt")[:12] in msg
    msg = one_line_error(run_cli("export", "--quantized", q, "--trust-model-code", "--out", "m.onnx"))
    assert f"model file not found: {work / 'my_model.py'}" in msg and "--model PATH.py:make" in msg
    r = run_cli("export", "--quantized", q, "--model", f"{moved}/my_model.py:make", "--checkpoint",
                moved / "ck.pt", "--out", "m.onnx")
    assert r.code == 0, r.err
    assert Path("m.onnx").stat().st_size > 0
    r = run_cli("eval", "--quantized", q, "--model", f"{moved}/my_model.py:make", "--checkpoint", moved / "ck.pt",
                "--data", "d.npz", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.last_line)["agreement"] >= 90


@pytest.fixture
def zoo_world(tmp_path, run_cli):
    """cifar_resnet20 with its weights in a checkpoint file, quantized W8A8 (rtn) through the CLI."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.save(load_model("cifar_resnet20", random_init=True).state_dict(), tmp_path / "r20.pt")
    flags = ["--model", "cifar_resnet20", "--checkpoint", tmp_path / "r20.pt"]
    r = run_cli("calib", "--generator", "noise", "--num", "8", "--cache-root", tmp_path / "cache", "-q", *flags)
    assert r.code == 0, r.err
    r = run_cli("quantize", *flags, "--calib", r.last_line, "--method", "rtn", "--wbits", "8", "--abits", "8",
                "--out", tmp_path / "q", "-q")
    assert r.code == 0, r.err
    return tmp_path


def test_moved_folder_and_checkpoint_with_checkpoint_override(zoo_world, run_cli):
    d = zoo_world
    data = _npz(d / "d.npz", 20, 32)
    r = run_cli("eval", "--quantized", d / "q", "--data", data, "--json")
    assert r.code == 0, r.err
    before = json.loads(r.last_line)
    new = d / "moved"
    new.mkdir()
    shutil.move(str(d / "q"), str(new / "q"))
    shutil.move(str(d / "r20.pt"), str(new / "weights.pt"))  # renamed too: found by content, not name
    msg = one_line_error(run_cli("eval", "--quantized", new / "q", "--data", data))
    assert "is missing" in msg and "--checkpoint FILE" in msg
    r = run_cli("eval", "--quantized", new / "q", "--checkpoint", new / "weights.pt", "--data", data, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.last_line) == before  # the same model, the same numbers
    r = run_cli("export", "--quantized", new / "q", "--checkpoint", new / "weights.pt", "--out", d / "m.onnx")
    assert r.code == 0, r.err
    r = run_cli("verify", d / "m.onnx", "--quantized", new / "q", "--checkpoint", new / "weights.pt",
                "--data", data, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.last_line)["ok"]
    # the Python API takes the same override
    opts = folder_model(new / "q", checkpoint=new / "weights.pt")
    assert opts.spec == "cifar_resnet20" and opts.checkpoint == str(new / "weights.pt")


def test_wrong_checkpoint_override_is_refused(zoo_world, run_cli):
    d = zoo_world
    sd = torch.load(d / "r20.pt", weights_only=True)
    torch.save({k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}, d / "other.pt")
    want, have = _sha(d / "r20.pt")[:12], _sha(d / "other.pt")[:12]
    for cmd in (["export", "--out", d / "m.onnx"], ["eval", "--data", _npz(d / "d.npz", 4, 32)]):
        msg = one_line_error(run_cli(*cmd, "--quantized", d / "q", "--checkpoint", d / "other.pt"))
        assert f"checkpoint {d / 'other.pt'} does not match" in msg and want in msg and have in msg, msg
    assert not (d / "m.onnx").exists()


def test_wrong_model_file_override_is_refused_before_it_runs(py_world, run_cli):
    work, other = py_world["work"], py_world["other"]
    py_world["monkeypatch"].chdir(other)
    marker = other / "RAN"
    (other / "my_model.py").write_text(NET.format(side_effect=f"pathlib.Path({str(marker)!r}).write_text('ran')"))
    msg = one_line_error(run_cli("export", "--quantized", work / "q", "--model", "my_model.py:make",
                                 "--out", "m.onnx"))
    want, have = _sha(work / "my_model.py")[:12], _sha(other / "my_model.py")[:12]
    assert "model file my_model.py does not match" in msg and want in msg and have in msg, msg
    assert not marker.exists() and not (other / "m.onnx").exists()
    # an unchanged copy of the file is accepted wherever it lies
    shutil.copy(work / "my_model.py", other / "my_model.py")
    r = run_cli("export", "--quantized", work / "q", "--model", "my_model.py:make", "--out", "m.onnx")
    assert r.code == 0, r.err


def test_recorded_model_file_edited_in_place_is_refused(py_world):
    work = py_world["work"]
    (work / "my_model.py").write_text(NET.format(side_effect="# edited"))
    with pytest.raises(MixqError, match=r"model file .*my_model.py does not match .*quant.json: its sha256 is"):
        load_quantized_dir(py_world["q"], trust_model_code=True)


def test_old_folder_without_model_sha256_still_loads(py_world, run_cli):
    """A folder from before the hashes (relative spec, no model_sha256) loads as before, with no check."""
    work, other = py_world["work"], py_world["other"]
    meta = json.loads((py_world["q"] / "quant.json").read_text())
    meta["model"]["spec"] = "my_model.py:make"
    del meta["model"]["model_sha256"]
    (py_world["q"] / "quant.json").write_text(json.dumps(meta))
    r = run_cli("export", "--quantized", "q", "--trust-model-code", "--out", "a.onnx")
    assert r.code == 0 and "warning" not in r.err, r.err
    py_world["monkeypatch"].chdir(other)
    r = run_cli("export", "--quantized", work / "q", "--model", f"{work}/my_model.py:make", "--out", "b.onnx")
    assert r.code == 0 and "warning" not in r.err, r.err


# ----------------------------------------------------------------------------- umask
@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_follow_the_umask(umask, tmp_path, run_cli, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(4, 3, 32, 32), progress=False)
    out = save_quantized(q, tmp_path / "deep" / "q")
    assert _mode(out) == dir_mode and _mode(tmp_path / "deep") == dir_mode
    assert {p.name: _mode(p) for p in out.iterdir()} == {"quant.json": file_mode, "weights.safetensors": file_mode}
    r = run_cli("export", "--quantized", out, "--out", tmp_path / "m.onnx")
    assert r.code == 0, r.err
    assert _mode(tmp_path / "m.onnx") == file_mode
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert _mode(tmp_path / "x.json") == file_mode
    # replacing a file keeps the mode the user gave it
    os.chmod(tmp_path / "x.json", 0o600)
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert _mode(tmp_path / "x.json") == 0o600
