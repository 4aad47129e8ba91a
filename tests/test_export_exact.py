"""The `integer` export layout is bit-identical to PyTorch in onnxruntime; `dq-scales` keeps the scales on
the DQ nodes. Real ResNet-20 (`../shared`), real images."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import RESNET20, TEST_NPZ, TRAIN_NPZ, need_shared

from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, quantize, quantizers
from mixq_onnx.quant.modules import QUANT_LAYERS


def _npz_images(path, n: int) -> torch.Tensor:
    d = np.load(path)
    return torch.from_numpy(d["x"][:n])


@pytest.fixture(scope="module")
def r20_real():
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", RESNET20)
    calib = get_preprocessing(model)(_npz_images(TRAIN_NPZ, 128))
    return {b: quantize(model, QuantConfig(wbits=w, abits=a, method="rtn", scale_grid=20), calib, progress=False)
            for b, (w, a) in {"w8a8": (8, 8), "w2a4": (2, 4)}.items()}


@need_shared(RESNET20, TRAIN_NPZ, TEST_NPZ)
@pytest.mark.parametrize("bits", ["w8a8", "w2a4"])
def test_integer_layout_is_bit_exact_on_real_images(r20_real, bits, tmp_path):
    q = r20_real[bits]
    path = export_qdq(q, tmp_path / "m.onnx")
    assert report(check_model(path))["ok"]
    rep = verify_onnx(path, q, _npz_images(TEST_NPZ, 1000))
    # no tolerance: same logits, same top-1, the same integer code at every quantizer, both onnxruntime runs
    assert rep.max_abs_diff == 0.0 and rep.top1_agreement == 100.0, rep
    assert rep.propagated_code_mismatch == 0.0 and rep.code_mismatch_fraction == 0.0, rep.first_divergence
    assert rep.optimized_max_abs_diff == 0.0 and not rep.warnings and rep.layout == "integer"


@need_shared(RESNET20, TRAIN_NPZ, TEST_NPZ)
def test_integer_layout_structure(r20_real, tmp_path):
    """Every quantized Conv/Gemm reads scale-1 DQs and is followed by Mul(fp32(s_x * s_w)) from the same
    quantizer objects PyTorch uses, then Add(bias)."""
    q = r20_real["w8a8"]
    m = onnx.load(export_qdq(q, tmp_path / "m.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    layers = {name: mod for name, mod in q.named_modules() if isinstance(mod, QUANT_LAYERS)}
    qs = quantizers(q)
    seen = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        layer = n.name.rsplit("/", 1)[0]
        mod = next(v for k, v in layers.items() if v.name == layer or k == layer)
        adq, wdq = prod[n.input[0]], prod[n.input[1]]
        assert float(inits[adq.input[1]]) == 1.0 and np.all(inits[wdq.input[1]] == 1.0)
        assert inits[wdq.input[0]].dtype == np.int8 and len(n.input) == 2  # bias moved after the rescale
        qn = prod[adq.input[0]]
        if qn.op_type == "Reshape":  # the classifier: its Q sits right after the integer pool, ahead of the flatten
            qn = prod[qn.input[0]]
            src = {p.key: p.value for p in qn.metadata_props}["mixq.requantize"]
            want = np.float32(qs[f"{mod.name}.input"].scale.detach()) / np.float32(qs[src].scale.detach())
        else:
            want = float(qs[f"{mod.name}.input"].scale)
        assert qn.op_type == "QuantizeLinear" and float(inits[qn.input[1]]) == float(want)
        (mul,) = users[n.output[0]]
        assert mul.op_type == "Mul"
        assert np.array_equal(inits[mul.input[1]].reshape(-1), mod.rescale().numpy())  # bit for bit
        (add,) = users[mul.output[0]]
        assert add.op_type == "Add" and np.array_equal(inits[add.input[1]].reshape(-1), mod.bias.detach().numpy())
        seen += 1
    assert seen == len(layers) == 20
    assert m.metadata_props[[p.key for p in m.metadata_props].index("mixq.layout")].value == "integer"


@need_shared(RESNET20, TRAIN_NPZ, TEST_NPZ)
def test_dq_scales_layout(r20_real, tmp_path):
    """The ModelOpt-style layout: scales on the DQ nodes, faithful Q/DQ (same input, same code), no Mul."""
    q = r20_real["w8a8"]
    path = export_qdq(q, tmp_path / "m.onnx", layout="dq-scales")
    m = onnx.load(path)
    assert report(check_model(path))["ok"] and not any(n.op_type == "Mul" for n in m.graph.node)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    qs = quantizers(q)
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            name = n.name.rsplit("/", 1)[0]
            assert np.array_equal(inits[n.input[1]].reshape(-1), qs[name].scale.detach().reshape(-1).numpy())
    rep = verify_onnx(path, q, _npz_images(TEST_NPZ, 200))
    assert rep.code_mismatch_fraction == 0.0 and rep.segment_step_diff < 1e-2


def test_asymmetric_integer_layout_is_exact(tmp_path):
    """Zero points: DQ(q, 1, zp) gives q - zp on both sides (random weights, ReLU network)."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    g = torch.Generator().manual_seed(0)
    q = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", symmetric=False, scale_grid=8),
                 torch.randn(16, 3, 32, 32, generator=g), progress=False)
    path = export_qdq(q, tmp_path / "m.onnx")
    m = onnx.load(path)
    assert sum(n.op_type == "Mul" for n in m.graph.node) == 20
    rep = verify_onnx(path, q, torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=g))
    assert rep.max_abs_diff == 0.0 and rep.propagated_code_mismatch == 0.0, rep.first_divergence


def test_unknown_layout(r20_w4a4_random, tmp_path):
    from mixq_onnx.errors import MixqError

    with pytest.raises(MixqError, match="unknown layout"):
        export_qdq(r20_w4a4_random, tmp_path / "m.onnx", layout="fancy")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def r20_w4a4_random():
    model = load_model("cifar_resnet20", random_init=True)
    return quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", scale_grid=8),
                    torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), progress=False)
