"""TensorRT-RTX builds on this CPU (ahead of time): build, inspect, plan keys; engine runs need a GPU."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import one_line_error, random_r20_rtn

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'mixq-onnx[trt-rtx]')")

from mixq_onnx.errors import MixqError
from mixq_onnx.onnx import export_fp, export_qdq
from mixq_onnx.trt.backend import GpuInfo, gpu_info
from mixq_onnx.trt.builder import BuildConfig, build_engine, check_plan_key, read_plan_meta
from mixq_onnx.trt.inspect import inspect_plan
from mixq_onnx.trt.runtime import convert_to_fp16

HAS_GPU = gpu_info() is not None


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """Random-weight ResNet-20 exported as W8A8 and W4A4 QDQ graphs, plus the float graph."""
    d = tmp_path_factory.mktemp("trt")
    model, out = None, {}
    for b in (8, 4):
        model, q = random_r20_rtn(16, bits=b, model=model)
        out[f"w{b}a{b}"] = export_qdq(q, d / f"r20_w{b}a{b}.onnx")
    out["fp"] = export_fp(model, d / "r20_fp.onnx")
    return out


@pytest.fixture(scope="module")
def w8_plan(graphs, tmp_path_factory) -> Path:
    plan = tmp_path_factory.mktemp("plan8") / "model.plan"
    build_engine(graphs["w8a8"], plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 32)))
    return plan


def test_w8a8_every_quantized_conv_is_int8(graphs, w8_plan):
    meta = read_plan_meta(w8_plan)
    assert meta["backend"] == "tensorrt-rtx" and meta["backend_version"] == trt.__version__
    assert meta["plan_key"] == f"tensorrt-rtx/{trt.__version__}/aot:portable"
    assert meta["inputs"][0]["opt"] == [8, 3, 32, 32] and meta["inputs"][0]["max"] == [32, 3, 32, 32]
    assert meta["options"]["strongly_typed"] and meta["layer_source"] == "builder-log"
    assert meta["layers"], "no layer information captured from the builder log"
    rep = inspect_plan(w8_plan)
    convs = [c for c in rep.compute if c.op in ("Conv", "Gemm")]
    assert len(convs) == 20  # 19 convs + the classifier
    for c in convs:
        assert c.quantized == "int8" and c.precision == "int8", c
    # Int8 operands and Int8 weights on the engine layers themselves
    layer = {li["name"]: li for li in rep.layers}
    for c in convs:
        li = layer[c.layer]
        assert "Int8" in li["weights"] and all(d == "Int8" for d in li["inputs"]), li
    assert rep.int8_mac_fraction >= 0.99 and rep.total_macs > 300e6
    assert rep.fallbacks == [] and rep.standalone_clips == []


def test_w4a4_cli_build_clips_fused(graphs, tmp_path, run_cli):
    plan = tmp_path / "w4.plan"
    r = run_cli("build", graphs["w4a4"], "--out", plan, "--batch", "1:4:16", "--require-int8", "0.99", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.last_line)
    assert out["int8_mac_fraction"] >= 0.99 and out["fallbacks"] == [] and out["standalone_clips"] == []
    assert plan.is_file() and Path(str(plan) + ".json").is_file()
    # every 4-bit Clip sits inside an engine layer together with the op that produces its input
    m = onnx.load(graphs["w4a4"])
    clips = [n.name for n in m.graph.node if n.op_type == "Clip"]
    assert clips
    by_tensor: dict[str, list[str]] = {}  # quantized tensor -> its Clips: one, since a conv input and a residual
    for n in m.graph.node:                # identity reading the same ReLU output share one quantizer
        if n.op_type == "Clip":
            by_tensor.setdefault(n.input[0], []).append(n.name)
    assert len(by_tensor) == len(clips)
    meta = read_plan_meta(plan)
    where = {n: li for li in meta["layers"] for n in li["onnx_nodes"]}
    assert all(c in where for c in clips)
    for c in clips:
        assert len(where[c]["onnx_nodes"]) > 2, where[c]  # Relu (+Add) + Clip + QuantizeLinear in one kernel
    r = run_cli("inspect", plan, "--json")
    assert r.code == 0
    rep = json.loads(r.last_line)
    assert rep["int8_mac_fraction"] >= 0.99 and rep["fallbacks"] == []


def _bypass_identity_qdq(src: Path, dst: Path) -> str:
    """Planted fault: a residual Add reads the float identity instead of its Q/DQ output."""
    import onnx_ir as ir

    model = ir.load(src)
    add = next(n for n in model.graph if n.op_type == "Add" and n.name == "layer2.1/Add")
    for i, v in enumerate(add.inputs):
        dq = v.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":  # the block input's shared Q/DQ
            q = dq.inputs[0].producer()
            add.replace_input_with(i, q.inputs[0])
            break
    else:
        raise AssertionError("no identity Q/DQ on layer2.1/Add")
    ir.save(model, dst)
    return add.name


def test_planted_fault_is_reported(graphs, tmp_path, run_cli):
    bad = tmp_path / "bad.onnx"
    node = _bypass_identity_qdq(graphs["w4a4"], bad)
    plan = tmp_path / "bad.plan"
    r = run_cli("build", bad, "--out", plan, "--require-int8", "0.5")
    assert r.code == 0, r.err
    assert node in r.out  # the summary names the node
    r = run_cli("inspect", plan, "--json")
    rep = json.loads(r.last_line)
    hits = [f for f in rep["fallbacks"] if f["node"] == node]
    assert hits and "bypassed" in hits[0]["reason"] and hits[0]["layer"]


def _int4_graph(path: Path) -> None:
    """W4A16 MatMul: INT4 weights behind a blocked DequantizeLinear-21 (block_size 32), no activation Q/DQ."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 32
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scale = (rng.random((k // 32, n)) * 0.01 + 0.001).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="x/Cast"),
             helper.make_node("DequantizeLinear", ["w.int4", "w.scale"], ["w.dq"], axis=0, block_size=32,
                              name="fc.weight/DequantizeLinear"),
             helper.make_node("MatMul", ["x16", "w.dq"], ["y16"], name="fc/MatMul"),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="y/Cast")]
    g = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, n])],
                          [helper.make_tensor("w.int4", TensorProto.INT4, [k, n], w.flatten().tolist()),
                           numpy_helper.from_array(scale, "w.scale")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)


def test_int4_weights_recognised_and_require_int8_fails(tmp_path, run_cli):
    src = tmp_path / "int4.onnx"
    _int4_graph(src)
    plan = tmp_path / "int4.plan"
    r = run_cli("build", src, "--out", plan, "--batch", "1:2:4", "--require-int8", "0.5")
    assert r.code == 1 and "below --require-int8" in r.err
    rep = inspect_plan(plan)
    assert rep.int8_mac_fraction == 0.0 and rep.int4_weight_layers
    (mm,) = [c for c in rep.compute if c.node == "fc/MatMul"]
    assert mm.quantized == "weight-only" and mm.precision == "int4-weight" and mm.macs == 16 * 64 * 32 * 2
    assert rep.fallbacks == []


def test_plan_key_mismatch_refused(w8_plan, tmp_path, run_cli):
    plan = tmp_path / "m.plan"
    shutil.copy(w8_plan, plan)
    meta = json.loads(Path(str(w8_plan) + ".json").read_text())
    meta["backend_version"] = "0.9.0"
    meta["plan_key"] = "tensorrt-rtx/0.9.0/aot:portable"
    Path(str(plan) + ".json").write_text(json.dumps(meta))
    for cmd in ("run", "bench"):
        r = run_cli(cmd, plan)
        assert r.code == 2 and "rebuild" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    # GPU targets: a portable plan refuses Turing, an sm89 plan refuses sm120
    good = read_plan_meta(w8_plan)
    check_plan_key(good, trt, GpuInfo("RTX 4090", (8, 9)))
    with pytest.raises(MixqError, match="rebuild"):
        check_plan_key(good, trt, GpuInfo("RTX 2080", (7, 5)))
    with pytest.raises(MixqError, match="rebuild"):
        check_plan_key({**good, "targets": ["sm89"], "target": "aot:sm89"}, trt, GpuInfo("RTX 5090", (12, 0)))
    # a plan that is not the one its .json describes
    plan.write_bytes(plan.read_bytes()[:-16] + b"\0" * 16)
    Path(str(plan) + ".json").write_text(json.dumps(good))
    r = run_cli("inspect", plan)
    assert r.code == 2 and "rebuild" in r.err
    Path(str(plan) + ".json").unlink()
    r = run_cli("run", plan)
    assert r.code == 2 and "rebuild" in r.err


def test_missing_backend_is_one_line_error(graphs, tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if tensorrt were not installed (on any machine)
    r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "x.plan", "--backend", "tensorrt")
    assert r.code == 2 and "pip install 'mixq-onnx[trt]'" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "x.plan").exists()
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # as if tensorrt-rtx were not installed
    r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "y.plan")
    assert r.code == 2 and "pip install 'mixq-onnx[trt-rtx]'" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "y.plan").exists()


def test_compute_capability_targets(graphs, tmp_path, run_cli):
    r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "a.plan", "--compute-capability", "8.9",
                "--compute-capability", "sm120", "--batch", "4", "--json")
    assert r.code == 0, r.err
    meta = read_plan_meta(tmp_path / "a.plan")
    assert meta["targets"] == ["sm120", "sm89"] and meta["plan_key"].endswith("/aot:sm120,sm89")
    assert meta["inputs"][0]["min"] == meta["inputs"][0]["max"] == [4, 3, 32, 32]
    r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "b.plan", "--compute-capability", "6.1")
    assert r.code == 2 and "compute capability" in r.err


def test_fp16_baseline_graph(graphs, tmp_path):
    import onnxruntime as ort

    fp16 = convert_to_fp16(graphs["fp"], tmp_path / "fp16.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(str(graphs["fp"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert b.dtype == np.float32 and np.abs(a - b).max() <= 2e-3 * np.abs(a).max() + 1e-2
    plan = tmp_path / "fp16.plan"
    build_engine(fp16, plan)
    rep = inspect_plan(plan)
    assert {c.precision for c in rep.compute} == {"half"} and rep.int8_mac_fraction == 0.0


def test_run_needs_gpu(w8_plan, run_cli):
    if HAS_GPU:
        pytest.skip("this host has a GPU")
    r = run_cli("run", w8_plan)
    assert r.code == 2 and "NVIDIA GPU" in r.err


def test_eval_engine_reads_preprocessing_from_the_plan(w8_plan, tmp_path, run_cli):
    """`export` records the preprocessing in the graph, `build` copies it beside the plan, so
    `eval --engine` needs no model flag; without a GPU it is a one-line error."""
    meta = read_plan_meta(w8_plan)
    assert meta["preprocessing"]["input_size"] == [3, 32, 32] and len(meta["preprocessing"]["mean"]) == 3
    if HAS_GPU:
        pytest.skip("this host has a GPU")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    r = run_cli("eval", "--engine", w8_plan, "--data", data)
    assert r.code == 2 and "NVIDIA GPU" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.skipif(not HAS_GPU, reason="engine execution needs an NVIDIA GPU")
def test_engine_matches_onnxruntime(graphs, w8_plan):
    import onnxruntime as ort

    from mixq_onnx.trt.runtime import evaluate_engine, run_plan

    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    try:
        got = run_plan(w8_plan, [x])["output"]
    except MixqError as e:  # a data-centre GPU that the RTX plan does not target: any other error fails
        if "rebuild" not in str(e):
            raise
        pytest.skip(str(e))
    ref = ort.InferenceSession(str(graphs["w8a8"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    res = evaluate_engine(w8_plan, torch.from_numpy(x), torch.from_numpy(ref.argmax(1)))
    assert res.n == 8 and res.top1 >= 75.0


def test_inspect_refuses_an_onnx_that_is_not_the_plans(graphs, w8_plan, tmp_path, run_cli):
    """--onnx names another graph than the plan's: its layers would be mapped onto the wrong nodes (it used to
    print that wrong report, exit 0, with a warning)."""
    from conftest import snapshot

    before = snapshot(w8_plan.parent, graphs["w4a4"].parent)
    r = run_cli("inspect", w8_plan, "--onnx", graphs["w4a4"])
    msg = one_line_error(r)
    assert "is not the graph the plan was built from (sha256" in msg and "recorded in" in msg, msg
    r = run_cli("inspect", w8_plan, "--onnx", graphs["w8a8"])
    assert r.code == 0 and "warning" not in r.err
    assert snapshot(w8_plan.parent, graphs["w4a4"].parent) == before


@pytest.mark.parametrize("content", [b"this is not a protobuf \xff\xfe", b""])
def test_build_on_a_non_onnx_file(tmp_path, run_cli, content):
    from conftest import one_line_error, snapshot

    bad = tmp_path / "notes.onnx"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    msg = one_line_error(run_cli("build", bad, "--out", tmp_path / "m.plan"))
    assert "is not an ONNX model" in msg and "Network must have" not in msg
    assert snapshot(tmp_path) == before


def test_the_library_build_judges_require_int8_and_max_handoffs(graphs, tmp_path):
    """`build --require-int8/--max-handoffs` were judged in the CLI only; `build_checked` is the command's
    function (review, 2026-11-30)."""
    from mixq_onnx.trt.builder import EngineRefused, build_checked

    cfg = BuildConfig(backend="tensorrt-rtx", batch=(1, 2, 4))
    fp = build_checked(graphs["fp"], tmp_path / "fp.plan", cfg, require_int8=0.5)
    assert not fp.int8_ok and fp.report.int8_mac_fraction == 0 and (tmp_path / "fp.plan").is_file()
    q = build_checked(graphs["w8a8"], tmp_path / "q.plan", cfg, require_int8=0.99, max_handoffs_limit=0)
    assert q.int8_ok and q.report.int8_mac_fraction == 1.0 and q.report.handoffs == 0
    with pytest.raises(MixqError, match="between 0 and 1"):
        build_checked(graphs["w8a8"], tmp_path / "x.plan", cfg, require_int8=99)
    planted = tmp_path / "planted.onnx"
    _bypass_identity_qdq(graphs["w4a4"], planted)
    with pytest.raises(EngineRefused, match="more than --max-handoffs 0"):
        build_checked(planted, tmp_path / "planted.plan", cfg, max_handoffs_limit=0)
    assert not (tmp_path / "planted.plan").exists()


def test_library_run_loads_inputs_and_needs_a_gpu_like_the_command(w8_plan, tmp_path):
    from mixq_onnx.trt.runtime import run_plan

    (tmp_path / "bad.npy").write_text("not an array")
    with pytest.raises(MixqError, match="not a readable .npy array"):
        run_plan(w8_plan, [tmp_path / "bad.npy"])
    if not HAS_GPU:
        with pytest.raises(MixqError, match="NVIDIA GPU"):
            run_plan(w8_plan)  # the default batch is made only where the plan can run


# --------------------------------------------------------------------------- review, 2026-11-30
def _tiny_graph(path: Path, gemm_weights: str, name: str = "fc/Gemm") -> Path:
    """input -> Q -> DQ -> Gemm with INT8 (Q/DQ) or float weights: the float-weight form asks INT8 of nothing."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32) * 0.05
    nodes = [h.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], name="in/Q"),
             h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="in/DQ")]
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z")]
    if gemm_weights == "int8":
        nodes.append(h.make_node("DequantizeLinear", ["Wq", "ws"], ["W"], name="w/DQ"))
        inits += [nh.from_array(np.clip(np.round(w / 0.002), -127, 127).astype(np.int8), "Wq"),
                  nh.from_array(np.array(0.002, np.float32), "ws")]
    else:
        inits.append(nh.from_array(w, "W"))
    nodes.append(h.make_node("Gemm", ["xd", "W"], ["output"], transB=1, name=name))
    return _save_gemm_graph(path, nodes, inits, 256, 128)


def _save_gemm_graph(path: Path, nodes: list, inits: list, n_in: int, n_out: int) -> Path:
    """nodes from `input` [N, n_in] to `output` [N, n_out], saved at opset 21 (what TensorRT-RTX parses)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("input", T.FLOAT, ["N", n_in])],
                     [h.make_tensor_value_info("output", T.FLOAT, ["N", n_out])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


def test_a_float_weight_gemm_reading_int8_is_float_not_int8(tmp_path, run_cli):
    """It was counted INT8 (int8_mac_fraction 1.0) and --require-int8 1.0 passed it: the kernel converts its
    input and multiplies float weights. A conv named like a reformat layer was counted a hand-off."""
    g = _tiny_graph(tmp_path / "act_only.onnx", "float")
    plan = tmp_path / "a.plan"
    r = run_cli("build", g, "--out", plan, "--batch", "1:8:8", "--require-int8", "1.0")
    assert r.code == 1 and "int8" in r.err.lower(), (r.code, r.err[-500:])
    rep = inspect_plan(plan)
    assert rep.int8_mac_fraction == 0.0 and [c.precision for c in rep.compute] == ["float(int8 in)"], rep.compute
    g2 = _tiny_graph(tmp_path / "full.onnx", "int8", name="neck.reformat/Gemm")
    build_engine(g2, tmp_path / "b.plan", BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 8)))
    rep2 = inspect_plan(tmp_path / "b.plan")
    assert rep2.int8_mac_fraction == 1.0 and rep2.handoffs == 0, (rep2.reformat_layers, rep2.float_handoffs)


def test_a_float_engine_has_no_hand_offs(graphs, tmp_path):
    """Float data flow between two all-float kernels converts nothing (a float ResNet-20 engine counted 1)."""
    plan = tmp_path / "fp.plan"
    build_engine(graphs["fp"], plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 8)))
    rep = inspect_plan(plan)
    assert rep.int8_mac_fraction == 0.0 and rep.handoffs == 0, rep.handoff_lines()
    # a float graph builds (an FP16/FP32 baseline is legitimate) but says so: nothing in it runs int8
    assert any("has no QuantizeLinear node" in w for w in rep.warnings), rep.warnings


def test_the_plan_records_the_graphs_external_weights_too(graphs, w8_plan, tmp_path):
    """PLAN.json's sha256 covered the .onnx file alone: new weights in its external-data file beside the same
    graph file were reported as the graph the plan was built from."""
    from mixq_onnx.onnx.graph import external_data_files, graph_sha256
    from mixq_onnx.utils import sha256_file

    assert not any("no QuantizeLinear" in w for w in inspect_plan(w8_plan).warnings)
    assert graph_sha256(graphs["w8a8"]) == sha256_file(graphs["w8a8"])  # weights inside: the file's own sha256
    d = tmp_path / "ext"
    d.mkdir()
    g = d / "fp.onnx"
    onnx.save(onnx.load(graphs["fp"]), g, save_as_external_data=True, all_tensors_to_one_file=True,
              location="fp.weights", size_threshold=0)
    assert external_data_files(g) == ["fp.weights"]
    plan = tmp_path / "fp.plan"
    build_engine(g, plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 8)))
    assert read_plan_meta(plan)["onnx"]["sha256"] == graph_sha256(g) != sha256_file(g)
    inspect_plan(plan)  # unchanged: the report is made
    data = bytearray((d / "fp.weights").read_bytes())
    data[len(data) // 2] ^= 0x40  # other weights, same graph file
    (d / "fp.weights").write_bytes(bytes(data))
    with pytest.raises(MixqError, match="is not the graph the plan was built from"):
        inspect_plan(plan)
    m = onnx.load(g, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../fp.weights"
    onnx.save(m, d / "escape.onnx")
    with pytest.raises(MixqError, match="outside its folder"):
        graph_sha256(d / "escape.onnx")


def test_build_judges_the_plans_json_too_and_a_half_written_pair_rebuilds(graphs, tmp_path, run_cli):
    """A user's file at PLAN.json was replaced, a folder there was a traceback after the plan was written, and
    a kill between the plan and its PLAN.json left a plan every re-run refused."""
    plan, side = tmp_path / "x.plan", tmp_path / "x.plan.json"
    side.write_text("precious")
    line = one_line_error(run_cli("build", graphs["w8a8"], "--out", plan, "--batch", "1:8:8"))
    assert "x.plan.json exists and is not a PLAN.json mixq-onnx wrote" in line, line
    assert side.read_text() == "precious" and not plan.exists()
    side.unlink()
    side.mkdir()
    line = one_line_error(run_cli("build", graphs["w8a8"], "--out", plan, "--batch", "1:8:8"))
    assert "is a directory" in line and not plan.exists(), line
    side.rmdir()
    assert run_cli("build", graphs["w8a8"], "--out", plan, "--batch", "1:8:8").code == 0
    plan.unlink()  # killed after PLAN.json, before the plan: a re-run finishes it
    assert run_cli("build", graphs["w8a8"], "--out", plan, "--batch", "1:8:8").code == 0
    plan.write_bytes(plan.read_bytes()[:-1])  # an old plan beside a newer PLAN.json: stale, ours, replaced
    assert run_cli("build", graphs["w8a8"], "--out", plan, "--batch", "1:8:8").code == 0
    read_plan_meta(plan)
    line = one_line_error(run_cli("build", graphs["w8a8"], "--out", plan, "--workspace", "99999999999999"))
    assert "--workspace" in line, line


def test_run_and_bench_judge_their_outputs_before_any_gpu_work(w8_plan, graphs, tmp_path, run_cli):
    """`run --out` replaced any file, its --input too; bench overwrote PLAN-stem.fp16.onnx (even its own
    --fp-onnx) and read a changed recorded graph without its sha256."""
    if HAS_GPU:
        pytest.skip("the refusals are checked on a host without a GPU: they must come first")
    mine = tmp_path / "results.npz"
    mine.write_text("my results")
    line = one_line_error(run_cli("run", w8_plan, "--out", mine))
    assert "is not a run's outputs mixq-onnx wrote: pass --overwrite" in line and mine.read_text() == "my results"
    x = tmp_path / "in.npy"
    np.save(x, np.zeros((8, 3, 32, 32), np.float32))
    line = one_line_error(run_cli("run", w8_plan, "--input", x, "--out", x, "--overwrite"))
    assert "would overwrite the input" in line, line
    plan = tmp_path / "q.plan"
    shutil.copy(w8_plan, plan)
    shutil.copy(str(w8_plan) + ".json", str(plan) + ".json")
    user16 = tmp_path / "q.fp16.onnx"
    shutil.copy(graphs["fp"], user16)
    onnx_bytes = user16.read_bytes()
    m = onnx.load(str(user16))
    m.producer_name = "someone"
    onnx.save(m, str(user16))
    before = user16.read_bytes()
    line = one_line_error(run_cli("bench", plan, "--fp-onnx", user16))
    assert "would overwrite the input" in line and user16.read_bytes() == before, line
    line = one_line_error(run_cli("bench", plan, "--fp-onnx", graphs["fp"]))
    assert "q.fp16.onnx exists and is not an ONNX graph mixq-onnx wrote" in line and user16.read_bytes() == before
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a graph")
    line = one_line_error(run_cli("bench", plan, "--ort-onnx", bad))
    assert "is not an ONNX model" in line, line
    assert onnx_bytes  # (the float graph itself was never touched)
    # the refusal says to pass --overwrite: bench has it (it used to be "No such option"), and with it the file
    # checks pass, so the next refusal here is the missing GPU, with the user's file still untouched
    line = one_line_error(run_cli("bench", plan, "--fp-onnx", graphs["fp"], "--overwrite"))
    assert "NVIDIA GPU" in line and user16.read_bytes() == before, line


def test_run_refuses_inputs_that_are_not_one_numeric_array_and_empty_outs(w8_plan, graphs, tmp_path, run_cli):
    """`run --input` with an .npz, or an .npy of strings, was a TypeError traceback; an empty `--out ""` was
    ignored (build wrote its default plan beside the graph, run skipped its output check). Judged before any GPU
    work, so this holds on any host."""
    from conftest import snapshot

    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((2, 3, 32, 32), np.float32))
    strs = tmp_path / "s.npy"
    np.save(strs, np.array(["a", "b"]))
    line = one_line_error(run_cli("run", w8_plan, "--input", npz))
    assert "an .npz archive, not one .npy array" in line, line
    line = one_line_error(run_cli("run", w8_plan, "--input", strs))
    assert "not a numeric array (dtype <U1)" in line, line
    before = snapshot(tmp_path, graphs["w8a8"].parent)
    line = one_line_error(run_cli("build", graphs["w8a8"], "--out", ""))
    assert line == "error: --out is empty: give a file path", line
    line = one_line_error(run_cli("run", w8_plan, "--out", ""))
    assert line == "error: --out is empty: give a file path", line
    assert snapshot(tmp_path, graphs["w8a8"].parent) == before


def test_a_batch_below_the_profiles_min_is_padded_not_refused():
    """`eval --engine` on a static --batch 8 plan failed on the last, short batch (50 images). The GPU engine
    cannot run here: a stand-in with the profile's MIN rule checks the padding and that the pad rows are dropped."""
    from mixq_onnx.trt.runtime import Engine

    class Static(Engine):
        def __init__(self) -> None:  # no plan, no GPU: only what first_output reads
            self.torch, self.min_batch, self.outputs = torch, 8, ["logits"]

        def __call__(self, x):
            assert len(x) >= 8, "outside the profile"
            return {"logits": x.flatten(1)[:, :3] * 2}

    x = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4)
    out = Static().first_output(x)
    assert torch.equal(out, x[:, :3] * 2)


def _two_gemms(path: Path, names: tuple[str, str]) -> Path:
    """A large float Gemm, then a small INT8 (Q/DQ) one, their nodes named `names`."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((1024, 256)).astype(np.float32) * 0.05
    w2 = rng.standard_normal((16, 1024)).astype(np.float32) * 0.05
    nodes = [h.make_node("Gemm", ["input", "W1"], ["h"], transB=1, name=names[0]),
             h.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="h/Q"),
             h.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"], name="h/DQ"),
             h.make_node("DequantizeLinear", ["W2q", "ws"], ["W2"], name="w2/DQ"),
             h.make_node("Gemm", ["hd", "W2"], ["output"], transB=1, name=names[1])]
    inits = [nh.from_array(w1, "W1"), nh.from_array(np.array(0.05, np.float32), "s"),
             nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(np.clip(np.round(w2 / 0.002), -127, 127).astype(np.int8), "W2q"),
             nh.from_array(np.array(0.002, np.float32), "ws")]
    return _save_gemm_graph(path, nodes, inits, 256, 16)


@pytest.mark.parametrize("names", [("blk", "blk"), ("", "")])
def test_nodes_without_a_unique_name_never_count_as_int8(tmp_path, run_cli, names):
    """Engine layers name their ONNX nodes. Two compute nodes named alike (or unnamed) were looked up by name,
    so only the last counted: a 94 %-float graph passed `--require-int8 0.9` at "100 %"."""
    g = _two_gemms(tmp_path / "g.onnx", names)
    r = run_cli("build", g, "--out", tmp_path / "g.plan", "--batch", "1:8:8", "--require-int8", "0.9")
    assert r.code == 1 and "below --require-int8" in r.err, (r.code, r.out[-400:], r.err[-400:])
    rep = inspect_plan(tmp_path / "g.plan")
    assert len(rep.compute) == 2 and rep.int8_mac_fraction == 0.0
    assert {c.precision for c in rep.compute} == {"unattributed"} and rep.warnings, rep.warnings
    named = _two_gemms(tmp_path / "n.onnx", ("big", "small"))  # named: the small Gemm is INT8, about 6 %
    build_engine(named, tmp_path / "n.plan", BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 8)))
    rep = inspect_plan(tmp_path / "n.plan")
    assert 0.05 < rep.int8_mac_fraction < 0.07 and not rep.warnings, (rep.int8_mac_fraction, rep.warnings)


def test_batch_and_compute_capability_limits_are_one_line_errors(graphs, tmp_path, run_cli, monkeypatch):
    """A MAX batch beyond TensorRT's int32 dimensions, and `current` on a GPU TensorRT-RTX has no target for
    (H100/H200: sm90), crashed inside the builder with a traceback."""
    import mixq_onnx.trt.builder as B

    for batch in ("1:2:3000000000", "1:2:99999999999999999999"):
        r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "a.plan", "--batch", batch)
        assert "--batch MAX" in one_line_error(r)
    monkeypatch.setattr(B, "gpu_info", lambda: GpuInfo("NVIDIA H200", (9, 0)))
    r = run_cli("build", graphs["w8a8"], "--out", tmp_path / "b.plan", "--compute-capability", "current")
    line = one_line_error(r)
    assert "sm90" in line and "SM89" in line, line
    assert not (tmp_path / "a.plan").exists() and not (tmp_path / "b.plan").exists()


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"][1]["inputs"][0].__setitem__("dims", None),
    lambda m: m["layers"][1]["inputs"][0].__setitem__("dtype", 5),
    lambda m: m["layers"][1].__setitem__("name", 5),
    lambda m: m["layers"][1].__setitem__("layer_type", None),
    lambda m: m["layers"][1]["inputs"][0].__setitem__("name", [1]),
    lambda m: m.__setitem__("inputs", []),
    lambda m: m["options"].__setitem__("batch", None),
    lambda m: m["inputs"][0].__setitem__("max", ["x"]),
])
def test_a_mistyped_plan_json_is_damaged_not_a_traceback(w8_plan, tmp_path, run_cli, edit):
    plan = tmp_path / "m.plan"
    shutil.copy(w8_plan, plan)
    meta = json.loads(Path(str(w8_plan) + ".json").read_text())
    edit(meta)
    Path(str(plan) + ".json").write_text(json.dumps(meta))
    r = run_cli("inspect", plan)
    assert "is damaged" in one_line_error(r)


def test_a_batch_profile_a_static_graph_would_ignore_is_refused(tmp_path, run_cli):
    """`--batch 1:8:32` on a graph whose batch is fixed at 2 used to build a batch-2 engine and say nothing;
    now it is bad input (exit 2, no plan). Without --batch, or with the graph's own batch, it builds."""
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph([h.make_node("Relu", ["input"], ["output"], name="relu")], "g",
                     [h.make_tensor_value_info("input", T.FLOAT, [2, 16])],
                     [h.make_tensor_value_info("output", T.FLOAT, [2, 16])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    path = tmp_path / "static.onnx"
    onnx.save(m, str(path))
    plan = tmp_path / "s.plan"
    for bad in ("1:8:32", "4"):
        r = one_line_error(run_cli("build", path, "--out", plan, "--batch", bad))
        assert "static batch of 2" in r and not plan.exists() and not Path(f"{plan}.json").exists(), r
    with pytest.raises(MixqError, match="static batch of 2"):
        build_engine(path, plan, BuildConfig(batch=(1, 8, 32)))
    for ok in ((), ("--batch", "2")):
        r = run_cli("build", path, "--out", plan, *ok)
        assert r.code == 0 and read_plan_meta(plan)["inputs"][0]["max"] == [2, 16], r.err[-300:]


def test_a_timing_cache_no_build_wrote_is_refused_before_any_work(tmp_path, run_cli):
    """`--backend tensorrt` read PLAN.timing-cache unchecked (a received or foreign file gave TensorRT its
    tactics) and replaced it after the build. Now the build reads it only where the plan's PLAN.json records
    its sha256, and refuses (exit 2, nothing written) anything else unless --overwrite."""
    import os

    from mixq_onnx.trt.builder import PLAN_FORMAT, meta_path_for, read_timing_cache, timing_cache_path_for
    from mixq_onnx.utils import sha256_bytes

    plan = tmp_path / "m.plan"
    cache = timing_cache_path_for(plan)
    assert read_timing_cache(plan) == b""  # none yet
    cache.write_bytes(b"foreign tactics")
    with pytest.raises(MixqError, match="records no timing cache"):
        read_timing_cache(plan)
    assert read_timing_cache(plan, overwrite=True) == b""
    meta = meta_path_for(plan)
    meta.write_text(json.dumps({"format": PLAN_FORMAT, "timing_cache_sha256": sha256_bytes(b"our tactics")}))
    with pytest.raises(MixqError, match="sha256 is not the one PLAN.json records"):
        read_timing_cache(plan)
    cache.write_bytes(b"our tactics")
    assert read_timing_cache(plan) == b"our tactics"
    cache.unlink()
    os.mkfifo(cache)  # a FIFO where the cache should be: refused at open, never a hang
    with pytest.raises(MixqError, match="cannot read the timing cache"):
        read_timing_cache(plan)
    cache.unlink()
    cache.write_bytes(b"foreign tactics")
    meta.unlink()
    g = _save_gemm_graph(tmp_path / "g.onnx", [onnx.helper.make_node("Relu", ["input"], ["output"], name="r")], [], 4, 4)
    err = one_line_error(run_cli("build", g, "--backend", "tensorrt", "--out", plan))
    assert "is not a timing cache a build of" in err and cache.read_bytes() == b"foreign tactics", err
    assert not plan.exists() and not meta.exists()
