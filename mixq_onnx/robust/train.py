"""`robustify`: fine-tune a float model with SymReg and/or SatNL through the shared training loop."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..models.checkpoint import first_non_finite
from ..training import TrainConfig, TrainData, check_training_data, default_teacher, kd_weight_for, train
from ..utils import (
    atomic_write_bytes,
    atomic_write_json,
    check_output_file,
    make_parent,
    model_device,
    sha256_bytes,
    sidecar_vouches,
)
from .regularizers import RobustConfig, apply_satnl, remove_satnl, symreg_loss


def robustify(model: nn.Module, cfg: RobustConfig, data: TrainData, *, teacher: nn.Module | None = None,
              progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` in place and return it as a plain float model (SatNL folded into its weights) with a
    report: per-epoch loss terms and, with SatNL, the learned alphas. The KD teacher defaults to a frozen
    copy of the model as given (the original checkpoint). `cfg.loss` decides the KD weight (`kd_weight_for`);
    the report records the one trained with."""
    cfg = cfg.validate()
    check_training_data(data, model)
    cfg = replace(cfg, kd_weight=kd_weight_for(data, cfg.loss, cfg.kd_weight))
    if teacher is None:
        teacher = default_teacher(model, data, cfg.kd_weight)
    dev = model_device(model)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # dropout and the like follow cfg.seed, not the caller's global RNG
        model, rep = _robustify(model, cfg, data, teacher, progress)
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise MixqError(f"training diverged: {bad[0]} holds {bad[1]} values (try a lower --lr); nothing was written")
    return model, rep


def _robustify(model: nn.Module, cfg: RobustConfig, data: TrainData, teacher: nn.Module | None,
               progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    sats = apply_satnl(model, cfg.learn_alpha) if cfg.satnl else []
    extra = None
    if cfg.symreg > 0:
        def extra(m: nn.Module) -> dict:
            return {"symreg": cfg.symreg * symreg_loss(m, cfg.pairing)}
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                       kd_weight=cfg.kd_weight, sam=cfg.sam, rho=cfg.rho, augment=cfg.augment, bn_stats=cfg.bn_stats)
    try:
        hist = train(model, data, tcfg, teacher=teacher, extra_loss=extra, progress=progress)
    finally:
        alphas = [round(float(s.alpha.detach().abs()), 6) for s in sats]
        remove_satnl(model)
    return model, {"train": hist, "satnl_alphas": alphas, "data": data.source, "kd_weight": cfg.kd_weight,
                   "mode": "labelled" if data.labelled else "data-free (KD)", "bn_stats": cfg.bn_stats,
                   **({"data_provenance": data.provenance} if data.provenance else {})}


def check_writable(out: str | os.PathLike, inputs: tuple[Any, ...] = (), overwrite: bool = False) -> Path:
    """Refuse, before any training, an output the command could not or must not write (`utils.check_output_file`:
    also one of `inputs`, such as the checkpoint being fine-tuned, and an existing file that is not a checkpoint
    robustify wrote, unless `overwrite`); its folders are made when it is written."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise MixqError(f"--out {out} must end in .safetensors")
    out = check_output_file(out, inputs=inputs, ours=("a checkpoint", lambda p: sidecar_vouches(p, "sha256")),
                            overwrite=overwrite)
    side = out.with_name(out.name + ".json")
    if side.is_dir():
        raise MixqError(f"{side} is a folder: the checkpoint's sidecar is written there")
    if side.exists() and not overwrite and not (out.is_file() and sidecar_vouches(out, "sha256")):
        raise MixqError(f"{side} exists and is not the sidecar of a checkpoint robustify wrote: pass --overwrite "
                        "to replace it")
    return out


def save_checkpoint(model: nn.Module, out: str | os.PathLike, report: dict[str, Any], overwrite: bool = False) -> Path:
    """A plain state dict (safetensors) plus OUT.json (the `report` dict as given, and the checkpoint's
    sha256), each written to a temporary sibling and renamed. `robustify` returns the training report only: a
    caller that wants the recipe in OUT.json puts it into `report` (the CLI adds the config, model, checkpoint,
    data and loss, and the float top-1 before and after)."""
    from safetensors.torch import save

    from ..models import model_source

    src = model_source(model)  # never over the checkpoint the model was loaded from (the CLI's rule too)
    out = check_writable(out, inputs=(src.checkpoint,) if src is not None and src.checkpoint else (), overwrite=overwrite)
    try:  # before anything is replaced: a report JSON cannot hold fails here, not between the two writes
        json.dumps(report, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise MixqError(f"the checkpoint's report cannot be written as JSON: {e}") from None
    make_parent(out)
    data = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    side = out.with_name(out.name + ".json")
    # the old sidecar goes first: a kill between the two writes then leaves a plain checkpoint that loads,
    # not a new checkpoint beside an old sha256 that every reader refuses
    side.unlink(missing_ok=True)
    atomic_write_bytes(out, data)
    atomic_write_json(side, {**report, "sha256": sha256_bytes(data)})
    return out
