"""Graph rewrites of the exported model (`mixq_onnx.onnx.passes`): same outputs, TensorRT-friendly form."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx.onnx.passes import split_fused_qkv

B, N, C, H = 2, 5, 8, 2  # batch, tokens, channels, heads
DH = C // H


def _vit_attention(pick: str, per_channel: bool = True, bias: bool = True, extra_reader: bool = False,
                   zero_point: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(DQ(int8 W[C, 3C])) [+ b] -> Reshape(-1, N, 3, H, DH) -> Transpose(2, 0, 3, 1, 4)
    -> q, k, v (Slice+Squeeze as torch.onnx writes `unbind`, or Gather as `qkv[i]`) -> softmax(q kᵀ) v."""
    rng = np.random.default_rng(0)
    wq_type = np.uint8 if zero_point else np.int8
    w = rng.integers(0, 255, (C, 3 * C)) if zero_point else rng.integers(-127, 128, (C, 3 * C))
    scale = rng.uniform(0.005, 0.02, 3 * C) if per_channel else np.array(0.01)
    inits = [
        numpy_helper.from_array(w.astype(wq_type), "qkv.weight.int8"),
        numpy_helper.from_array(scale.astype(np.float32), "qkv.weight.scale"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x.scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x.zp"),
        numpy_helper.from_array(np.array([-1, N, 3, H, DH], np.int64), "shape5"),
        numpy_helper.from_array(rng.standard_normal(3 * C).astype(np.float32), "qkv.bias"),
        numpy_helper.from_array(np.array([0], np.int64), "c0"),
        numpy_helper.from_array(np.array([1], np.int64), "c1"),
        numpy_helper.from_array(np.array([2], np.int64), "c2"),
        numpy_helper.from_array(np.array([3], np.int64), "c3"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array(-1, np.int64), "im1"),  # negative index: v
        numpy_helper.from_array(np.array(DH ** -0.5, np.float32), "qscale"),
    ]
    w_in = ["qkv.weight.int8", "qkv.weight.scale"]
    if zero_point:
        zp = rng.integers(100, 156, 3 * C if per_channel else ()).astype(np.uint8)
        inits.append(numpy_helper.from_array(np.asarray(zp), "qkv.weight.zp"))
        w_in.append("qkv.weight.zp")
    dq_meta = {"mixq.bits": "8", "mixq.quantizer": "blocks.0.attn.qkv.weight"}
    wdq = helper.make_node("DequantizeLinear", w_in, ["w"], name="blocks.0.attn.qkv.weight/DequantizeLinear", axis=1)
    for k, v in dq_meta.items():
        wdq.metadata_props.add(key=k, value=v)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zp"], ["xq"], name="x/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "x.scale", "x.zp"], ["xdq"], name="x/DequantizeLinear"),
        wdq,
        helper.make_node("MatMul", ["xdq", "w"], ["y"], name="blocks.0.attn.qkv/MatMul"),
    ]
    y = "y"
    if bias:
        nodes.append(helper.make_node("Add", ["y", "qkv.bias"], ["yb"], name="add"))
        y = "yb"
    nodes += [
        helper.make_node("Reshape", [y, "shape5"], ["r"], name="reshape", allowzero=1),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4], name="permute"),
    ]
    if pick == "slice":
        for i, (a, b) in enumerate((("c0", "c1"), ("c1", "c2"), ("c2", "c3"))):
            nodes += [helper.make_node("Slice", ["t", a, b, "c0"], [f"s{i}"], name=f"slice{i}"),
                      helper.make_node("Squeeze", [f"s{i}", "c0"], [f"p{i}"], name=f"squeeze{i}")]
    else:
        for i, idx in enumerate(("i0", "i1", "im1")):
            nodes.append(helper.make_node("Gather", ["t", idx], [f"p{i}"], axis=0, name=f"gather{i}"))
    nodes += [
        helper.make_node("Mul", ["p0", "qscale"], ["qs"]),
        helper.make_node("Transpose", ["p1"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["att"]),
        helper.make_node("Softmax", ["att"], ["attp"], axis=-1),
        helper.make_node("MatMul", ["attp", "p2"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, H, N, DH])]
    if extra_reader:  # the whole qkv tensor is read elsewhere too: nothing may change
        nodes.append(helper.make_node("ReduceSum", ["t"], ["tsum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("tsum", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "vit_attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N, C])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})


def _apply(model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    import onnx_ir as ir

    m = ir.from_proto(model)
    n = split_fused_qkv(m)
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto, full_check=True)
    return n, proto


@pytest.mark.parametrize("pick,per_channel,bias,zero_point", [
    ("slice", True, True, False), ("gather", True, True, False), ("slice", False, False, False),
    ("gather", True, False, True),
])
def test_split_fused_qkv_same_outputs(pick, per_channel, bias, zero_point):
    model = _vit_attention(pick, per_channel=per_channel, bias=bias, zero_point=zero_point)
    x = np.random.default_rng(1).standard_normal((B, N, C)).astype(np.float32)
    n, new = _apply(model)
    assert n == 1
    ops = Counter(nd.op_type for nd in new.graph.node)
    # three GEMMs on their own INT8 weight slices; no Slice/Squeeze/Gather left on the qkv tensor
    assert ops["MatMul"] == 3 + 2 and ops["Slice"] == ops["Squeeze"] == ops["Gather"] == 0
    assert ops["Add"] == (3 if bias else 0)
    dqs = [nd for nd in new.graph.node if nd.op_type == "DequantizeLinear" and "qkv.weight" in nd.name]
    assert sorted(nd.name for nd in dqs) == [f"blocks.0.attn.qkv.weight/DequantizeLinear_{p}" for p in "kqv"]
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    for nd in dqs:
        meta = {p.key: p.value for p in nd.metadata_props}
        assert meta == {"mixq.bits": "8", "mixq.quantizer": "blocks.0.attn.qkv.weight"}
        w = inits[nd.input[0]]
        assert w.dtype == (np.uint8 if zero_point else np.int8) and w.shape == (C, C)
    assert "qkv.weight.int8" not in inits and ("qkv.bias" not in inits or not bias)  # the fused weight is gone
    assert {nd.name for nd in new.graph.node if nd.op_type == "MatMul" and "qkv" in nd.name} == \
        {f"blocks.0.attn.qkv/MatMul_{p}" for p in "qkv"}
    ref, out = _run(model, x)[0], _run(new, x)[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["extra_reader", "no_split"])
def test_split_fused_qkv_leaves_other_graphs_alone(case):
    if case == "extra_reader":
        model = _vit_attention("slice", extra_reader=True)
    else:  # a plain quantized Linear: nothing to split
        model = _vit_attention("slice")
        keep = [nd for nd in model.graph.node if nd.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMul")][:4]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        del model.graph.output[:]
        model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N, 3 * C]))
    n, new = _apply(model)
    assert n == 0
    assert [nd.op_type for nd in new.graph.node] == [nd.op_type for nd in model.graph.node]


def _tiny_vit():
    timm = pytest.importorskip("timm")
    from mixq_onnx.models.preprocessing import ATTR, Preprocessing

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=32, num_heads=2, num_classes=10).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 32, 32)))
    return m


def test_export_splits_vit_qkv_and_stays_exact(tmp_path, monkeypatch):
    """export_qdq runs the pass: every block's qkv becomes q/k/v GEMMs, onnxruntime gives the same logits as
    the unsplit export, and still matches PyTorch's fake quantization."""
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.onnx.check import check_model
    from mixq_onnx.onnx.verify import verify_onnx
    from mixq_onnx.quant import QuantConfig, quantize

    torch.set_num_threads(1)
    q = quantize(_tiny_vit(), QuantConfig(wbits=8, abits=8, method="rtn"),
                 torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), progress=False)
    path = export_qdq(q, tmp_path / "vit.onnx")
    g = onnx.load(str(path)).graph
    names = {nd.name for nd in g.node}
    for blk in range(2):
        assert {f"blocks.{blk}.attn.qkv.weight/DequantizeLinear_{p}" for p in "qkv"} <= names
        assert sum(nd.op_type == "MatMul" and nd.name.startswith(f"blocks.{blk}.attn.qkv/") for nd in g.node) == 3
    assert not [v for v in check_model(path) if v.severity == "error"]
    monkeypatch.setattr("mixq_onnx.onnx.export.split_fused_qkv", lambda model: 0)
    fused = export_qdq(q, tmp_path / "vit_fused.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a, b = (_run(onnx.load(str(p)), x, "input")[0] for p in (fused, path))
    np.testing.assert_array_equal(b, a)  # the split GEMMs compute the same sums: bit for bit
    rep = verify_onnx(path, q, torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8,
                                             generator=torch.Generator().manual_seed(0)))
    assert rep.code_mismatch_fraction == 0.0 and rep.forced_max_abs_diff < 1e-5, rep
    assert rep.max_abs_diff == 0.0 and rep.top1_agreement == 100.0, rep  # the free run too


def test_tensorrt_rtx_runs_deit_qkv_in_int8(tmp_path):
    """A W8A8 deit_tiny built by TensorRT-RTX (on this CPU, ahead of time): every attention and MLP GEMM,
    the q/k/v projection included, is an Int8 kernel."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    del trt
    from mixq_onnx.models import load_model
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.quant import QuantConfig, quantize
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    torch.set_num_threads(1)
    m = load_model("deit_tiny_patch16_224", random_init=True)
    q = quantize(m, QuantConfig(wbits=8, abits=8, method="rtn"),
                 torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)), progress=False)
    path = export_qdq(q, tmp_path / "deit_w8a8.onnx")
    plan = tmp_path / "deit.plan"
    build_engine(path, plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 1, 1)))
    rep = inspect_plan(plan)
    assert rep.fallbacks == [], rep.fallbacks
    gemms = {c.node: c for c in rep.compute if c.op == "MatMul" and ".attn.qkv/" in c.node}
    assert len(gemms) == 36  # 12 blocks x q, k, v
    for c in gemms.values():
        assert c.quantized == "int8" and c.precision == "int8", c
    for kind in ("attn.proj", "mlp.fc1", "mlp.fc2"):
        got = [c for c in rep.compute if f".{kind}/" in c.node]
        assert len(got) == 12 and all(c.precision == "int8" for c in got), kind
    assert rep.int8_mac_fraction >= 0.99


class _LevitAttention(torch.nn.Module):
    """timm LeViT's attention on 196 tokens, as in LeViT's first stage: its bias is a parameter table gathered by
    constant indices (large enough that torch.onnx's own constant folding leaves it to the runtime)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.levit import Attention

        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 2, stride=2)
        self.attn = Attention(dim=16, key_dim=4, num_heads=2, attn_ratio=2, resolution=14)
        with torch.no_grad():
            self.attn.attention_biases.normal_()  # as trained: the table is not all zeros
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, 196, 16)
        return self.head((t + self.attn(t)).mean(1))


def test_export_folds_data_movement_on_constants_and_stays_exact(tmp_path):
    """The bias gather of a parameter by constant indices ran as kernels of every inference (LeViT-128S: 6 engine
    layers and 3 hand-offs); folded offline it is one constant, the graph computes the same values."""
    from mixq_onnx.models.preprocessing import ATTR, Preprocessing
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.onnx.check import check_model, report
    from mixq_onnx.onnx.verify import verify_onnx
    from mixq_onnx.quant import QuantConfig, quantize

    m = _LevitAttention().eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 28, 28)))
    q = quantize(m, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(16, 3, 28, 28), progress=False)
    g = export_qdq(q, tmp_path / "m.onnx")
    model = onnx.load(g)
    consts = {i.name for i in model.graph.initializer}
    ops = Counter(n.op_type for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert '"constant_moves"' in meta["mixq.counts"], meta["mixq.counts"]
    assert ops["Gather"] + ops["GatherND"] == 0, ops  # the table's gather is an initializer now
    # nothing but data movement was folded: every node left reads something that is not a constant
    moved = [n for n in model.graph.node if n.op_type in ("Transpose", "Unsqueeze", "Reshape")
             and n.input and all(i in consts for i in n.input)]
    assert not moved, [n.name for n in moved]
    assert report(check_model(g))["ok"]
    images = torch.randint(0, 256, (8, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    v = verify_onnx(g, q, images)
    assert v.max_abs_diff == 0.0 and v.top1_agreement == 100.0
