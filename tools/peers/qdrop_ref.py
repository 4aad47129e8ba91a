"""Adapter: run the reference QDrop code (wimh966/QDrop, a checkout under runs/peers/QDrop, never vendored)
on the CIFAR ResNet-20 of ../shared with the bench's calibration images.

Only the model and the data loading are adapted: ResNet-20 is built from the reference's own `BasicBlock`
(its option-A shortcut as the block's `downsample`, a parameter-free module the reference wraps unquantized),
the akamaster weights are loaded into it, and the calibration/test tensors come from the bench's npz. The
quantization, calibration and block reconstruction are the reference's functions, called in the order of its
`main_imagenet.main`, with its W2A4 ResNet-18 config (exp/w2a4/r18/config.yaml) except the bit widths and the
iterations. The reference moves tensors with `.cuda()`; on this CPU-only run `Tensor.cuda` returns the tensor.

    python qdrop_ref.py --qdrop runs/peers/QDrop --checkpoint resnet20.th --data data.npz --wbits 4 --abits 4 \
        --iters 400 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OptionA(nn.Module):
    """akamaster's option-A shortcut: subsample by 2, zero-pad the channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


def resnet20(BasicBlock) -> nn.Module:  # noqa: N803 - the reference's class
    class ResNet20(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
            inplanes = 16
            for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
                blocks = []
                for b in range(3):
                    s = stride if b == 0 else 1
                    down = nn.Sequential(OptionA(planes)) if (s != 1 or inplanes != planes) else None
                    blocks.append(BasicBlock(inplanes, planes, s, down, norm_layer=nn.BatchNorm2d))
                    inplanes = planes
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet20()


def load_akamaster(model: nn.Module, path: str) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        k = k.replace("linear.", "fc.")
        out[k] = v
    model.load_state_dict(out, strict=True)


def predict(model: nn.Module, x: torch.Tensor, bs: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qdrop", required=True, help="the reference checkout")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="npz: calib_x, test_x float32 NCHW (normalised), test_y")
    ap.add_argument("--wbits", type=int, required=True)
    ap.add_argument("--abits", type=int, required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.qdrop).resolve()
    sys.path[:0] = [str(root), str(root / "qdrop" / "solver")]
    torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference's observers call .cuda(); CPU here

    import imagenet_utils  # noqa: F401 - the reference's (DataSaverHook for recon)
    from fold_bn import search_fold_and_remove_bn
    from main_imagenet import quantize_model
    from qdrop.model.resnet import BasicBlock
    from qdrop.quantization.observer import ObserverBase
    from qdrop.quantization.quantized_module import QuantizedBlock, QuantizedLayer
    from qdrop.quantization.state import disable_all, enable_calibration_woquantization, enable_quantization
    from recon import reconstruction

    cfg_path = root / "exp" / "w2a4" / "r18" / "config.yaml"
    config = imagenet_utils.parse_config(str(cfg_path))
    config.quant.a_qconfig.bit = a.abits
    config.quant.w_qconfig.bit = a.wbits
    config.quant.recon.iters = a.iters
    imagenet_utils.set_seed(config.process.seed)

    d = np.load(a.data)
    cali_data = torch.from_numpy(d["calib_x"].astype(np.float32))[: config.quant.calibrate]
    test_x = torch.from_numpy(d["test_x"].astype(np.float32))
    test_y = torch.from_numpy(d["test_y"].astype(np.int64))

    t_start = time.perf_counter()
    model = resnet20(BasicBlock)
    load_akamaster(model, a.checkpoint)
    model.eval()
    fp_top1_unfolded = float((predict(model, test_x).argmax(1) == test_y).float().mean() * 100)
    t0 = time.perf_counter()
    # --- from here on: main_imagenet.main, step by step (model and data already here)
    search_fold_and_remove_bn(model)
    model = quantize_model(model, config.quant)
    model.eval()
    fp_model = copy.deepcopy(model)
    disable_all(fp_model)
    for name, module in model.named_modules():
        if isinstance(module, ObserverBase):
            module.set_name(name)
    with torch.no_grad():
        enable_calibration_woquantization(model, quantizer_type="act_fake_quant")
        model(cali_data[:256])
        enable_calibration_woquantization(model, quantizer_type="weight_fake_quant")
        model(cali_data[:2])
    t_cal = time.perf_counter()
    enable_quantization(model)
    units = []

    def recon_model(module: nn.Module, fp_module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (QuantizedLayer, QuantizedBlock)):
                t = time.perf_counter()
                reconstruction(model, fp_model, child, getattr(fp_module, name), cali_data, config.quant.recon)
                units.append({"unit": name, "s": round(time.perf_counter() - t, 2)})
            else:
                recon_model(child, getattr(fp_module, name))

    recon_model(model, fp_model)
    enable_quantization(model)
    t1 = time.perf_counter()
    # --- evaluation (the reference's validate_model, on tensors instead of a loader)
    model.eval()
    q = predict(model, test_x).argmax(1)
    f = predict(fp_model, test_x).argmax(1)
    res = {
        "tool": "wimh966/QDrop (reference)", "wbits": a.wbits, "abits": a.abits, "iters": a.iters,
        "top1": float((q == test_y).float().mean() * 100), "agreement": float((q == f).float().mean() * 100),
        "fp_top1": float((f == test_y).float().mean() * 100), "fp_top1_unfolded": fp_top1_unfolded,
        "n_test": int(len(test_y)), "calib_images": int(len(cali_data)), "units": len(units),
        "calibration_s": round(t_cal - t0, 2), "reconstruction_s": round(t1 - t_cal, 2),
        "quantize_s": round(t1 - t0, 2), "setup_s": round(t0 - t_start, 2), "unit_times": units,
        "config": {"a": dict(config.quant.a_qconfig), "w": dict(config.quant.w_qconfig),
                   "recon": dict(config.quant.recon), "seed": config.process.seed, "source": str(cfg_path.name)},
    }
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("top1", "agreement", "fp_top1", "quantize_s")}))


if __name__ == "__main__":
    main()
