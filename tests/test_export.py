"""QDQ export through torch.onnx + onnx-ir, checked with onnxruntime (exact QDQ semantics)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import random_r20_rtn

from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.verify import ort_session, verify_onnx
from mixq_onnx.quant import QuantConfig, quantize, quantizers
from mixq_onnx.quant.graph import shared_quantizers


@pytest.fixture(scope="module")
def r20_w4a4():
    return random_r20_rtn(16)[1]


@pytest.fixture(scope="module")
def exported(r20_w4a4, tmp_path_factory):
    return export_qdq(r20_w4a4, tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_graph_structure(exported, r20_w4a4):
    p = exported
    m = onnx.load(p)
    assert m.ir_version == 10 and {o.domain: o.version for o in m.opset_import}[""] == 21
    ops = Counter(n.op_type for n in m.graph.node)
    qs = quantizers(r20_w4a4)
    n_act = sum(q.kind == "act" for q in qs.values())
    n_w = sum(q.kind == "weight" for q in qs.values())
    # a shared quantizer (a block input feeding conv1 and the residual add) has one Q and two DQs: the codes
    # for the conv (integer layout, scale 1) and the values for the add
    n_shared = len(shared_quantizers(r20_w4a4))
    assert n_shared == 9  # every residual block of ResNet-20, the two subsampling ones too
    assert ops["QuantizeLinear"] == n_act and ops["DequantizeLinear"] == n_act + n_w + n_shared
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.name.endswith(".weight/DequantizeLinear"):
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8  # pre-quantized integers, no Q on weights
        if n.op_type == "QuantizeLinear":
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and int(zp) == 0
    pads = {n.output[0] for n in m.graph.node if n.op_type == "Pad"}
    assert not any(n.op_type == "Conv" and n.input[0] in pads for n in m.graph.node)  # Q/DQ sit on the Conv
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_dq_outputs_on_declared_grid(exported, r20_w4a4):
    p = exported
    m = onnx.load(p)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and not n.name.endswith(".weight/DequantizeLinear")]
    sess = ort_session(p, optimized=False, extra_outputs=[n.output[0] for n in dqs])
    x = get_preprocessing(r20_w4a4)(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)).numpy()
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, {"input": x})))
    qs = quantizers(r20_w4a4)
    for n in dqs:
        q = qs[n.name.rsplit("/", 1)[0]]
        codes = outs[n.output[0]] / inits[n.input[1]]
        assert np.allclose(codes, np.round(codes), atol=1e-4)
        lo, hi = q.qrange
        assert codes.min() >= lo - 1e-4 and codes.max() <= hi + 1e-4, (q.name, lo, hi)


def test_verify_matches_pytorch(exported, r20_w4a4):
    p = exported
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    rep = verify_onnx(p, r20_w4a4, images)
    assert rep.code_mismatch_fraction == 0.0  # same float input -> same integer code at every quantizer
    # the default integer layout is exact in onnxruntime: end to end too, not just quantizer by quantizer
    assert rep.propagated_code_mismatch == 0.0 and rep.max_abs_diff == 0.0 and rep.top1_agreement == 100.0


def test_cli_export_errors(tmp_path, run_cli):
    r = run_cli("export", "--quantized", tmp_path / "missing", "--out", tmp_path / "m.onnx")
    assert r.code == 2 and "--quantized" in r.err and "missing does not exist" in r.err and not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- INT4 weight-only (W4A16)
@pytest.fixture(scope="module")
def deit_int4(tmp_path_factory):
    """deit_tiny W4A16, block 64, exported through the CLI; and the same quantization done in Python."""
    from mixq_onnx.cli import main
    from mixq_onnx.quant.graph import example_input

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("int4")
    path = d / "deit_int4.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", "--int4-weight-only", "--block-size", "64", "--model", "deit_tiny_patch16_224",
              "--random-weights", "--out", str(path)])
    assert e.value.code == 0
    model = load_model("deit_tiny_patch16_224", random_init=True)
    q = quantize(model, QuantConfig.int4_weight_only(64), example_input(model), progress=False)
    return path, q


def test_int4_weight_only_graph(deit_int4):
    from mixq_onnx.onnx.check import check_model, report

    path, q = deit_int4
    m = onnx.load(path)
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["QuantizeLinear"] == 0  # W4A16: no activation Q/DQ
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    gemms = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in producer
             and producer[n.input[1]].op_type == "DequantizeLinear"]
    n_lin = sum(isinstance(mod, torch.nn.Linear) for mod in load_model("deit_tiny_patch16_224", random_init=True).modules())
    assert len(gemms) == n_lin == len(quantizers(q))  # every Linear (K = 192 or 768, both divisible by 64)
    for n in gemms:
        dq = producer[n.input[1]]
        w = inits[dq.input[0]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert w.data_type == onnx.TensorProto.INT4 and attrs["block_size"] == 64
        k_axis = (1 if any(a.name == "transB" and a.i for a in n.attribute) else 0) if n.op_type == "Gemm" else 0
        assert attrs["axis"] == k_axis
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        assert scale.shape[k_axis] * 64 == w.dims[k_axis] and scale.shape[1 - k_axis] == w.dims[1 - k_axis]
        codes = onnx.numpy_helper.to_array(w).astype(np.int8)
        assert codes.min() >= -7 and codes.max() <= 7  # narrow symmetric INT4
    assert not any(producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"
                   for n in m.graph.node if n.op_type == "Conv")  # convolutions stay float
    rep = report(check_model(path))
    assert rep["ok"], rep


def test_int4_weight_only_verify_and_roundtrip(deit_int4, tmp_path):
    from mixq_onnx.quant import load_quantized_dir, save_quantized

    path, q = deit_int4
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    rep = verify_onnx(path, q, images)  # CLI graph against the Python quantization: same integers and scales
    assert rep.top1_agreement == 100.0 and rep.max_abs_diff < 1e-4, rep
    save_quantized(q, tmp_path / "q")
    q2 = load_quantized_dir(tmp_path / "q")
    x = get_preprocessing(q)(images)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    for name, w in quantizers(q).items():
        w2 = quantizers(q2)[name]
        assert w2.block_size == 64 and torch.equal(w.int_weight, w2.int_weight) and torch.equal(w.scale, w2.scale)


def test_int4_weight_only_errors(tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--int4-weight-only", "--model", "cifar_resnet20", "--random-weights", "--block-size", "128",
                "--out", out)
    assert r.code == 2 and "divides the input features of no Linear layer" in r.err and not out.exists()
    r = run_cli("export", "--int4-weight-only", "--fp", "--model", "cifar_resnet20", "--random-weights", "--out", out)
    assert r.code == 2 and "exclude each other" in r.err and not out.exists()


def test_the_same_model_exports_the_same_bytes_twice_in_one_process(tmp_path):
    """torch.onnx writes each node's Python stack (absolute source paths, a per-process FX counter) into the
    graph: a second export in one process gave other bytes, and a plan built from the first no longer
    matched a re-export (review, 2026-11-30). The exporter drops it."""
    _, q = random_r20_rtn()
    a, b = export_qdq(q, tmp_path / "a.onnx"), export_qdq(q, tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    keys = {p.key for n in onnx.load(a).graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys


def test_verify_fails_a_weight_only_graph_with_a_wrong_block_scale(deit_int4, tmp_path):
    """A weight-only graph has no activation quantizer, so nothing but top-1 was judged: one INT4 block scale
    of the head 1.5x too large passed. The teacher-forced outputs (one segment, input to logits) catch it."""
    import onnx
    from onnx import numpy_helper

    path, q = deit_int4
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert verify_onnx(path, q, images).failures() == []
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == "head.weight.scale")
    a = numpy_helper.to_array(t).copy()
    a.reshape(-1)[0] *= 1.5
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    bad = verify_onnx(tmp_path / "bad.onnx", q, images).failures()
    assert any("after the last quantizer" in f for f in bad), bad
