"""Top-1/top-5 accuracy and agreement with the float model."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..models import get_preprocessing
from ..progress import Progress, progress_bar
from ..threads import tick


@dataclass
class EvalResult:
    top1: float
    top5: float
    n: int
    agreement: float | None = None  # % of images where the quantized and float top-1 agree
    fp_top1: float | None = None
    fp_top5: float | None = None  # the float model's top-5, beside the quantized one's `top5`
    subset: str | None = None  # which images (`pick_subset`'s description), when a loader picked them

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 250, bar: Progress | None = None
            ) -> torch.Tensor:
    """Logits for uint8 NHWC images, preprocessed the model's way; `bar` advances by the images done. The model
    runs in eval mode (BatchNorm with its running statistics, which it then keeps; no dropout), and every module is handed
    back in the mode it came in."""
    pre = get_preprocessing(model)
    dev = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for s in range(0, len(images), batch_size):
            tick()  # follow the machine's load (auto thread mode only)
            out.append(model(pre(images[s:s + batch_size]).to(dev)).float().cpu())
            if bar is not None:
                bar.update(len(out[-1]))
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(out)


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, 1).indices == y[:, None]).any(1).float().mean() * 100)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fp_model: nn.Module | None = None,
             batch_size: int = 250, *, progress: bool = False) -> EvalResult:
    """Top-1/top-5 of `model` on uint8 NHWC `images`; labels outside the model's classes are an error (a silent
    0 % would read as a broken model). `progress`: a bar over the images of both passes (the `eval` command)."""
    if batch_size < 1:
        raise MixqError(f"--batch-size must be a positive integer, got {batch_size}")
    if len(images) == 0 or len(images) != len(labels):
        raise MixqError(f"{len(images)} images but {len(labels)} labels: they must be equal and non-zero")
    passes = 1 if fp_model is None else 2  # the count covers both passes: say so, or 10000/10000 puzzles
    desc = "eval" if fp_model is None else "eval (quantized, then float)"
    with progress_bar(passes * len(images), desc, "image", enabled=progress) as bar:
        logits = predict(model, images, batch_size, bar)
        n_cls = logits.shape[1]
        bad = labels[(labels < 0) | (labels >= n_cls)]
        if len(bad):
            raise MixqError(f"{len(bad)} labels lie outside the model's {n_cls} classes (first: {int(bad[0])}); "
                            "is this data for another model?")
        fp = predict(fp_model, images, batch_size, bar) if fp_model is not None else None
    res = EvalResult(top1=topk_accuracy(logits, labels, 1), top5=topk_accuracy(logits, labels, 5), n=len(labels))
    if fp is not None:
        res.agreement = float((fp.argmax(1) == logits.argmax(1)).float().mean() * 100)
        res.fp_top1 = topk_accuracy(fp, labels, 1)
        res.fp_top5 = topk_accuracy(fp, labels, 5)
    return res


def evaluate_data(data: str | os.PathLike, *, quantized: str | os.PathLike | None = None, model: Any = None,
                  trust_model_code: bool = False, limit: int | None = None, batch_size: int = 250,
                  log: Callable[[str], None] | None = None, progress: bool = False) -> EvalResult:
    """What `mixq-onnx eval` computes: a result folder against its float model (top-1 agreement), or a float
    model alone (`model`: nn.Module or `ModelOptions`), on an npz or image folder read at the model's input
    size. `limit`: `pick_subset`'s seeded sample; `log` gets the `data:` / `preprocessing:` lines."""
    from ..data import read_for_model
    from ..models import ModelOptions, load_model
    from .io import load_result

    if quantized is not None:
        fp, qmodel = load_result(quantized, model, trust_model_code)
    elif model is not None:
        fp, qmodel = None, (load_model(model) if isinstance(model, ModelOptions) else model)
    else:
        raise MixqError("eval needs a model (--model) or a result folder (--quantized)")
    pre = get_preprocessing(qmodel)
    d = read_for_model(data, pre, limit, log=log)
    res = evaluate(qmodel, d.images, d.labels, fp_model=fp, batch_size=batch_size, progress=progress)
    res.subset = d.subset
    return res
