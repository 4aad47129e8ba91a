"""export/verify bad input: one-line error naming the problem, exit code 2, never a half-written .onnx."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL_NET_PY, random_r20_rtn

from mixq_onnx.models import load_model
from mixq_onnx.quant import QuantConfig, quantize, save_quantized

UNSUPPORTED = SMALL_NET_PY.format(side_effect="import torch") + '''

class Unsupported(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y + torch.histc(y, bins=4).mean()  # no ONNX translation
        return self.fc(y.mean((2, 3)))


def net():
    return Unsupported()
'''


@pytest.fixture(scope="module")
def r20_dir(tmp_path_factory) -> Path:
    return save_quantized(random_r20_rtn(8)[1], tmp_path_factory.mktemp("q") / "r20")


def _one_line_error(r) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.code, r.err)
    return lines[0]


def _no_onnx_left(d: Path) -> None:
    assert not [p for p in d.iterdir() if p.suffix == ".onnx" or ".onnx" in p.name], list(d.iterdir())


def test_quant_json_of_another_model(r20_dir, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--quantized", r20_dir, "--model", "cifar_resnet32", "--random-weights", "--out", out)
    msg = _one_line_error(r)
    assert "does not match the model" in msg and "quant.json" in msg
    _no_onnx_left(tmp_path)


def test_missing_weights_file(r20_dir, tmp_path, run_cli):
    broken = tmp_path / "broken"
    shutil.copytree(r20_dir, broken)
    (broken / "weights.safetensors").unlink()
    out = tmp_path / "m.onnx"
    msg = _one_line_error(run_cli("export", "--quantized", broken, "--out", out))
    assert "weights.safetensors" in msg
    _no_onnx_left(tmp_path)


def test_missing_quant_json_and_missing_onnx(r20_dir, tmp_path, run_cli):
    msg = _one_line_error(run_cli("export", "--quantized", tmp_path, "--out", tmp_path / "m.onnx"))
    assert "quant.json" in msg
    msg = _one_line_error(run_cli("verify", tmp_path / "nope.onnx", "--quantized", r20_dir, "--data", tmp_path))
    assert "nope.onnx" in msg
    _no_onnx_left(tmp_path)


def test_unsupported_operator(tmp_path, run_cli):
    src = tmp_path / "unsup.py"
    src.write_text(UNSUPPORTED)
    spec = f"{src}:net"
    model = load_model(spec, random_init=True, input_size=(3, 16, 16))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(4, 3, 16, 16), progress=False)
    qdir = save_quantized(q, tmp_path / "q")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    msg = _one_line_error(run_cli("export", "--quantized", qdir, "--trust-model-code", "--out", out_dir / "m.onnx"))
    assert "aten.histc" in msg and "not supported" in msg
    _no_onnx_left(out_dir)
    msg = _one_line_error(run_cli("export", "--fp", "--model", spec, "--input-size", "3,16,16", "--out",
                                  out_dir / "fp.onnx"))
    assert "aten.histc" in msg
    _no_onnx_left(out_dir)
