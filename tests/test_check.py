"""`check`: one planted violation per TensorRT QDQ rule, each reported naming its node."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx.onnx.check import lint


def _t(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def clean_model(**kw):
    """x -Q/DQ-> Conv(W: int8 DQ per-channel axis 0) -> Add(identity: Q/DQ of x) -> Relu -> y."""
    inits = [
        _t("s", np.float32(0.05)), _t("z", np.int8(0)),
        _t("w_int", np.ones((4, 4, 3, 3), np.int8)), _t("w_s", np.full(4, 0.01, np.float32)),
        _t("b", np.zeros(4, np.float32)),
        _t("s2", np.float32(0.06)), _t("z2", np.int8(0)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="in/Q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="in/DQ"),
        helper.make_node("DequantizeLinear", ["w_int", "w_s"], ["w"], name="w/DQ", axis=kw.get("axis", 0)),
        helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["x", "s2", "z2"], ["iq"], name="id/Q"),
        helper.make_node("DequantizeLinear", ["iq", "s2", "z2"], ["idd"], name="id/DQ"),
        helper.make_node("Add", ["c", "idd"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", kw.get("opset", 21))])
    m.ir_version = 10
    return m


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _init(m, name):
    return next(i for i in m.graph.initializer if i.name == name)


def _rules(m):
    return {(v.rule, v.node) for v in lint(m)}


def test_clean_graph_passes():
    assert lint(clean_model()) == []


def test_nonzero_zero_point():
    m = clean_model()
    _init(m, "z").CopyFrom(_t("z", np.int8(3)))
    assert ("zero-point", "in/Q") in _rules(m)


def test_non_positive_scale():
    m = clean_model()
    _init(m, "s").CopyFrom(_t("s", np.float32(-0.1)))
    assert ("scale", "in/Q") in _rules(m)


def test_per_channel_scale_on_non_constant_input():
    m = clean_model()
    m.graph.initializer.append(_t("pc", np.full(4, 0.05, np.float32)))
    _node(m, "in/DQ").input[1] = "pc"
    _node(m, "in/DQ").attribute.append(helper.make_attribute("axis", 1))
    assert ("per-channel-input", "in/DQ") in _rules(m)


def test_wrong_per_channel_axis():
    m = clean_model(axis=1)
    assert ("per-channel-axis", "w/DQ") in _rules(m)


def test_conv_input_without_qdq():
    m = clean_model()
    _node(m, "conv").input[0] = "x"
    assert ("unquantized-input", "conv") in _rules(m)


def test_qdq_between_conv_and_add():
    m = clean_model()
    m.graph.node.extend([
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="c/Q"),
        helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="c/DQ"),
    ])
    _node(m, "add").input[0] = "cd"
    m2 = helper.make_model(m.graph, opset_imports=m.opset_import)
    m2.graph.ClearField("node")
    order = ["in/Q", "in/DQ", "w/DQ", "conv", "c/Q", "c/DQ", "id/Q", "id/DQ", "add", "relu"]
    m2.graph.node.extend([_node(m, n) for n in order])
    m2.ir_version = 10
    assert ("qdq-conv-add", "add") in _rules(m2)


def test_residual_identity_without_qdq():
    m = clean_model()
    _node(m, "add").input[1] = "x"
    assert ("residual-identity", "add") in _rules(m)


def test_duplicate_qdq_pairs_on_one_tensor_warn():
    m = clean_model()
    _init(m, "s2").CopyFrom(_t("s2", np.float32(0.05)))  # the identity's Q/DQ now repeats the conv input's
    found = [v for v in lint(m) if v.rule == "duplicate-qdq"]
    assert [(v.node, v.severity) for v in found] == [("id/Q", "warning")]
    assert "'x'" in found[0].message and "in/Q" in found[0].message
    assert not [v for v in lint(m) if v.severity == "error"]  # a warning, not a failure


def test_shared_qdq_through_slice_and_pad_is_a_quantized_identity():
    """A shared quantizer's DQ sits on the tensor itself; the subsampling shortcut slices and zero-pads the
    DQ output before the add: still a quantized identity, and no duplicate pair."""
    m = clean_model()
    m.graph.initializer.extend([_t("st", np.array([0], np.int64)), _t("en", np.array([8], np.int64)),
                                _t("ax", np.array([1], np.int64)), _t("pads", np.zeros(8, np.int64))])
    m.graph.node.extend([
        helper.make_node("Slice", ["xd", "st", "en", "ax"], ["xs"], name="slice"),
        helper.make_node("Pad", ["xs", "pads"], ["xp"], name="pad"),
    ])
    _node(m, "add").input[1] = "xp"
    for n in ("id/Q", "id/DQ"):
        m.graph.node.remove(_node(m, n))
    order = ["in/Q", "in/DQ", "w/DQ", "conv", "slice", "pad", "add", "relu"]
    nodes = [_node(m, n) for n in order]
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    assert lint(m) == []
    _init(m, "pads").CopyFrom(_t("pads", np.zeros(8, np.int64)))
    m.graph.initializer.append(_t("pv", np.float32(1.0)))
    _node(m, "pad").input.append("pv")  # padding with ones is not data movement: the identity is float
    assert ("residual-identity", "add") in _rules(m)


def test_unequal_concat_scales():
    m = clean_model()
    m.graph.initializer.append(_t("s3", np.float32(0.2)))
    m.graph.node.extend([
        helper.make_node("DequantizeLinear", ["iq", "s3", "z2"], ["idd3"], name="id3/DQ"),
        helper.make_node("Concat", ["idd", "idd3"], ["cat"], name="cat", axis=1),
    ])
    m.graph.output.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["N", 8, 8, 8]))
    assert ("concat-scales", "cat") in _rules(m)


def test_int4_weights_into_conv():
    m = clean_model()
    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "w_int")
    w4 = helper.make_tensor("w_int", TensorProto.INT4, [4, 4, 3, 3], np.ones(144, np.int8).tolist())
    _init(m, "w_int").CopyFrom(w4)
    del w
    assert ("int4-conv", "conv") in _rules(m)


def test_integer_domain_clip():
    m = clean_model()
    m.graph.initializer.extend([_t("lo", np.int8(0)), _t("hi", np.int8(15))])
    m.graph.node.insert(1, helper.make_node("Clip", ["xq", "lo", "hi"], ["xqc"], name="intclip"))
    _node(m, "in/DQ").input[0] = "xqc"
    assert ("int-clip", "intclip") in _rules(m)


def test_int32_bias_dq():
    m = clean_model()
    m.graph.initializer.extend([_t("b_int", np.zeros(4, np.int32)), _t("b_s", np.full(4, 5e-4, np.float32))])
    m.graph.node.insert(3, helper.make_node("DequantizeLinear", ["b_int", "b_s"], ["bd"], name="b/DQ", axis=0))
    _node(m, "conv").input[2] = "bd"
    assert ("int32-bias", "b/DQ") in _rules(m)


def test_opset_above_24():
    m = clean_model(opset=25)
    assert any(v.rule == "opset" for v in lint(m))


def test_cli_exit_codes(tmp_path, run_cli):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(clean_model(), good)
    m = clean_model()
    _node(m, "add").input[1] = "x"
    onnx.save(m, bad)
    assert run_cli("check", good).code == 0
    r = run_cli("check", bad, "--json")
    import json

    rep = json.loads(r.last_line)
    assert r.code == 1 and not rep["ok"] and rep["violations"][0]["node"] == "add"


def int4_matmul_model(axis: int = 0):
    """W4A16: x (float) -> MatMul(W: INT4 [K=64, N=8], block scales [2, 8] along K) -> y."""
    w4 = helper.make_tensor("w_int", TensorProto.INT4, [64, 8], (np.arange(512) % 15 - 7).tolist())
    scale_shape = (2, 8) if axis == 0 else (64, 1)
    inits = [w4, _t("w_s", np.full(scale_shape, 0.01, np.float32))]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int", "w_s"], ["w"], name="w/DQ", axis=axis, block_size=32 if axis == 0 else 8),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_weight_only_int4_matmul_passes_with_float_input_as_warning():
    vs = lint(int4_matmul_model())
    assert not [v for v in vs if v.severity == "error"], vs
    assert [(v.rule, v.node, v.severity) for v in vs] == [("unquantized-input", "mm", "warning")]


def test_block_scales_on_the_wrong_axis():
    assert ("block-axis", "w/DQ") in _rules(int4_matmul_model(axis=1))


def _unit_dq(m):
    m.graph.initializer.append(_t("one", np.float32(1.0)))
    _node(m, "in/DQ").input[1] = "one"


def test_qdq_scale_pair_without_rescale():
    """Q(s) -> DQ(1) feeding a Conv that nothing rescales: every value is off by a factor s."""
    m = clean_model()
    _unit_dq(m)
    assert ("qdq-scale-pair", "in/DQ") in _rules(m)


def test_integer_layout_pair_with_rescale_passes():
    """The export's integer layout: Q(s) -> DQ(1) -> Conv -> Mul(s * s_w) is legitimate."""
    m = clean_model()
    _unit_dq(m)
    conv = _node(m, "conv")
    conv.output[0] = "acc"
    m.graph.initializer.append(_t("r", np.full((1, 4, 1, 1), 0.05 * 0.01, np.float32)))
    m.graph.node.insert(list(m.graph.node).index(conv) + 1, helper.make_node("Mul", ["acc", "r"], ["c"], name="rescale"))
    assert lint(m) == []


def test_onnx_checker_failure():
    m = clean_model()
    _node(m, "relu").op_type = "NoSuchOp"
    assert ("onnx-checker", "graph") in _rules(m)


def test_shape_inference_failure():
    m = clean_model()
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64  # declared type contradicts the Relu's
    assert ("shape-inference", "graph") in _rules(m)


def test_float_weight_without_dq():
    m = clean_model()
    m.graph.initializer.append(_t("wf", np.ones((4, 4, 3, 3), np.float32)))
    _node(m, "conv").input[1] = "wf"
    assert ("unquantized-weight", "conv") in _rules(m)


def test_integer_layout_zero_rescale():
    """The integer layout's rescale constant holds the real scales: a zero there silences a channel."""
    m = clean_model()
    _unit_dq(m)
    _init(m, "w_s").CopyFrom(_t("w_s", np.ones(4, np.float32)))  # weight DQ(W, 1) too: s_x * s_w is the Mul's
    conv = _node(m, "conv")
    conv.output[0] = "acc"
    m.graph.initializer.append(_t("r", np.array([5e-4, 0.0, 5e-4, 5e-4], np.float32).reshape(1, 4, 1, 1)))
    m.graph.node.insert(list(m.graph.node).index(conv) + 1, helper.make_node("Mul", ["acc", "r"], ["c"], name="rescale"))
    assert ("rescale", "rescale") in _rules(m)


def test_unfolded_batchnorm_after_a_quantized_layer_warns():
    """LeViT's LinearNorm before placement revision 3: a float BatchNormalization between the INT8 GEMM and the next
    quantizer, which no rule named."""
    m = clean_model()
    conv = _node(m, "conv")
    conv.output[0] = "pre"
    for name, v in (("g", 1.5), ("beta", 0.1), ("mu", 0.2), ("var", 0.9)):
        m.graph.initializer.append(_t(name, np.full(4, v, np.float32)))
    m.graph.node.insert(list(m.graph.node).index(conv) + 1,
                        helper.make_node("BatchNormalization", ["pre", "g", "beta", "mu", "var"], ["c"], name="bn"))
    vs = [v for v in lint(m) if v.rule == "unfolded-batchnorm"]
    assert [(v.node, v.severity) for v in vs] == [("bn", "warning")] and "'conv'" in vs[0].message
    assert ("unfolded-batchnorm", "bn") in _rules(m)
    # the conv's output read by something else too (RepGhost's fusion BN beside its cheap conv, InceptionNeXt's norm
    # beside the shortcut): folding would change what that reader sees, so no warning
    m.graph.node.append(helper.make_node("Relu", ["pre"], ["side"], name="side"))
    assert not [v for v in lint(m) if v.rule == "unfolded-batchnorm"]
    # on a float input (no quantized layer before it) a BatchNormalization is no waste of an INT8 kernel
    plain = clean_model()
    relu = _node(plain, "relu")
    relu.output[0] = "r"
    plain.graph.node.append(helper.make_node("BatchNormalization", ["r", "g", "beta", "mu", "var"], ["y"], name="bn"))
    for name, v in (("g", 1.5), ("beta", 0.1), ("mu", 0.2), ("var", 0.9)):
        plain.graph.initializer.append(_t(name, np.full(4, v, np.float32)))
    assert not [v for v in lint(plain) if v.rule == "unfolded-batchnorm"]


def test_a_layer_scale_after_a_transpose_is_still_a_layer_output():
    """ResMLP and EdgeNeXt scale a layer's output after moving it (`ls * linear(x).transpose(1, 2)`): `quantize`
    sees a layer on both sides of the add and places no identity quantizer, and check called the scaled side an
    identity with no Q/DQ (an error on the folder's own graph)."""
    m = clean_model()
    m.graph.initializer.append(_t("ls", np.full((1, 4, 1, 1), 0.1, np.float32)))
    add = _node(m, "add")
    i = list(m.graph.node).index(add)
    m.graph.node.insert(i, helper.make_node("Conv", ["xd", "w", "b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    m.graph.node.insert(i + 1, helper.make_node("Transpose", ["c2"], ["c2t"], name="move", perm=[0, 1, 3, 2]))
    m.graph.node.insert(i + 2, helper.make_node("Mul", ["ls", "c2t"], ["scaled"], name="scale"))
    add.input[:] = ["c", "scaled"]
    assert not [v for v in lint(m) if v.rule == "residual-identity"], lint(m)
    # a Mul of two computed tensors is no layer scale: the other side is an identity again, and it has no Q/DQ
    scale = _node(m, "scale")
    scale.input[:] = ["c2t", "x"]
    assert ("residual-identity", "add") in _rules(m)


def _planted_rules() -> set[str]:
    """Rule names this file asserts on: the first item of a `(rule, node)` tuple or `v.rule == "..."`."""
    import ast
    from pathlib import Path

    found = set()
    for node in ast.walk(ast.parse(Path(__file__).read_text())):
        if isinstance(node, ast.Tuple) and node.elts and isinstance(node.elts[0], ast.Constant):
            found.add(node.elts[0].value)
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "rule":
            found.update(c.value for c in node.comparators if isinstance(c, ast.Constant))
    return found


def test_every_rule_has_a_planted_violation():
    from mixq_onnx.onnx.check import RULES

    assert len(RULES) >= 18
    missing = sorted(set(RULES) - _planted_rules())
    assert not missing, f"lint rules without a planted-violation test in {__file__}: {missing}"


def test_float_layer_tag():
    """A conv `--float-layers` left float (tagged `mixq.float_layer`): a warning, and no unquantized-input /
    unquantized-weight / residual-identity errors; the tag on a conv that reads a DQ all the same: an error."""
    m = clean_model()
    conv = _node(m, "conv")
    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w_float")
    m.graph.initializer.append(w)
    conv.input[:] = ["x", "w_float", "b"]
    conv.metadata_props.add(key="mixq.float_layer", value="conv")
    vs = lint(m)
    assert {(v.rule, v.node, v.severity) for v in vs} == {("float-layer", "conv", "warning")}
    tagged = clean_model()
    _node(tagged, "conv").metadata_props.add(key="mixq.float_layer", value="conv")
    bad = [v for v in lint(tagged) if v.rule == "float-layer"]
    assert [(v.node, v.severity) for v in bad] == [("conv", "error")] and "reads a DequantizeLinear" in bad[0].message


def test_an_add_after_an_activation_matmul_is_no_residual_of_a_layer():
    """EfficientViT-M's cascaded heads add the next head's input chunk to the previous head's `v @ attn` output:
    `quantize` counts only Conv/Linear outputs as layer outputs and places no identity quantizer there, and check
    called the chunk an unquantized residual identity (18 errors on the folder's own graph). A MatMul with a weight
    (a Linear on a 3-D input) is still a layer: its add's identity must be quantized."""
    inits = [_t("s", np.float32(0.05)), _t("z", np.int8(0)), _t("w_int", np.ones((8, 8), np.int8)),
             _t("w_s", np.float32(0.01))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x/Q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x/DQ"),
        helper.make_node("QuantizeLinear", ["v", "s", "z"], ["vq"], name="v/Q"),
        helper.make_node("DequantizeLinear", ["vq", "s", "z"], ["vd"], name="v/DQ"),
        helper.make_node("MatMul", ["xd", "vd"], ["mm"], name="attn_v"),
        helper.make_node("Add", ["mm", "v"], ["y"], name="add"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8, 8]) for n in ("x", "v", "y")]
    m = helper.make_model(helper.make_graph(nodes, "g", io[:2], io[2:], inits),
                          opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    assert not [v for v in lint(m) if v.severity == "error"], lint(m)
    m.graph.node.insert(4, helper.make_node("DequantizeLinear", ["w_int", "w_s"], ["w"], name="w/DQ"))
    _node(m, "attn_v").input[1] = "w"  # now a Linear: xd @ W
    assert ("residual-identity", "add") in _rules(m)
