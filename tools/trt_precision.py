"""Issue 5's engine table: build TensorRT-RTX engines (on this CPU) from the exported graphs and report
what `inspect` finds: Int8 MAC share, INT4-weight GEMMs, fallbacks, standalone Clip layers.

    python tools/trt_precision.py          # ResNet-20 W8A8/W4A4 and ResNet-8 W8A8 (real, runs/bench_quant),
                                           # deit_tiny W8A8 and --int4-weight-only (random weights)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402


def graphs(out: Path) -> dict[str, Path]:
    import torch

    from mixq_onnx.models import load_model
    from mixq_onnx.onnx import export_int4_weight_only, export_qdq
    from mixq_onnx.quant import QuantConfig, load_quantized_dir, quantize

    torch.set_num_threads(1)
    g: dict[str, Path] = {}
    for label, name in (("ResNet-20 W8A8 (rtn)", "resnet20-rtn-w8a8-sym-real"),
                        ("ResNet-20 W4A4 (qdrop)", "resnet20-qdrop-w4a4-sym-real"),
                        ("ResNet-8 W8A8 (rtn)", "resnet8-rtn-w8a8-sym-real")):
        qdir = ROOT / "runs" / "bench_quant" / name
        if (qdir / "quant.json").is_file():
            qm = load_quantized_dir(qdir)
            g[label] = export_qdq(qm, out / f"{name}.onnx")
            if "ResNet-20" in label:  # the same engine from the ModelOpt-style layout
                g[f"{label}, layout dq-scales"] = export_qdq(qm, out / f"{name}-dqs.onnx", layout="dq-scales")
        else:
            print(f"skip {label}: {qdir} missing (run tools/bench_quant.py)", file=sys.stderr)
    deit = load_model("deit_tiny_patch16_224", random_init=True)
    q = quantize(deit, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(8, 3, 224, 224), progress=False)
    g["deit_tiny W8A8 (rtn, random weights)"] = export_qdq(q, out / "deit_w8a8.onnx")
    g["deit_tiny W8A8 (rtn, random weights), layout dq-scales"] = export_qdq(q, out / "deit_w8a8_dqs.onnx",
                                                                              layout="dq-scales")
    g["deit_tiny INT4 weight-only, block 64"] = export_int4_weight_only(deit, out / "deit_int4_b64.onnx", 64)
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "trt_precision"))
    args = ap.parse_args()
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, onnx_path in graphs(out).items():
        plan = onnx_path.with_suffix(".plan")
        t0 = time.perf_counter()
        res = build_engine(onnx_path, plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 32)))
        build_s = time.perf_counter() - t0
        rep = inspect_plan(plan)
        quantized = [c for c in rep.compute if c.quantized]
        row = {
            "label": label, "int8_mac_fraction": rep.int8_mac_fraction, "int4_weight_layers": len(rep.int4_weight_layers),
            "quantized_gemm_conv": len(quantized),
            "int8_in_and_weights": sum(c.precision == "int8" for c in quantized),
            "fallbacks": [str(f) for f in rep.fallbacks], "standalone_clips": len(rep.standalone_clips),
            "engine_layers": len(rep.layers), "build_s": round(build_s, 1), "backend": res.meta["plan_key"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "## trt: engine precision (TensorRT-RTX, built on this CPU)",
        "",
        f"`python tools/trt_precision.py` · {stamp()} · backend {rows[0]['backend'] if rows else '?'}",
        "",
        "`mixq-onnx export` → `build --backend tensorrt-rtx --batch 1:8:32` (strongly typed) → `inspect`. MACs at "
        "the OPT batch 8. *Quantized GEMM/conv*: Conv/Gemm/MatMul nodes with Q/DQ in the graph; *Int8*: those whose "
        "engine layer reads Int8 activations and Int8 weights. Graphs use the default `integer` export layout "
        "(DQ scale 1, then Mul(s_x·s_w) and the bias Add); the rows marked `dq-scales` export the same "
        "quantization with the scales on the DQ nodes, for comparison.",
        "",
        "| graph | int8 MAC fraction | quantized GEMM/conv | Int8 in + Int8 weights | INT4-weight GEMMs | fallbacks | standalone Clip layers | engine layers | build s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['int8_mac_fraction']:.4f} | {r['quantized_gemm_conv']} | "
                     f"{r['int8_in_and_weights']} | {r['int4_weight_layers']} | {len(r['fallbacks'])} | "
                     f"{r['standalone_clips']} | {r['engine_layers']} | {r['build_s']} |")
    update_section("trt", "\n".join(lines))


if __name__ == "__main__":
    main()
