"""GraphIndex: the one ONNX graph index check, verify and trt.inspect read (quantizers by metadata, not names)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx.errors import MixqError
from mixq_onnx.onnx.graph import GraphIndex, load_model
from mixq_onnx.onnx.passes import expose_outputs, set_input_shapes

ROOT = Path(__file__).resolve().parent.parent


def _meta(node, **kv):
    for k, v in kv.items():
        node.metadata_props.add(key=k, value=v)
    return node


def model(clip_quantizer: str = "act0") -> onnx.ModelProto:
    """x -> Clip -> Q -> DQ -> Conv(DQ(W int8), Constant bias) -> y, the exporter's metadata on the Q/DQ/Clip
    nodes, whose names say nothing about their quantizer."""
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.float32(-0.8), "lo"), numpy_helper.from_array(np.float32(0.7), "hi"),
             numpy_helper.from_array(np.arange(72, dtype=np.int8).reshape(2, 4, 3, 3) - 36, "w_int"),
             numpy_helper.from_array(np.full(2, 0.01, np.float32), "w_s")]
    bias = numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "bias")
    nodes = [
        _meta(helper.make_node("Clip", ["x", "lo", "hi"], ["xc"], name="n1"), **{"mixq.quantizer": clip_quantizer,
                                                                                "mixq.bits": "4"}),
        _meta(helper.make_node("QuantizeLinear", ["xc", "s", "z"], ["xq"], name="n2"),
              **{"mixq.quantizer": "act0", "mixq.bits": "4"}),
        _meta(helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="n3"),
              **{"mixq.quantizer": "act0", "mixq.bits": "4"}),
        _meta(helper.make_node("DequantizeLinear", ["w_int", "w_s"], ["w"], name="n4", axis=0),
              **{"mixq.quantizer": "conv.weight", "mixq.bits": "8"}),
        helper.make_node("Constant", [], ["b"], name="n5", value=bias),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], name="n6", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    m.metadata_props.add(key="mixq.layout", value="dq-scales")
    return m


def test_structure():
    ix = GraphIndex(model())
    assert [n.name for n in ix.nodes] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert ix.producer["xq"].name == "n2" and "x" not in ix.producer
    assert [n.name for n in ix.users("xq")] == ["n3"] and ix.users("nothing") == []
    assert ix.produced_by("w", "DequantizeLinear").name == "n4" and ix.produced_by("w", "Clip") is None
    assert ix.by_name["n6"].op_type == "Conv" and ix.inputs == ["x"] and ix.outputs == ["y"]
    assert ix.opset() == 21 and ix.model_meta("mixq.layout") == "dq-scales" and ix.model_meta("nope", "d") == "d"
    assert ix.label(ix.by_name["n6"]) == "n6" and ix.attr(ix.by_name["n4"], "axis") == 0
    assert ix.attr(ix.by_name["n4"], "block_size", 0) == 0


def test_constants_from_initializers_and_constant_nodes():
    ix = GraphIndex(model())
    assert ix.is_constant("w_int") and ix.is_constant("b") and not ix.is_constant("xd")
    np.testing.assert_array_equal(ix.value("b"), [0.5, -0.5])
    assert ix.value("w_int").dtype == np.int8 and ix.value("w_int").shape == (2, 4, 3, 3)
    assert ix.value("xd") is None and ix.value("") is None
    assert ix.value("s") is ix.value("s")  # converted once
    with pytest.raises(ValueError):
        ix.value("w_s")[0] = 1.0  # shared with every reader: read-only
    assert ix.const_dtype("w_int") == TensorProto.INT8 and ix.const_dtype("b") == TensorProto.FLOAT
    assert ix.const_dtype("xd") is None
    assert ix.const_dims("w_int") == [2, 4, 3, 3] and ix.const_dims("b") == [2] and ix.const_dims("x") is None
    assert {"w", "w_int", "b", "s"} <= ix.folded_constants() and "xd" not in ix.folded_constants()


def test_quantizers_by_metadata_not_names():
    ix = GraphIndex(model())
    n = ix.by_name
    assert ix.quantizer_of(n["n2"]) == "act0" and ix.bits_of(n["n2"]) == 4 and ix.bits_of(n["n4"]) == 8
    assert ix.quantizer_of(n["n6"]) is None and ix.bits_of(n["n6"]) is None and ix.quantizer_of(None) is None
    assert ix.meta(n["n4"]) == {"mixq.quantizer": "conv.weight", "mixq.bits": "8"}
    assert {k: [x.name for x in v] for k, v in ix.quantizer_nodes().items()} == {
        "act0": ["n2", "n3"], "conv.weight": ["n4"]}
    assert list(ix.quantizer_nodes(["Clip"])) == ["act0"]
    assert ix.quantizer_input(n["n2"]) == "x"  # behind the quantizer's own range Clip
    other = GraphIndex(model(clip_quantizer="act1"))  # a Clip of another quantizer is part of the float graph
    assert other.quantizer_input(other.by_name["n2"]) == "xc"


def test_shapes_with_pinned_inputs_and_inference():
    m = model()
    assert GraphIndex(m).shapes["x"] == [-1, 4, 5, 5]
    ix = GraphIndex(set_input_shapes(m, {"x": [3, 4, 5, 5]}), infer_shapes=True)
    assert ix.shapes["x"] == [3, 4, 5, 5] and ix.shapes["y"] == [3, 2, 5, 5] and ix.shapes["b"] == [2]
    assert ix.shapes["w_int"] == [2, 4, 3, 3]


def test_load_errors(tmp_path):
    with pytest.raises(MixqError, match="ONNX model not found"):
        load_model(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(MixqError, match="cannot read ONNX model"):
        GraphIndex.load(bad)
    good = tmp_path / "good.onnx"
    onnx.save(model(), good)
    assert len(GraphIndex.load(good).nodes) == 6


def test_expose_outputs_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    m = expose_outputs(model(), ["xq", "xc", "y"])
    assert [o.name for o in m.graph.output] == ["y", "xq", "xc"]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 100, dtype=np.float32).reshape(1, 4, 5, 5)
    y, xq, xc = sess.run(None, {"x": x})
    np.testing.assert_array_equal(xc, np.clip(x, -0.8, 0.7))
    assert xq.dtype == np.int8 and y.shape == (1, 2, 5, 5)


def test_consumers_use_the_index_not_node_names():
    """check, verify and trt.inspect find quantizers through `mixq.quantizer`, and keep no index of their own."""
    for rel in ("mixq_onnx/onnx/check.py", "mixq_onnx/onnx/verify.py", "mixq_onnx/trt/inspect.py"):
        src = (ROOT / rel).read_text()
        assert not re.search(r"\.name\.r?split\(", src), rel
        assert "metadata_props" not in src and "graph.initializer" not in src, rel
