"""MLPerf Tiny ResNet-8 (CIFAR-10), converted from its Keras model: biased convs, BN eps 1e-3,
TensorFlow "same" padding, 1x1 stride-2 projection shortcuts. Takes raw 0..255 pixels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model


class SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding made explicit (asymmetric for stride 2 on even inputs)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=True)

    def _pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._pads(int(x.shape[-2]), int(x.shape[-1]))
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = SamePadConv(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = SamePadConv(cout, cout, 3, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu2 = nn.ReLU(inplace=False)
        self.proj = SamePadConv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.proj is None else self.proj(x)
        return self.relu2(out + short)


class MLPerfTinyResNet8(nn.Module):
    def __init__(self, num_classes: int = 10, **_: object):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 64
        self.stem = SamePadConv(3, 16, 3, 1)
        self.stem_bn = nn.BatchNorm2d(16, eps=1e-3)
        self.relu = nn.ReLU(inplace=False)
        self.s1 = Stage(16, 16, 1)
        self.s2 = Stage(16, 32, 2)
        self.s3 = Stage(32, 64, 2)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        x = self.s3(self.s2(self.s1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


default_cfgs = generate_default_cfgs(
    {
        "mlperf_tiny_resnet8": {
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "mean": (0.0, 0.0, 0.0),
            "std": (1 / 255, 1 / 255, 1 / 255),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "first_conv": "stem",
            "classifier": "fc",
        }
    }
)


@register_model
def mlperf_tiny_resnet8(pretrained: bool = False, **kwargs: object) -> MLPerfTinyResNet8:
    model = MLPerfTinyResNet8(**kwargs)  # type: ignore[arg-type]
    model.pretrained_cfg = default_cfgs["mlperf_tiny_resnet8"].default.to_dict()
    return model
