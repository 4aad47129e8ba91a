"""Peer driver: NVIDIA ModelOpt's PyTorch PTQ, `mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)`
(per-channel INT8 weights, per-tensor INT8 activations, max calibration), exported to ONNX with ModelOpt's
own exporter. Runs in its own virtual environment; the model comes from the project's zoo (PYTHONPATH
points at the work tree so the network definition is the one every other row uses).

    python modelopt_torch.py --model cifar_resnet20 --checkpoint ck.th --data data.npz --out q.onnx --json r.json
"""
from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", required=True, help="npz with calib_x float32 NCHW (already normalised)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    from importlib.metadata import version

    import modelopt.torch.quantization as mtq
    from modelopt.torch._deploy.utils import get_onnx_bytes_and_metadata

    from mixq_onnx.models import load_model

    t0 = time.perf_counter()
    model = load_model(a.model, a.checkpoint, random_init=a.checkpoint is None).eval()
    calib = torch.from_numpy(np.load(a.data)["calib_x"].astype(np.float32))

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), a.batch):
                m(calib[i:i + a.batch])

    t1 = time.perf_counter()
    model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
    t2 = time.perf_counter()
    onnx_bytes, _ = get_onnx_bytes_and_metadata(model, (calib[:2],), dynamic_axes={"x": {0: "batch"}},
                                                 model_name=Path(a.out).stem)
    # the exporter returns its OnnxBytes container (JSON of base64 files): write the .onnx it holds
    files = json.loads(onnx_bytes)["onnx_model"]
    if len(files) != 1:
        raise SystemExit(f"expected one ONNX file, got {sorted(files)} (external data)")
    Path(a.out).write_bytes(base64.b64decode(next(iter(files.values()))))
    t3 = time.perf_counter()
    Path(a.json).write_text(json.dumps({
        "tool": f"nvidia-modelopt {version('nvidia-modelopt')} (torch {torch.__version__})",
        "quantize_call_s": round(t2 - t1, 2), "export_s": round(t3 - t2, 2), "driver_s": round(t3 - t0, 2),
        "settings": "mtq.quantize(INT8_DEFAULT_CFG), modelopt.torch._deploy get_onnx_bytes_and_metadata"}))


if __name__ == "__main__":
    main()
