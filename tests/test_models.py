from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RESNET8, RESNET20, RESNET56, TEST_NPZ, need_shared

from mixq_onnx.errors import MixqError
from mixq_onnx.models import ZOO, get_preprocessing, load_model


@pytest.mark.parametrize("name", ZOO)
def test_zoo_builds_and_runs(name):
    m = load_model(name, random_init=True)
    pre = get_preprocessing(m)
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert m(pre(x)).shape == (2, 10)


def _top1(model, n=1000):
    d = np.load(TEST_NPZ)
    idx = np.arange(0, len(d["y"]), len(d["y"]) // n)[:n]
    x, y = torch.from_numpy(d["x"][idx]), torch.from_numpy(d["y"][idx])
    with torch.no_grad():
        return (model(get_preprocessing(model)(x)).argmax(1) == y).float().mean().item() * 100


@need_shared(RESNET20, RESNET56, RESNET8, TEST_NPZ)
@pytest.mark.parametrize("spec,ck,floor", [
    ("cifar_resnet20", RESNET20, 78), ("cifar_resnet56", RESNET56, 80), ("mlperf_tiny_resnet8", RESNET8, 73),
])
def test_real_checkpoints_load_and_classify(spec, ck, floor):
    m = load_model(spec, ck)
    assert _top1(m) > floor


def test_checkpoint_errors(tmp_path):
    with pytest.raises(MixqError, match="not found"):
        load_model("cifar_resnet20", tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MixqError, match="cannot read checkpoint"):
        load_model("cifar_resnet20", bad)
    other = tmp_path / "r8.pt"
    torch.save(load_model("mlperf_tiny_resnet8", random_init=True).state_dict(), other)
    with pytest.raises(MixqError, match="does not match the model: missing"):
        load_model("cifar_resnet20", other)


def test_wrapped_prefixed_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = load_model("cifar_resnet20", random_init=True)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.th")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for f in ("w.th", "w.safetensors"):
        m = load_model("cifar_resnet20", tmp_path / f)
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_user_factory_and_overrides(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch.nn as nn\ndef make(num_classes=4):\n    return nn.Sequential(nn.Conv2d(3,4,3), nn.Flatten())\n")
    m = load_model(f"{f}:make", random_init=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=16)
    pre = get_preprocessing(m)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.input_size == (3, 16, 16)
    with pytest.raises(MixqError, match="unknown model") as e:
        load_model("definitely_not_a_model")
    assert "did you mean" not in str(e.value)
    with pytest.raises(MixqError, match="unknown model 'cifar_resnt20': did you mean cifar_resnet20 or"):
        load_model("cifar_resnt20")
    with pytest.raises(MixqError, match="--checkpoint"):
        load_model("cifar_resnet20")
    with pytest.raises(MixqError, match="--checkpoint"):
        load_model("resnet18")  # timm name, no weights in the local HF cache
