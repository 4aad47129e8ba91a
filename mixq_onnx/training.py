"""The one training loop that the training stages share (`robust/` now, `qat/` next): data, the KD teacher,
the schedule, the optional (adaptive) sharpness-aware step and the progress bar live here, so a stage only
supplies its extra loss terms and its parameters.

Data-free mode: the data is a calibration cache (no labels) and the loss is knowledge distillation from the
original float model (KL between temperature-softened logits, times T^2). Labelled mode: cross-entropy,
plus KD when `kd_weight` > 0 and a teacher is given.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MixqError
from .progress import progress_bar
from .registry import check_augment, check_bn_stats
from .threads import tick
from .utils import full_fp32, model_device, sha256_file


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The standard small-image augmentation, on preprocessed images [N, C, H, W]: each image mirrored left-right
    with probability 1/2 and shifted by up to min(H, W)/8 pixels each way (reflect padding, then a random H x W crop).
    Why: a few thousand labelled images over several epochs overfit without it. Draws come from `gen` (CPU), so
    a seed gives the same batches on every device."""
    n, _, h, w = x.shape
    pad = min(max(1, min(h, w) // 8), min(h, w) - 1)  # reflect padding needs pad < size; a 1-pixel image stays put
    flip = torch.rand(n, generator=gen) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    x = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return x.gather(3, cols)


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3  # SGD (momentum 0.9), cosine-annealed to 0 over all steps
    batch_size: int = 128
    seed: int = 0
    kd_weight: float = 1.0  # labelled mode: weight of the KD term next to CE (0 = CE only)
    temperature: float = 4.0
    sam: str | None = None  # None | "asam" (adaptive sharpness-aware minimisation)
    rho: float = 0.5
    augment: str = "none"  # "none" | "flip-crop": each batch randomly mirrored and shifted (`augment_batch`)
    # the part of one cosine schedule this run covers, as fractions of it: (0, 1) anneals from lr to 0; a stage
    # that trains in phases gives each phase its slice, so the phases continue one schedule instead of restarting
    lr_window: tuple[float, float] = (0.0, 1.0)
    # BatchNorm running statistics: "update" (train mode: they follow the training images) or "freeze" (BN
    # layers normalise with the checkpoint's statistics and keep them; their affine parameters still train).
    # Synthetic images (a cache) have other statistics than the real ones the checkpoint saw.
    bn_stats: str = "update"

    def validate(self) -> TrainConfig:
        if self.epochs < 1:
            raise MixqError(f"--epochs must be at least 1, got {self.epochs}")
        if not (0 < self.lr < math.inf and self.batch_size >= 1 and 0 < self.temperature < math.inf
                and 0 < self.rho < math.inf):
            raise MixqError("--lr, --rho and the temperature must be positive, --batch-size at least 1")
        if self.sam not in (None, "asam"):
            raise MixqError(f"--sam must be asam, got {self.sam!r}")
        if not 0 <= self.kd_weight < math.inf:
            raise MixqError(f"the KD weight must be >= 0, got {self.kd_weight}")
        check_augment(self.augment)
        check_bn_stats(self.bn_stats)
        a, b = self.lr_window
        if not 0.0 <= a < b <= 1.0:
            raise MixqError(f"the lr window must satisfy 0 <= start < end <= 1, got {self.lr_window}")
        return self


def same_images(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two data arguments name the same images: the same path, or two files with the same bytes."""
    pa, pb = Path(a), Path(b)
    if not (pa.exists() and pb.exists()):
        return False
    if pa.resolve() == pb.resolve():
        return True
    return pa.is_file() and pb.is_file() and pa.stat().st_size == pb.stat().st_size and sha256_file(pa) == sha256_file(pb)


def default_teacher(model: nn.Module, data: TrainData, kd_weight: float,
                    device: str | torch.device | None = None) -> nn.Module | None:
    """The KD teacher a stage trains with when none is given: a frozen copy of `model` as it is now (the original
    checkpoint), needed on a cache (KD alone) and with `kd_weight` > 0; None otherwise."""
    if data.labelled and kd_weight <= 0:
        return None
    teacher = copy.deepcopy(model)
    if device is not None:
        teacher = teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@dataclass
class TrainData:
    """Preprocessed inputs [N, C, H, W] and, in labelled mode, int64 labels [N]."""

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    source: str = ""
    #: what `load_training_data` read, for the run's record: the source's sha256 (a file, or a cache's recipe
    #: hash), the images taken and how (`--limit`'s subset); None for data built in Python
    provenance: dict[str, Any] | None = None

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def load_training_data(src: str | os.PathLike, model: nn.Module, *, cache_root: str | None = None,
                       limit: int | None = None, log: Callable[[str], None] | None = None) -> TrainData:
    """A calibration cache (unlabelled: data-free KD) or an npz / image folder with labels, preprocessed the
    model's way. `limit` takes `pick_subset`'s seeded sample (class-stratified where the images have labels),
    never the first N; `log` gets the `data:` / `preprocessing:` lines (`report_data`)."""
    from .calib.cache import is_cache_dir
    from .data import model_hw, pick_subset, read_labelled, report_data
    from .models import get_preprocessing

    p = Path(src)
    if not p.exists() and (p.suffix or len(p.parts) > 1):  # a path, not a cache hash: say so, not "no cache"
        raise MixqError(f"data not found: {str(src)!r} (an npz, an image folder or a calibration cache)")
    if (p.is_dir() and is_cache_dir(p)) or not p.exists():
        from .calib import load_calibration

        ds = load_calibration(src, model, cache_root)
        idx, subset = pick_subset(ds.labels(), len(ds), limit)
        if log is not None:
            report_data(ds.preprocessing, tuple(ds.images.shape[1:3]), f"{subset} of cache {ds.path.name}", log=log)
            note = ds.made_from(model)  # an inversion cache of another network: as quantize says it
            if note:
                log(note)
        return TrainData(ds.take(idx), None, str(ds.path),
                         {"cache": str(ds.path), "recipe_hash": ds.provenance()["hash"], "images": len(idx),
                          "subset": subset})
    pre = get_preprocessing(model)
    d = read_labelled(p, model_hw(pre), limit)
    if log is not None:
        report_data(pre, d.source_hw, d.subset, log=log, resized_on_load=d.resized_on_load)
    images = d.images
    ident = sha256_file(p) if p.is_file() else None  # a folder: its files are listed by the subset line
    return TrainData(torch.cat([pre(images[s:s + 256]) for s in range(0, len(images), 256)]), d.labels, str(p),
                     {"path": str(p), "sha256": ident, "images": len(images), "subset": d.subset})


def check_training_data(data: TrainData, model: nn.Module | None = None) -> None:
    """What the training loop needs, as one-line errors before any work: preprocessed float images [N, C, H, W]
    (N >= 1), and in labelled mode one integer label per image, within the model's classes when `model` is
    given (one image through it in eval mode tells how many it has). `load_training_data` makes such data; a
    library caller may not."""
    if not isinstance(data, TrainData):
        raise MixqError(f"training data must be a TrainData (load_training_data makes one), got {type(data).__name__}")
    x = data.inputs
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise MixqError(f"training inputs must be preprocessed float images [N, C, H, W], got {what} (uint8 NHWC "
                        "pixels go through load_training_data or the model's preprocessing first)")
    if len(x) == 0:
        raise MixqError("training data holds no images")
    if data.labels is None:
        return
    y = data.labels
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.ndim != 1:
        what = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise MixqError(f"training labels must be integer class indices [N], got {what}")
    if len(y) != len(x):
        raise MixqError(f"{len(x)} training images but {len(y)} labels: they must be equal")
    if model is None:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(model_device(model)))
    finally:
        model.train(was)
    n_cls = out.shape[-1] if out.ndim == 2 else None
    if n_cls is None:
        raise MixqError(f"labelled training needs a classifier returning [N, classes] logits, got {tuple(out.shape)}")
    bad = y[(y < 0) | (y >= n_cls)]
    if len(bad):
        raise MixqError(f"{len(bad)} labels lie outside the model's {n_cls} classes (first: {int(bad[0])}); "
                        "is this data for another model?")


def kd_weight_for(data: TrainData, loss: str, kd_weight: float) -> float:
    """The KD weight a stage trains with, given `--loss auto|ce|kd`: ce needs labels; kd on labelled data
    means CE plus KD (weight 1 unless one was given); a cache always trains by KD alone."""
    if loss == "ce" and not data.labelled:
        raise MixqError(f"--loss ce needs labels, and {data.source} is a calibration cache without any "
                        "(use --loss kd or labelled data)")
    if loss == "ce" and kd_weight > 0:
        raise MixqError("--loss ce trains on cross-entropy alone: drop --kd-weight, or use --loss kd (CE plus KD)")
    if not data.labelled and kd_weight > 0:
        raise MixqError(f"{data.source} is a calibration cache: it trains by distillation alone, and --kd-weight "
                        "(KD's weight beside cross-entropy on labelled data) would not be read; drop it")
    if loss == "kd" and data.labelled and kd_weight == 0:
        return 1.0
    return kd_weight


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]


@contextlib.contextmanager
def kept_bn_stats(model: nn.Module):
    """Restore every BatchNorm's running statistics on exit: a second forward of the same batch (ASAM's pass at
    the perturbed weights) must not update them again."""
    saved = [(b, b.clone()) for m in batchnorms(model)
             for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _asam_perturb(params: list[nn.Parameter], rho: float) -> list[torch.Tensor | None]:
    """ASAM (Kwon et al. 2021): step to w + rho * T^2 g / ||T g|| with T = |w| (element-wise)."""
    grads = [(p.grad * p.detach().abs()) if p.grad is not None else None for p in params]
    zero = torch.zeros((), device=params[0].device)
    norm = torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), zero)).clamp(min=1e-12)
    eps = []
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                eps.append(None)
                continue
            e = rho * g * p.abs() / norm
            p.add_(e)
            eps.append(e)
    return eps


@torch.no_grad()
def _trust_region(opt: torch.optim.Optimizer) -> None:
    """Scale each gradient so that lr * |grad| <= max_update * |p| in the groups that set "max_update"."""
    for g in opt.param_groups:
        r = g.get("max_update")
        if not r:
            continue
        for p in g["params"]:
            if p.grad is None:
                continue
            step, cap = g["lr"] * p.grad.norm(), r * p.norm()
            if step > cap > 0:
                p.grad.mul_(cap / step)


@full_fp32()
def train(model: nn.Module, data: TrainData, cfg: TrainConfig, *, teacher: nn.Module | None = None,
          extra_loss: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
          params: list[nn.Parameter] | list[dict[str, Any]] | None = None, progress: bool = True,
          on_step: Callable[[int, int], None] | None = None, desc: str = "train") -> dict[str, Any]:
    """Train `model` in place; returns the per-epoch mean of every loss term.

    `extra_loss(model)` adds the stage's terms (already weighted), e.g. {"symreg": beta * symreg_loss(m)}.
    `params` may be torch parameter groups (dicts with "params" and their own "lr"): each group's lr is then
    cosine-annealed from its own value (quantizer parameters often need another rate than the weights).
    `on_step(step, total)` runs after every optimiser step (e.g. to keep learned ranges positive).
    A group with "max_update": r never moves a tensor by more than r times its norm in one step (its gradient
    is scaled down first): a trust region for layers whose gradient dwarfs their weights, such as a BN-folded
    first convolution fed 0..255 pixels (ResNet-8's: gradient norm 3,300x its weight norm).
    Training runs on the device of `model`'s parameters (the teacher on its own): the images stay in host
    memory and each batch is copied over, so the image order and the CPU results do not depend on it."""
    cfg.validate()
    check_training_data(data)  # the entry points (qat.train, robustify) check the labels against the model
    if not data.labelled and teacher is None:
        raise MixqError("unlabelled data (a calibration cache) trains by distillation: a teacher model is needed")
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 7919)  # its own stream: the image order stays the same
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    params = [p for g in opt.param_groups for p in g["params"]]  # flat, for ASAM
    n = len(data.inputs)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    if teacher is not None:
        teacher.eval()
    dev = model_device(model)
    t_dev = model_device(teacher) if teacher is not None else dev
    w0, w1 = cfg.lr_window
    bar = progress_bar(total, desc, "step", enabled=progress)
    history: list[dict[str, float]] = []
    step = 0

    def losses(x: torch.Tensor, y: torch.Tensor | None, t_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = model(x)
        terms: dict[str, torch.Tensor] = {}
        if y is not None:
            terms["ce"] = F.cross_entropy(out, y)
        if t_logits is not None and (y is None or cfg.kd_weight > 0):
            terms["kd"] = (cfg.kd_weight if y is not None else 1.0) * kd_loss(out, t_logits, cfg.temperature)
        if extra_loss is not None:
            terms.update(extra_loss(model))
        return terms

    try:
        for _epoch in range(cfg.epochs):
            model.train()
            if cfg.bn_stats == "freeze":
                for m in batchnorms(model):
                    m.eval()
            sums: dict[str, float] = {}
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                tick()
                idx = order[s:s + cfg.batch_size]
                x = data.inputs[idx]
                if cfg.augment == "flip-crop":
                    x = augment_batch(x, aug_gen)
                x = x.to(dev, non_blocking=True)
                y = data.labels[idx].to(dev, non_blocking=True) if data.labels is not None else None
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x.to(t_dev)).to(dev)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * (w0 + (w1 - w0) * step / total)))
                opt.zero_grad(set_to_none=True)
                terms = losses(x, y, t_logits)
                loss = sum(terms.values())
                loss.backward()
                if cfg.sam == "asam":
                    eps = _asam_perturb(params, cfg.rho)
                    opt.zero_grad(set_to_none=True)
                    with kept_bn_stats(model):
                        sum(losses(x, y, t_logits).values()).backward()
                    with torch.no_grad():
                        for p, e in zip(params, eps):
                            if e is not None:
                                p.sub_(e)
                _trust_region(opt)
                opt.step()
                step += 1
                if on_step is not None:
                    on_step(step, total)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
                bar.update(1)
                bar.set_postfix({k: f"{float(v.detach()):.4g}" for k, v in terms.items()})
            history.append({k: v / n for k, v in sums.items()})
    finally:
        bar.close()
        model.eval()
    return {"epochs": history, "steps": step}
