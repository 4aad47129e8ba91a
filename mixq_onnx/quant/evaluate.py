"""Top-1/top-5 accuracy and agreement with the float model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..models import get_preprocessing


@dataclass
class EvalResult:
    top1: float
    top5: float
    n: int
    agreement: float | None = None  # % of images where the quantized and float top-1 agree
    fp_top1: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits for uint8 NHWC images, preprocessed the model's way."""
    pre = get_preprocessing(model)
    dev = next(model.parameters()).device
    return torch.cat([model(pre(images[s:s + batch_size]).to(dev)).float().cpu()
                      for s in range(0, len(images), batch_size)])


def _topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, 1).indices == y[:, None]).any(1).float().mean() * 100)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fp_model: nn.Module | None = None,
             batch_size: int = 250) -> EvalResult:
    logits = predict(model, images, batch_size)
    res = EvalResult(top1=_topk(logits, labels, 1), top5=_topk(logits, labels, 5), n=len(labels))
    if fp_model is not None:
        fp = predict(fp_model, images, batch_size)
        res.agreement = float((fp.argmax(1) == logits.argmax(1)).float().mean() * 100)
        res.fp_top1 = _topk(fp, labels, 1)
    return res
