"""tools/bench_peers.py's pure parts: Q/DQ counting, hand-off counting, error lines, rows and the tables."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_peers as bp  # noqa: E402


def tiny_qdq() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(w)) -> Relu -> Q -> DQ -> y, with one more DQ inside an If branch."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w_q")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    ws = numpy_helper.from_array(np.full(2, 0.1, np.float32), "ws")
    branch = helper.make_graph([helper.make_node("DequantizeLinear", ["w_q", "ws"], ["b_out"], axis=0, name="bdq")],
                               "b", [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w_q", "ws"], ["wd"], axis=0, name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "s"], ["rq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["rq", "s"], ["y"], name="dq_out"),
        helper.make_node("If", ["cond"], ["unused"], name="if", then_branch=branch, else_branch=branch),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s, ws])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_count_qdq_counts_graph_and_subgraphs():
    c = bp.count_qdq(tiny_qdq())
    assert c == {"q": 2, "dq": 3 + 2, "qdq": 7}  # 3 DQ in the graph, one in each If branch


def test_count_qdq_counts_other_domains():
    m = tiny_qdq()
    m.graph.node.append(helper.make_node("DequantizeLinear", ["xq", "s"], ["z"], name="ms", domain="com.microsoft"))
    assert bp.count_qdq(m)["dq"] == 6


def test_engine_handoffs_from_layer_table():
    ops = {"q_in": "QuantizeLinear", "dq_in": "DequantizeLinear", "conv": "Conv", "dq_w": "DequantizeLinear",
           "relu": "Relu", "q_out": "QuantizeLinear", "dq_out": "DequantizeLinear", "clip": "Clip"}
    layers = [
        {"name": "shape", "type": "shape_call", "onnx_nodes": []},
        {"name": "conv", "type": "correlation", "onnx_nodes": ["conv", "dq_in", "dq_w"]},
        {"name": "fused", "type": "kgen", "onnx_nodes": ["relu", "q_out"]},  # fused epilogue: no hand-off
        {"name": "requant", "type": "kgen", "onnx_nodes": ["dq_out", "clip", "q_in"]},  # standalone Q/DQ
        {"name": "Reformatting CopyNode for Input Tensor 0", "type": "Reformat", "onnx_nodes": []},
        {"name": "__myl_copy_7", "type": "kgen", "onnx_nodes": []},  # a copy kernel by name
        {"name": "scale", "type": "Scale", "onnx_nodes": []},  # a standalone quantize/scale layer
    ]
    assert bp.engine_handoffs(layers, ops) == {"reformat": 2, "requantize": 2}


def test_first_last():
    assert bp.first_last("") == "(no output)"
    assert bp.first_last("  one line \n") == "one line"
    assert bp.first_last("Traceback (most recent call last):\n  File x\nValueError: bad\n\n") == \
        "Traceback (most recent call last): … ValueError: bad"


def test_rows_quick_and_filters():
    quick = bp.rows(["resnet20"], quick=True)
    ids = [r["id"] for r in quick]
    assert "resnet20-mixq-rtn-w8a8" in ids and "resnet20-mixq-qdrop-w4a4" in ids
    assert "resnet20-mixq-qdrop-w2a4" not in ids and not any(r["group"] == "ref" for r in quick)
    full = bp.rows(["resnet20", "resnet18"])
    ref = [r["id"] for r in full if r["group"] == "ref"]
    assert ref == ["resnet20-qdrop-ref-w4a4", "resnet20-mixq-qdrop-w4a4-asym-pt", "resnet20-qdrop-ref-w2a4",
                   "resnet20-mixq-qdrop-w2a4-asym-pt"]  # interleaved
    assert not any(r["model"] == "resnet18" and r.get("method") == "qdrop" for r in full)  # random weights: rtn
    timm = {r["variant"] for r in full if r["model"] == "resnet18" and r["tool"] != "mixq"}
    assert timm == {"minmax", "minmax-float-bias", "int8-max", "int8"}  # max calibration at 224 px
    assert {r["tool"] for r in bp.rows(["resnet8"], only="ort")} == {"ort"}
    assert len({r["id"] for r in full}) == len(full)


def _ok(**kw):
    base = {"model": "resnet20", "group": "ort", "tool": "ort", "variant": "minmax", "wbits": 8, "abits": 8,
            "status": "ok", "fp_top1": 81.02, "top1": 81.0, "agreement": 97.0, "quantize_s": 10.0,
            "qdq": {"qdq": 60}, "engine_layers": 45, "int8_mac_fraction": 1.0,
            "handoffs": {"reformat": 1, "requantize": 2, "float": 0}, "size_bytes": 2048}
    return {**base, **kw}


def test_render_table_rows_and_failures():
    res = [_ok(), _ok(tool="mixq", group="mixq", variant="rtn-w8a8", top1=81.05, engine_layers=42,
                      handoffs={"reformat": 0, "requantize": 0, "float": 0}),
           {"model": "resnet20", "group": "modelopt", "tool": "modelopt-torch", "variant": "int8", "wbits": 8,
            "abits": 8, "status": "failed", "error": "ImportError: x … y"}]
    lines = bp.render_table(res)
    assert lines[0].startswith("| model |") and len(lines) == 2 + 3
    assert "mixq-onnx rtn w8a8" in lines[2]  # mixq first
    assert "| 81.05 |" in lines[2] and "| 0 / 0 / 0 |" in lines[2]
    assert "| 1 / 2 / 0 |" in lines[3] and "| 2 |" in lines[3]  # hand-offs, KiB
    assert "failed: `ImportError: x … y`" in lines[4]


def test_goals_and_reference_table():
    res = [_ok(top1=81.2), _ok(tool="mixq", group="mixq", variant="rtn-w8a8", top1=81.05, engine_layers=42,
                               handoffs={"reformat": 0, "requantize": 0, "float": 0}),
           {"model": "resnet20", "group": "ref", "tool": "qdrop-ref", "variant": "w4a4", "wbits": 4, "abits": 4,
            "status": "ok", "top1": 79.0, "wall_s": 200.0, "quantize_s": 180.0},
           {"model": "resnet20", "group": "ref", "tool": "mixq", "variant": "qdrop-w4a4-asym-pt", "wbits": 4,
            "abits": 4, "status": "ok", "top1": 79.5, "wall_s": 100.0, "quantize_in_s": 90.0}]
    g = "\n".join(bp.goals(res))
    assert "missed by 0.05 pp" in g  # 81.05 vs 81.2: 0.15 below, 0.05 past the allowance
    assert "42 layers, 0 hand-offs" in g and "met." in g
    assert "top-1 Δ +0.50 pp (met)" in g and "quantize 90 s vs 180 s (met)" in g
    ref = bp.render_ref(res)
    assert "| 79.00 | 79.50 | +0.50 | – | – | 180 | 90 | 0.50 | 200 | 100 |" in ref[2]
    assert bp.render_ref([]) == ["(not run yet)"]


@pytest.mark.parametrize("tool,variant,want", [("mixq", "qdrop-w4a4", "mixq-onnx qdrop w4a4"),
                                               ("ort", "entropy", "onnxruntime entropy"),
                                               ("modelopt-onnx", "int8", "modelopt-onnx int8")])
def test_label(tool, variant, want):
    assert bp.label({"tool": tool, "variant": variant}) == want


def test_paired_se():
    import numpy as np

    a = np.zeros(16, bool)
    b = a.copy()
    b[:4] = True  # 4 discordant images of 16
    ha, hb = np.packbits(a).tobytes().hex(), np.packbits(b).tobytes().hex()
    assert bp.paired_se(ha, hb, 16) == pytest.approx(100 * 2 / 16)
    assert bp.paired_se(ha, ha, 16) == 0
    assert bp.paired_se(None, hb, 16) is None


def test_parser_error_is_short_in_the_table_and_whole_in_the_findings():
    err = ("the TensorRT-RTX ONNX parser rejected the graph: b_DequantizeLinear: Invalid Node - b_DequantizeLinear … "
           "ITensor::getDimensions: Error Code 4: API Usage Error (b_DequantizeLinear: input has type Int32 but must "
           "have type FP8, FP4, Int4, Int8, or UInt8. In checkType at x)")
    r = _ok(engine_layers=None, handoffs=None, engine_error=err)
    row = bp.render_table([r])[2]
    assert "no engine: the parser refuses `b_DequantizeLinear` (Int32 input; it takes FP8, FP4, Int4, Int8, or UInt8)" in row
    f = "\n".join(bp.findings([r]))
    assert "QuantizeBias" in f and err in f


def test_short_error_drops_the_cuda_line_and_paths():
    text = (f"the TensorRT-RTX ONNX parser rejected {bp.ROOT}/runs/x/q.onnx: n: Invalid Node - n\n"
            "ITensor::getDimensions: Error Code 4: bad type\n"
            "[checkMacros.cpp::catchCudaError::250] Error Code 1: Cuda Runtime (In catchCudaError at /_src/")
    assert bp.short_error(text) == ("the TensorRT-RTX ONNX parser rejected the graph: n: Invalid Node - n … "
                                    "ITensor::getDimensions: Error Code 4: bad type")


def test_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "RESULTS", tmp_path)
    assert bp.claim("row") and not bp.claim("row")  # held by this (live) process
    (tmp_path / "row.running").write_text("999999999")  # a gone process: taken over
    assert bp.claim("row")


def test_findings_name_the_quantizer_layout_of_each_mixq_row(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(bp, "WORK", tmp_path)

    def row(variant: str, method: str, floats: int, shared: bool | None) -> dict:
        r = _ok(tool="mixq", variant=variant, method=method, handoffs={"reformat": 0, "requantize": 0, "float": floats})
        r["id"] = f"{r['model']}-mixq-{variant}"
        q = tmp_path / r["model"] / r["id"] / "quant"
        q.mkdir(parents=True)
        cfg = {"share_quantizers": True} if shared else {}
        (q / "quant.json").write_text(json.dumps({"config": cfg}))
        return r

    rtn, old, new = row("rtn-w8a8", "rtn", 0, True), row("qdrop-w4a4", "qdrop", 10, None), row("qdrop-w2a4", "qdrop", 0, True)
    f = "\n".join(bp.findings([rtn, old, new]))
    assert "more float hand-offs than rtn's" in f and "qdrop-w4a4 10" in f and "qdrop-w2a4 0" not in f
    assert "shared layout" in f and "2 of 3" in f and old["id"] in f
    f = "\n".join(bp.findings([rtn, new]))
    assert "more float hand-offs" not in f and "2 of 2" in f and "per consumer" not in f


def test_draw_rows_ids_and_table():
    rs = bp.draw_rows([1, 2])
    assert len(rs) == 2 * len(bp.DRAW_VARIANTS) and all(r["wbits"] == r["abits"] == 8 for r in rs)
    assert {r["draw"] for r in rs} == {1, 2} and len({r["id"] for r in rs}) == len(rs)
    assert bp.model_dir("resnet20", 2).name == "resnet20-draw2" and bp.model_dir("resnet20").name == "resnet20"
    table0 = [{"status": "ok", "model": "resnet20", "tool": "mixq", "variant": "qdrop-w8a8", "top1": 81.0},
              {"status": "ok", "model": "resnet20", "tool": "modelopt-onnx", "variant": "int8", "top1": 81.4}]
    draws = [{"status": "ok", "draw": 1, "tool": "mixq", "variant": "qdrop-w8a8", "top1": 81.2},
             {"status": "ok", "draw": 1, "tool": "modelopt-onnx", "variant": "int8", "top1": 81.0},
             {"status": "ok", "draw": 2, "tool": "mixq", "variant": "qdrop-w8a8", "top1": 80.8},
             {"status": "ok", "draw": 2, "tool": "modelopt-onnx", "variant": "int8", "top1": 81.0},
             {"status": "failed", "draw": 2, "tool": "mixq", "variant": "rtn-w8a8"}]
    lines = bp.render_draws(table0, draws)
    assert lines[0].startswith("| tool / setting | draw 0 | draw 1 | draw 2 | mean top-1 | mean agree % |")
    mo = next(ln for ln in lines if ln.startswith("| modelopt-onnx int8 "))
    # differences +0.4, -0.2, +0.2: mean +0.13, sd 0.306, se 0.18
    assert "| 81.40 | 81.00 | 81.00 | 81.13 | – | +0.13 ± 0.18 (3 draws) |" in mo
    ours = next(ln for ln in lines if ln.startswith("| mixq-onnx qdrop w8a8 "))
    assert ours.endswith("| 81.00 | – | – |")
    assert lines[-1].endswith("Δ -0.13 pp: missed by 0.03 pp beyond the 0.1 pp allowance.")
    assert not any("rtn" in ln for ln in lines)  # a failed row and no table row: nothing to show
    assert bp.render_draws(table0, []) == []
    # ResNet-56's draws: its own rows only, and the verdict takes mixq-onnx's better setting (here rtn)
    rs56 = bp.draw_rows([1], ["resnet56"])
    assert {r["model"] for r in rs56} == {"resnet56"} and rs56[0]["id"].startswith("resnet56-draw1-")
    t56 = [{"status": "ok", "model": "resnet56", "tool": "mixq", "variant": v, "top1": t}
           for v, t in (("rtn-w8a8", 83.2), ("qdrop-w8a8", 83.1))]
    t56.append({"status": "ok", "model": "resnet56", "tool": "modelopt-torch", "variant": "int8", "top1": 83.4})
    d56 = [{"status": "ok", "model": "resnet56", "draw": 1, "tool": "mixq", "variant": "rtn-w8a8", "top1": 83.3},
           {"status": "ok", "model": "resnet56", "draw": 1, "tool": "mixq", "variant": "qdrop-w8a8", "top1": 83.0},
           {"status": "ok", "model": "resnet56", "draw": 1, "tool": "modelopt-torch", "variant": "int8",
            "top1": 83.2}]
    lines56 = bp.render_draws(table0 + t56, draws + d56, "resnet56")
    assert lines56[0].startswith("| tool / setting | draw 0 | draw 1 | mean top-1 |")  # resnet20's draw 2 absent
    assert lines56[-1].endswith("mixq-onnx rtn w8a8 83.25 % vs best peer modelopt-torch int8 83.30 %, "
                                "Δ -0.05 pp: met.")
    assert bp.render_draws(table0 + t56, draws + d56, "resnet20") == lines


def test_engine_rows_and_their_goal_lines():
    rows = bp.engine_rows(["resnet20", "resnet18"])
    ids = [r["id"] for r in rows]
    assert ids[:4] == ["resnet20-engines-mixq-rtn-w8a8", "resnet20-engines-mixq-rtn-w8a8-float-classifier",
                       "resnet20-engines-ort-minmax-float-bias", "resnet20-engines-modelopt-onnx-int8"]
    assert ids[-2:] == ["resnet20-engines-modelopt-torch-int8", "resnet18-engines-modelopt-torch-int8"]  # slow last
    assert "resnet18-engines-modelopt-onnx-int8-max" in ids and rows[1]["float_layers"] == "linear"

    def ok(r, layers, ho, mac=1.0, **kw):
        return {**r, "status": "ok", "engine_layers": layers, "int8_mac_fraction": mac,
                "handoffs": {"reformat": 0, "requantize": 0, "float": ho}, **kw}
    r20 = [ok(rows[0], 42, 0, top1=80.84), ok(rows[1], 41, 0, float_compute_nodes=["linear/Gemm"]),
           ok(rows[2], 42, 0), ok(rows[3], 41, 0), ok(rows[-2], 43, 10),
           {**rows[4], "status": "failed", "error": "boom"}]
    text = bp.render_engines(r20, "python tools/bench_peers.py --engines")
    assert "| resnet20 | mixq-onnx rtn w8a8 | 80.84 | 42 | 1.000 | 0 / 0 / 0 | 0 | – |" in text
    assert "| resnet20 | mixq-onnx rtn w8a8 float classifier | – | 41 | 1.000 | 0 / 0 / 0 | 0 | linear/Gemm |" in text
    assert ("- resnet20, mixq-onnx rtn w8a8: 42 layers, 0 hand-offs; missed: fewer layers or hand-offs in "
            "modelopt-onnx int8 (41 layers, 0 hand-offs)") in text
    assert "- resnet20, mixq-onnx rtn w8a8 float classifier: 41 layers, 0 hand-offs; met" in text
    assert "Not measured or failed: resnet18-engines-mixq-rtn-w8a8" in text and "(boom)" in text
    # a peer below 99 % INT8 MACs is no yardstick
    low = [ok(rows[1], 41, 0), ok(rows[3], 40, 0, mac=0.5)]
    assert "float classifier: no peer engine to compare with" in bp.render_engines(low, "x")


def test_the_table_is_not_re_rendered_over_rows_whose_results_are_gone(tmp_path):
    """A new machine has no runs/peers/results: re-rendering section peers from what is on disk would drop
    measured rows, so the models the section shows without a result file are named (and the section kept)."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- begin:peers -->\n| model | tool |\n|---|---|\n| resnet20 (FP 81.02) | mixq |\n"
                   "| resnet8 (FP 76.44) | ort |\n| mobilenetv2_100 (random weights) | ort |\n<!-- end:peers -->\n")
    have = [{"model": "resnet20"}, {"model": "mobilenetv2_100"}]
    assert bp.unbacked_models(have, doc) == ["resnet8"]
    assert bp.unbacked_models(have + [{"model": "resnet8"}], doc) == []
    assert bp.unbacked_models([], tmp_path / "none.md") == []
    doc.write_text(doc.read_text().replace("<!-- end:peers -->", "### resnet20 W8A8 over calibration draws\n"
                                           "<!-- end:peers -->"))
    every = have + [{"model": "resnet8"}]
    assert bp.unbacked_models(every, doc, []) == ["resnet20's calibration draws"]
    assert bp.unbacked_models(every, doc, [{"model": "resnet20", "draw": 1}]) == []
    doc.write_text(doc.read_text().replace("<!-- end:peers -->", "### resnet56 W8A8 over calibration draws\n"
                                           "<!-- end:peers -->"))
    assert bp.unbacked_models(every, doc, [{"model": "resnet20", "draw": 1}]) == ["resnet56's calibration draws"]
