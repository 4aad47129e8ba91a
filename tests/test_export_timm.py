"""timm models (random weights, small inputs), W8A8 and W4A4: QDQ export, TensorRT lint, onnxruntime verify.

Random-weight networks sit on a knife edge at low precision: one float-rounding tie that the two
runtimes round apart flips an integer code, and the flip cascades through every later quantizer
(`propagated_code_mismatch` reaches 50-90 % on the ViTs, and their free-run top-1 over 4 images is
a coin toss). So the assertions are about faithfulness: every quantizer has exactly its Q/DQ, the same
float input gives the same integer code on both sides, and in verify's teacher-forced run (PyTorch
continues from onnxruntime's codes at every quantizer) each segment between quantizers computes the
same function up to float rounding, far below one quantization step. The ReLU CNNs are the exception:
in the default `integer` layout every op between quantizers is exact or identically rounded, and their
free run must match bit for bit.
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, quantize, quantizers
from mixq_onnx.quant.graph import shared_quantizers, tensor_quantizers

# (timm name, input size): CNNs at 64 px; the ViTs need their 224-px position embeddings and Swin its
# 7x7 windows at every stage (load_model does not forward img_size/window_size to timm)
MODELS = [
    ("resnet18", 64),
    ("resnet50", 64),
    ("mobilenetv2_100", 64),
    ("efficientnet_b0", 64),
    ("deit_tiny_patch16_224", 224),
    ("vit_tiny_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
    # found by a coverage audit: ConvNeXt's layer scale x.mul(gamma.reshape(...)) hid its residual adds' branch
    # from placement; MobileNetV3's classifier is timm's Linear (left float); ReXNet adds a channel slice
    ("convnext_atto", 64),
    ("mobilenetv3_small_100", 64),
    ("rexnet_100", 64),
    # MixedConv2d: split, a conv per group, concat, then BatchNorm (folded into each part's conv)
    ("mixnet_s", 64),
    # HRNet (W4A4 only): a tensor feeds a branch's residual block (traced on its own) and a transition conv of the
    # top graph; fuse layers sum a conv's output with more terms
    ("hrnet_w18_small", 64),
]
BITS = [(8, 8), (4, 4)]
ATTENTION = ("deit", "vit", "swin")
RELU_CNNS = ("resnet18", "resnet50", "mobilenetv2_100")  # no float op whose implementation differs between runtimes
# one case per risk area stays in the quick run (`-m "not slow"`); each export takes 10-60 s on a loaded CPU
QUICK = {("resnet18", 8), ("resnet18", 4), ("efficientnet_b0", 4), ("deit_tiny_patch16_224", 4),
         ("swin_tiny_patch4_window7_224", 4)}
CASES = [pytest.param(spec, size, w, a, id=f"{spec}-W{w}A{a}",
                      marks=() if (spec, w) in QUICK else (pytest.mark.slow,))
         for spec, size in MODELS for w, a in BITS if not (spec.startswith("hrnet") and w == 8)]
TIMINGS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def float_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(spec: str, size: int) -> torch.nn.Module:
        if spec not in cache:
            cache[spec] = load_model(spec, random_init=True, input_size=size)
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def exported(float_models, tmp_path_factory):
    """(spec, wbits, abits) -> (quantized model, onnx path), built once per module."""
    cache: dict[tuple, tuple] = {}

    def get(spec: str, size: int, wbits: int, abits: int):
        key = (spec, wbits, abits)
        if key not in cache:
            model = float_models(spec, size)
            calib = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            # 8 clipping ratios, not 80: scale-search quality is not under test, and it dominates on 20M weights
            qm = quantize(model, QuantConfig(wbits=wbits, abits=abits, method="rtn", scale_grid=8), calib, progress=False)
            t1 = time.perf_counter()
            path = export_qdq(qm, tmp_path_factory.mktemp(f"{spec}_w{wbits}a{abits}") / "m.onnx")
            TIMINGS[f"{spec} W{wbits}A{abits}"] = {"quantize_s": t1 - t0, "export_s": time.perf_counter() - t1}
            cache[key] = (qm, path)
        return cache[key]

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec,size,wbits,abits", CASES)
def test_export_check_verify(spec, size, wbits, abits, exported, float_models):
    qm, path = exported(spec, size, wbits, abits)
    m = onnx.load(str(path))

    # --- structure: one Q and one DQ per enabled activation quantizer (a shared one serving a residual add
    # has two DQs in the integer layout: the codes for its convs, the values for the add); a weight DQ per
    # weight quantizer (three for a fused qkv projection, which the export splits into per-part GEMMs)
    qs = quantizers(qm)
    acts = {n for n, q in qs.items() if q.kind == "act" and q.enabled}
    weights = {n for n, q in qs.items() if q.kind == "weight"}
    shared = shared_quantizers(qm)
    q_nodes = Counter(n.name.rsplit("/", 1)[0] for n in m.graph.node if n.op_type == "QuantizeLinear")
    dq_nodes = Counter(n.name.rsplit("/", 1)[0] for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert set(q_nodes) == acts and all(q_nodes[n] == 1 for n in acts)
    assert set(dq_nodes) == acts | weights and all(dq_nodes[n] == 1 or (dq_nodes[n] == 2 and n in shared) for n in acts)
    assert all(len(v) == 1 for v in tensor_quantizers(qm).values())  # one quantizer per tensor (one grid here)
    assert all(dq_nodes[n] == 1 or (dq_nodes[n] == 3 and n.endswith("qkv.weight")) for n in weights), \
        {n: dq_nodes[n] for n in weights if dq_nodes[n] != 1}
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.name.rsplit("/", 1)[0] in weights:
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8, n.name  # stored integers, no Q
    if spec.startswith(ATTENTION):
        mm = [n for n, q in qs.items() if q.kind == "act" and q.placement == "matmul"]
        assert mm, "attention q·kᵀ and attn·v must be quantized"
        producer = {o: n for n in m.graph.node for o in n.output}
        act_matmuls = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] not in inits
                       and producer.get(n.input[1]) is not None
                       and producer[n.input[1]].name.rsplit("/", 1)[0] in acts]
        assert len(act_matmuls) * 2 == len(mm)  # both inputs of every activation MatMul carry Q/DQ
        # both residual adds of every transformer block (Swin's shifted-window ones too) quantize their identity
        n_blocks = sum(type(b).__name__ in ("Block", "SwinTransformerBlock") for b in float_models(spec, size).modules())
        assert sum(q.kind == "act" and q.placement == "residual" for q in qs.values()) == 2 * n_blocks
    if spec.startswith("efficientnet"):
        assert any(".se." in n for n in acts)  # squeeze-excitation convs get their input Q/DQ
    assert not qm.mixq_unquantized, qm.mixq_unquantized  # every Conv2d/Linear, timm's Linear too
    if spec.startswith(("mixnet", "resnet", "mobilenet", "efficientnet", "rexnet")):
        assert not [n for n in m.graph.node if n.op_type == "BatchNormalization"]  # every BN folded

    # --- TensorRT lint
    rep = report(check_model(path))
    assert rep["ok"], rep["violations"][:5]

    # --- onnxruntime (exact QDQ semantics) against PyTorch
    images = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    v = verify_onnx(path, qm, images)
    with torch.no_grad():
        scale = float(qm(get_preprocessing(qm)(images)).abs().max())
    TIMINGS[f"{spec} W{wbits}A{abits}"].update(
        agreement=v.top1_agreement, max_abs_diff=v.max_abs_diff, out_absmax=scale, propagated=v.propagated_code_mismatch,
        seg_step=v.segment_step_diff, seg_codes=v.segment_code_mismatch, forced_diff=v.forced_max_abs_diff,
        forced_top1=v.forced_top1_agreement, worst=v.worst_segment)
    print(f"\n{spec} W{wbits}A{abits}: {TIMINGS[f'{spec} W{wbits}A{abits}']}")
    assert v.code_mismatch_fraction == 0.0  # same float input -> same integer code at every quantizer
    # teacher-forced (each quantizer continues from onnxruntime's codes): every segment between
    # quantizers computes the same function, up to float rounding
    assert v.segment_step_diff <= 1e-2, (v.worst_segment, v.segment_step_diff)
    assert v.segment_code_mismatch <= 1e-3, v.segment_code_mismatch
    assert v.forced_max_abs_diff <= 1e-3 * scale and v.forced_top1_agreement >= 90.0, (v.forced_max_abs_diff, scale)
    if spec in RELU_CNNS:  # integer layout, integer-exact operators only (ReLU, ReLU6, pooling): bit-identical
        assert v.max_abs_diff == 0.0 and v.propagated_code_mismatch == 0.0, (v.first_divergence, v.max_abs_diff)
    elif not spec.startswith(ATTENTION):  # free run: the CNNs stay close; random ViTs are chaotic (see top)
        assert v.top1_agreement >= 75.0 and v.max_abs_diff <= 0.25 * scale, (v.top1_agreement, v.max_abs_diff)


def test_a_model_that_refuses_its_input_size_is_one_line():
    """A ViT with fixed position embeddings asked for 64 px: timm's own assertion, as one MixqError line."""
    from mixq_onnx.errors import MixqError

    model = load_model("vit_tiny_patch16_224", random_init=True, input_size=64)
    with pytest.raises(MixqError, match=r"VisionTransformer fails on a 3x64x64 input \(.*\): give an --input-size"):
        quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(2, 3, 64, 64), progress=False)


# ----------------------------------------------------------------------------- lint rules the timm graphs exercise
def _lint_rules(nodes, inits, out="y"):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    from mixq_onnx.onnx.check import lint

    return {(v.rule, v.node) for v in lint(m) if v.severity == "error"}


def _mixq(node, quantizer):
    """The metadata the exporter writes on every Q/DQ/Clip node (lint finds a quantizer's own Clip by it)."""
    node.metadata_props.add(key="mixq.quantizer", value=quantizer)
    return node


def _qdq(src, tag):
    from onnx import helper

    return [_mixq(helper.make_node("QuantizeLinear", [src, "s", "z"], [f"{tag}q"], name=f"{tag}/QuantizeLinear"), tag),
            _mixq(helper.make_node("DequantizeLinear", [f"{tag}q", "s", "z"], [f"{tag}d"], name=f"{tag}/DequantizeLinear"),
                  tag)]


def _conv(src, tag):
    from onnx import helper

    return _qdq(src, f"{tag}.in") + [
        helper.make_node("DequantizeLinear", ["w_int", "w_s"], [f"{tag}.w"], name=f"{tag}.w/DequantizeLinear", axis=0),
        helper.make_node("Conv", [f"{tag}.ind", f"{tag}.w"], [tag], name=f"{tag}/Conv", pads=[1, 1, 1, 1])]


_INITS = {"s": np.float32(0.05), "z": np.int8(0), "w_int": np.ones((4, 4, 3, 3), np.int8),
          "w_s": np.full(4, 0.01, np.float32)}


def test_lint_constant_subgraph_is_no_residual():
    """conv + (bias table gathered and reshaped from initializers): a bias add, not a residual add."""
    from onnx import helper

    nodes = _conv("x", "c1") + [
        helper.make_node("Reshape", ["table", "shape"], ["bias"], name="bias/Reshape"),
        helper.make_node("Add", ["c1", "bias"], ["y"], name="add")]
    inits = dict(_INITS, table=np.zeros(4 * 8 * 8, np.float32), shape=np.array([1, 4, 8, 8], np.int64))
    assert _lint_rules(nodes, inits) == set()
    nodes[-2].input[0] = "x"  # computed from the graph input: an activation, so a residual without Q/DQ
    assert ("residual-identity", "add") in _lint_rules(nodes, inits)


def test_lint_quantized_conv_output_as_residual():
    """MobileNetV2: conv1's output, quantized, is the identity of an add that fuses into conv2 (legal);
    Swin: a quantized layer output that also feeds other nodes cannot absorb the add (legal); a quantized
    conv output whose only reader is the add, with no plain conv on the other side, is the error."""
    from onnx import helper

    nodes = _conv("x", "c1") + _conv("c1", "c2") + _qdq("c1", "id") + [
        helper.make_node("Add", ["c2", "idd"], ["y"], name="add")]
    assert _lint_rules(nodes, _INITS) == set()
    nodes.insert(-1, helper.make_node("Relu", ["c2"], ["r"], name="relu"))
    nodes[-1].input[0] = "r"  # conv2 no longer feeds the add directly; conv1 still feeds conv2 too
    assert _lint_rules(nodes, _INITS) == set()
    single = _conv("x", "c1") + _qdq("c1", "id") + [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                                                   helper.make_node("Add", ["r", "idd"], ["y"], name="add")]
    assert ("qdq-conv-add", "add") in _lint_rules(single, _INITS)
    clip = _conv("x", "c1") + [_mixq(helper.make_node("Clip", ["c1", "lo", "hi"], ["c1c"], name="id/Clip"), "id")] + \
        _qdq("c1c", "id") + single[-2:]  # a 4-bit grid's own Clip in front of the Q changes nothing
    assert ("qdq-conv-add", "add") in _lint_rules(clip, dict(_INITS, lo=np.float32(-0.4), hi=np.float32(0.35)))
