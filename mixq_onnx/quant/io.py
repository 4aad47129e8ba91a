"""`quant.json` + `weights.safetensors`: the quantized model on disk, read back bit for bit.

quant.json records every quantizer (name, placement, bits, scale(s), axis, signedness) and the model's
source (spec, checkpoint path and sha256, preprocessing), so a quantized directory is
self-contained: `export`, `verify` and `eval --quantized` need no other model flag.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from .config import QuantConfig
from .graph import prepare, quantizers
from .quantizer import ActQuantizer, WeightQuantizer

QUANT_JSON = "quant.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1


def _atomic_dir(out: Path):
    """Write into a temporary sibling directory, then swap it into place."""
    class _Ctx:
        def __enter__(self) -> Path:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            return self.tmp

        def __exit__(self, et, ev, tb) -> None:
            if et is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            if out.exists():
                tomb = out.with_name(f".{out.name}.old.{os.getpid()}")
                os.replace(out, tomb)
                os.replace(self.tmp, out)
                shutil.rmtree(tomb, ignore_errors=True)
            else:
                os.replace(self.tmp, out)

    return _Ctx()


def save_quantized(qmodel: nn.Module, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `quant.json` and `weights.safetensors` for a model returned by `quantize`."""
    from safetensors.torch import save_file

    from .. import __version__
    from ..models import model_source

    out = Path(out)
    cfg: QuantConfig = qmodel.mixq_config  # type: ignore[attr-defined]
    src = model_source(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for name, q in quantizers(qmodel).items():
        rec = q.record()
        records.append(rec)
        tensors[f"{name}.scale"] = q.scale.detach().reshape(-1).float().contiguous().cpu()
        tensors[f"{name}.zero_point"] = q.zero_point.detach().reshape(-1).float().contiguous().cpu()
        if isinstance(q, WeightQuantizer):
            tensors[f"{name}.int"] = q.int_weight.contiguous().cpu()
            rec["shape"] = list(q.int_weight.shape)
    meta = {
        "format": FORMAT,
        "mixq_onnx": __version__,
        "deployable": cfg.symmetric,
        "config": cfg.to_dict(),
        "model": src.to_dict() if src else None,
        "units": list(qmodel.mixq_units),  # type: ignore[attr-defined]
        "quantizers": records,
        "report": getattr(qmodel, "mixq_report", None),
        **(extra or {}),
    }
    with _atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": str(FORMAT)})
        (tmp / QUANT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_quant_json(qdir: str | os.PathLike) -> dict[str, Any]:
    qdir = Path(qdir)
    f = qdir / QUANT_JSON
    if not f.is_file():
        raise MixqError(f"{qdir} is not a quantized model directory (no {QUANT_JSON})")
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"cannot read {f}: {e}") from None
    if meta.get("format") != FORMAT:
        raise MixqError(f"{f} has format {meta.get('format')!r}, this mixq-onnx reads format {FORMAT}")
    return meta


def load_quantized(model: nn.Module, qdir: str | os.PathLike) -> nn.Module:
    """Rebuild the fake-quant model of `qdir` on top of the float `model` (bit-exact)."""
    from safetensors.torch import load_file

    from ..models import model_source

    qdir = Path(qdir)
    meta = read_quant_json(qdir)
    src = model_source(model)
    want = (meta.get("model") or {}).get("checkpoint_sha256")
    if src is not None and want and src.checkpoint_sha256 and src.checkpoint_sha256 != want:
        raise MixqError(f"{qdir}/{QUANT_JSON} was made from checkpoint sha256 {want[:12]}…, "
                        f"the model's is {src.checkpoint_sha256[:12]}…")
    cfg = QuantConfig.from_dict(meta["config"])
    gm = prepare(model, cfg)
    qs = quantizers(gm)
    recs = {r["name"]: r for r in meta["quantizers"]}
    if set(qs) != set(recs):
        missing = sorted(set(recs) - set(qs))[:3]
        extra = sorted(set(qs) - set(recs))[:3]
        raise MixqError(f"{qdir}/{QUANT_JSON} does not match the model: quantizers only in the file {missing}, "
                        f"only in the model {extra}")
    try:
        tensors = load_file(str(qdir / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot read {qdir / WEIGHTS}: {e}") from None
    for name, q in qs.items():
        r = recs[name]
        try:
            scale, zp = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
        except KeyError:
            raise MixqError(f"{qdir / WEIGHTS} lacks the tensors of quantizer {name}") from None
        q.bits = int(r["bits"])
        if isinstance(q, WeightQuantizer):
            ints = tensors.get(f"{name}.int")
            layer_w = _owner_weight(gm, name)
            if ints is None or tuple(ints.shape) != tuple(layer_w.shape):
                raise MixqError(f"{qdir / WEIGHTS}: integer weights of {name} do not match the model's shape "
                                f"{tuple(layer_w.shape)}")
            shape = q.scale_shape(layer_w.shape)
            if scale.numel() != math.prod(shape):
                raise MixqError(f"{qdir / WEIGHTS}: scale of {name} has {scale.numel()} values, the model needs {shape}")
            q.set_scale(scale.reshape(shape), zp.reshape(shape))
            q.int_weight = ints.clone()
            q.mode = "int"
        else:
            assert isinstance(q, ActQuantizer)
            q.signed = bool(r["signed"])
            q.scale.data = scale.reshape(()).clone()
            q.zero_point = zp.reshape(()).clone()
            q.initialized.fill_(True)
            q.scale.requires_grad_(False)
    gm.mixq_config = cfg  # type: ignore[attr-defined]
    gm.mixq_report = meta.get("report")  # type: ignore[attr-defined]
    gm.mixq_quant_meta = meta  # type: ignore[attr-defined]
    if cfg.weight_only:
        for q in qs.values():
            if isinstance(q, ActQuantizer):
                q.enabled = False
    return gm.eval()


def _owner_weight(gm: nn.Module, qname: str) -> torch.Tensor:
    layer = gm.get_submodule(qname.rsplit(".", 1)[0])
    return layer.weight


def load_quantized_dir(qdir: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized model from `qdir` alone (model spec and checkpoint as recorded)."""
    from ..models import Preprocessing, load_model

    meta = read_quant_json(qdir)
    src = meta.get("model")
    if not src:
        raise MixqError(f"{qdir}/{QUANT_JSON} records no model source; pass --model/--checkpoint")
    ck = src.get("checkpoint")
    if ck and not Path(ck).is_file():
        raise MixqError(f"checkpoint recorded in {qdir}/{QUANT_JSON} is missing: {ck}")
    pre = Preprocessing.from_dict(src["preprocessing"])
    model = load_model(src["spec"], ck, random_init=bool(src.get("random_init")), mean=pre.mean, std=pre.std,
                       input_size=pre.input_size)
    return load_quantized(model, qdir)
