"""Peer driver: NVIDIA ModelOpt's ONNX PTQ, exactly `python -m modelopt.onnx.quantization --quantize_mode int8`
with its default calibrator, on the CPU (calibration through onnxruntime's CPU provider). Runs in its own
virtual environment (tools/bench_peers.py).

    python modelopt_onnx.py --fp fp.onnx --calib calib_x.npy --out q.onnx --json res.json
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True)
    ap.add_argument("--calib", required=True, help=".npy float32 NCHW (already normalised)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--calibration-method", default=None, help="max / entropy [default: the tool's (entropy)]")
    a = ap.parse_args()
    argv = ["modelopt.onnx.quantization", "--onnx_path", a.fp, "--quantize_mode", "int8",
            "--calibration_data_path", a.calib, "--calibration_eps", "cpu", "--output_path", a.out]
    if a.calibration_method:
        argv += ["--calibration_method", a.calibration_method]
    from importlib.metadata import version

    t0 = time.perf_counter()
    sys.argv = argv
    try:
        runpy.run_module("modelopt.onnx.quantization", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # argparse / the CLI's own exits
        if e.code not in (0, None):
            raise
    t1 = time.perf_counter()
    if not Path(a.out).is_file():
        raise SystemExit(f"modelopt wrote no {a.out}")
    Path(a.json).write_text(json.dumps({
        "tool": f"nvidia-modelopt {version('nvidia-modelopt')}", "quantize_call_s": round(t1 - t0, 2),
        "command": "python -m " + " ".join(argv)}))


if __name__ == "__main__":
    main()
