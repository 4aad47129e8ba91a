"""Peer driver: onnxruntime `quantize_static` (QDQ, symmetric per-channel INT8 weights, symmetric INT8
activations) with one of its calibrators. Runs in its own virtual environment (tools/bench_peers.py).

    python ort_quant.py --fp fp.onnx --data data.npz --calibrator minmax --out q.onnx --json res.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True)
    ap.add_argument("--data", required=True, help="npz with calib_x float32 NCHW (already normalised)")
    ap.add_argument("--calibrator", choices=["minmax", "entropy", "percentile"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--float-bias", action="store_true",
                    help="extra_options QuantizeBias=False: keep biases float (TensorRT parses no INT32 bias DQ)")
    a = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    calib = np.load(a.data)["calib_x"].astype(np.float32)
    name = onnx.load(a.fp, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            x = calib[self.i:self.i + a.batch]
            self.i += a.batch
            return {name: x}

        def rewind(self) -> None:
            self.i = 0

    out = Path(a.out)
    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(a.fp, str(pre))  # the documented first step: shape inference + graph optimisation
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[a.calibrator]
    t1 = time.perf_counter()
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   **({"QuantizeBias": False} if a.float_bias else {}),})
    t2 = time.perf_counter()
    pre.unlink(missing_ok=True)
    Path(a.json).write_text(json.dumps({
        "tool": f"onnxruntime {ort.__version__}", "calibrator": a.calibrator, "quantize_call_s": round(t2 - t1, 2),
        "driver_s": round(t2 - t0, 2), "calib_images": int(len(calib)),
        "settings": "quant_pre_process; quantize_static QDQ, per_channel, QInt8 weights+activations, "
                    "ActivationSymmetric, WeightSymmetric" + (", QuantizeBias=False" if a.float_bias else "")}))


if __name__ == "__main__":
    main()
