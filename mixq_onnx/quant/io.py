"""`quant.json` + `weights.safetensors`: the quantized model on disk, read back bit for bit.

quant.json records every quantizer (name, placement, bits, scale(s), axis, signedness) and the model's
source (spec, checkpoint, each file by absolute path and sha256, preprocessing), so a quantized directory is
self-contained: `export`, `verify` and `eval --quantized` need no other model flag (a recorded spec
that names code runs only with `trust_model_code`), from any directory; moved model files are given back
with --model/--checkpoint and recognised by their sha256 (`folder_model`). Folders can come from anyone:
reading one validates every field and quantizer, and writing one never removes files it did not write.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..utils import (
    atomic_path,
    check_apart,
    check_can_create,
    read_regular,
    sha256_file,
    sweep_stale_tmp,
    tmp_prefix,
)
from .config import QuantConfig
from .graph import prepare, quantizers
from .modules import QUANT_LAYERS
from .quantizer import ActQuantizer, WeightQuantizer, quantizer_state, validate_record
from .spec import QuantSpec

QUANT_JSON = "quant.json"
WEIGHTS = "weights.safetensors"
WEIGHTS_SHA256 = "weights_sha256"  # in quant.json: ties it to the weights written with it
MODEL_SHA256 = "model_sha256"  # in quant.json's model: the sha256 of a `file.py:factory` spec's file
TRAINED_BIASES = "trained_biases"  # in quant.json: layers whose bias weights.safetensors holds ("LAYER.bias")
FORMAT = 1
_TENSOR_KEYS = ("scale", "zero_point", "int")


# ----------------------------------------------------------------------------- writing
def save_quantized(qmodel: nn.Module, out: str | os.PathLike, extra: dict[str, Any] | None = None,
                   overwrite: bool = False, files: Mapping[str, bytes] | None = None) -> Path:
    """Write `quant.json` and `weights.safetensors` for a model returned by `quantize`.

    A new folder, or an empty one, is written as a temporary sibling and renamed into place, so a kill
    leaves no half result. An existing non-empty folder is refused unless `overwrite`; then only the two
    files are replaced (each atomically, weights first, quant.json last, recording the weights' sha256),
    so the user's other files stay and a reader never pairs a new quant.json with old weights. `files`
    (name -> bytes, e.g. a stage's report and plot) go into the same folder the same way, before quant.json."""
    files = dict(files or {})
    for name in files:
        if name in (QUANT_JSON, WEIGHTS) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"save_quantized: {name!r} is not a plain extra file name")
    from safetensors.torch import save

    from .. import __version__
    from ..models import model_source

    require_quantized(qmodel)
    out = check_output_dir(out, overwrite)
    cfg: QuantConfig = qmodel.mixq_config  # type: ignore[attr-defined]
    src = model_source(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for name, q in quantizers(qmodel).items():
        rec, ts = quantizer_state(q)
        records.append(rec)
        tensors.update({f"{name}.{k}": v.detach().cpu() for k, v in ts.items()})  # a model on a GPU too
    trained = _trained_biases(qmodel)
    tensors.update({f"{name}.bias": b.detach().cpu().clone() for name, b in trained.items()})
    weights = save(tensors, metadata={"format": str(FORMAT)})
    meta = {
        "format": FORMAT,
        "mixq_onnx": __version__,
        "deployable": cfg.symmetric,
        "config": cfg.to_dict(),
        "model": source_record(src) if src else None,
        "units": list(qmodel.mixq_units),  # type: ignore[attr-defined]
        "quantizers": records,
        "report": getattr(qmodel, "mixq_report", None),
        **({"calibration": qmodel.mixq_calibration} if getattr(qmodel, "mixq_calibration", None) else {}),
        **({TRAINED_BIASES: list(trained)} if trained else {}),
        **(extra or {}),
        WEIGHTS_SHA256: hashlib.sha256(weights).hexdigest(),
    }
    text = (json.dumps(meta, indent=2) + "\n").encode()
    try:
        if out.is_dir() and any(out.iterdir()):  # --overwrite: replace just our files, keep the user's
            sweep_stale_tmp(out.resolve())  # a killed earlier run's temporary folder beside it
            stale = [n for n in _stage_files_ours(out) if n not in files]
            _write_file(out / WEIGHTS, weights)
            for name, data in files.items():
                _write_file(out / name, data)
            _write_file(out / QUANT_JSON, text)
            for name in stale:  # another stage's report of the folder's old result (qat's over a quantize)
                (out / name).unlink(missing_ok=True)
        else:
            _write_new_dir(out, {WEIGHTS: weights, **files, QUANT_JSON: text})
    except OSError as e:
        raise MixqError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def _trained_biases(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> bias of the layers whose biases a stage trained (`qat --train-biases` sets
    `mixq_trained_biases`); every other float parameter is rebuilt from the recorded checkpoint."""
    names = set(getattr(qmodel, "mixq_trained_biases", ()))
    if not names:
        return {}
    out = {m.name: m.bias for m in qmodel.modules() if isinstance(m, QUANT_LAYERS) and m.name in names}
    if set(out) != names or any(b is None for b in out.values()):
        raise ValueError(f"save_quantized: trained biases of layers the model lacks: {sorted(names - set(out))[:3]}")
    return out  # type: ignore[return-value]


def model_file(spec: str) -> Path | None:
    """The file a `path/to/file.py:factory` spec names (as written, not resolved), else None (zoo, timm and
    `package.module:factory` specs)."""
    from ..models import is_code_spec

    if not is_code_spec(spec):
        return None
    target = spec.rpartition(":")[0]
    return Path(target) if target.endswith(".py") or "/" in target or os.sep in target else None


def source_record(src: Any) -> dict[str, Any]:
    """A `ModelSource` as quant.json records it: paths resolved (the checkpoint already is; a model file
    becomes absolute) and beside each its sha256, so the folder reads the same from any directory and a
    moved file given back with --model/--checkpoint is recognised by its content."""
    from ..models import canonical_spec

    rec = src.to_dict()
    path = model_file(rec["spec"])
    if path is not None:
        rec["spec"] = canonical_spec(rec["spec"])
        rec[MODEL_SHA256] = sha256_file(path) if path.is_file() else None
    return rec


#: files a stage adds to a result folder beside quant.json (qat's report and bit chart): replaced with the result
QAT_REPORT_FILES = ("qat.json", "bits.png")


def _stage_files_ours(out: Path) -> list[str]:
    """The stage files in `out` that mixq-onnx wrote (a qat.json holding qat's report keys, and then its chart):
    an overwrite removes them with the old result, and never a user's file of the same name."""
    try:
        rep = json.loads((out / QAT_REPORT_FILES[0]).read_text())
    except (OSError, ValueError):
        return []
    if not (isinstance(rep, dict) and {"method", "achieved", "quantizers"} <= set(rep)):
        return []
    return [n for n in QAT_REPORT_FILES if (out / n).is_file()]


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, extra: tuple[str, ...] = (),
                     inputs: tuple[Any, ...] = ()) -> Path:
    """Raise `MixqError` unless `save_quantized(..., out, overwrite=overwrite)` may write there: call it
    before a long quantization too, so a refusal does not come after the work. `extra`: the other files the
    command writes there (named in the message); `inputs`: what the command reads (checkpoint, data, cache),
    which the folder must neither hold nor lie inside (`utils.check_apart`)."""
    if not str(out).strip():
        raise MixqError("--out is empty: give a folder path")
    out = Path(out)
    check_apart(out, inputs)
    if out.is_symlink() and not out.exists():
        raise MixqError(f"{out} is a dangling symbolic link; choose another output path")
    if out.exists() and not out.is_dir():
        raise MixqError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = [QUANT_JSON, WEIGHTS, *extra]
        raise MixqError(f"{out} exists and is not empty; pass --overwrite to replace its {', '.join(names[:-1])} "
                        f"and {names[-1]}")
    check_can_create(out)
    return out


def _write_new_dir(out: Path, files: dict[str, bytes]) -> None:
    """Fill a temporary sibling folder, then rename it to `out` (never a half-written result folder). A link
    to an empty folder: the folder it names is replaced the same way, the link stays."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    sweep_stale_tmp(out)
    tmp = out.with_name(f"{tmp_prefix(out)}{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        if out.is_dir():  # an empty folder the user made: replaced in one rename, keeping its mode
            os.chmod(tmp, out.stat().st_mode & 0o7777)
        for name, data in files.items():
            _write_file(tmp / name, data)
        try:
            os.rename(tmp, out)  # POSIX: a folder may replace an empty folder, never a non-empty one
        except OSError:
            if out.is_dir() and not any(out.iterdir()):  # a mount point (EBUSY, EXDEV): file by file inside it,
                for name, data in files.items():  # each atomic, in the given order (quant.json last)
                    _write_file(out / name, data)
            elif out.exists():
                raise MixqError(f"{out} was filled while it was being written; nothing was changed in it") from None
            else:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` by `data`, keeping the mode of the file it replaces (new: 0666 & ~umask)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ----------------------------------------------------------------------------- reading
_TOP_LEVEL = {"config": (dict,), "model": (dict, type(None)), "quantizers": (list,)}
_OPTIONAL = {"units": (list,), "report": (dict, type(None)), WEIGHTS_SHA256: (str,), TRAINED_BIASES: (list,)}
_SOURCE = {"spec": (str,), "checkpoint": (str, type(None)), "checkpoint_sha256": (str, type(None)),
           "random_init": (bool,), "preprocessing": (dict,)}
_SOURCE_OPTIONAL = {MODEL_SHA256: (str, type(None))}  # folders from before it have none: nothing to check


def read_quant_json(qdir: str | os.PathLike) -> dict[str, Any]:
    """quant.json of `qdir`, with its top-level structure checked (a folder can come from anyone)."""
    qdir = Path(qdir)
    f = qdir / QUANT_JSON
    if not f.is_file():
        raise MixqError(f"{qdir} is not a quantized model directory (no {QUANT_JSON})")
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MixqError(f"cannot read {f}: {e}") from None
    if not isinstance(meta, dict):
        raise MixqError(f"{f} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise MixqError(f"{f} has format {meta.get('format')!r}, this mixq-onnx reads format {FORMAT}")
    _check_fields(meta, _TOP_LEVEL, _OPTIONAL, str(f))
    if meta["model"] is not None:
        _check_fields(meta["model"], _SOURCE, _SOURCE_OPTIONAL, f"{f}: model")
    return meta


def _check_fields(d: Mapping[str, Any], required: Mapping[str, tuple[type, ...]],
                  optional: Mapping[str, tuple[type, ...]], where: str) -> None:
    for key, types in {**required, **optional}.items():
        if key not in d:
            if key in required:
                raise MixqError(f"{where} lacks {key!r}")
            continue
        if not isinstance(d[key], types):
            want = " or ".join("null" if t is type(None) else {"dict": "object", "list": "list", "str": "string",
                                                                "bool": "true/false"}[t.__name__] for t in types)
            raise MixqError(f"{where}: {key} is {type(d[key]).__name__}, expected {want}")


def _config(meta: dict[str, Any], where: str) -> QuantConfig:
    c = meta["config"]
    for key, ok in (("wbits", _is_int), ("abits", _is_int), ("symmetric", lambda v: isinstance(v, bool)),
                    ("first_last_bits", lambda v: v is None or _is_int(v)),
                    ("block_size", lambda v: v is None or _is_int(v)), ("method", lambda v: isinstance(v, str))):
        if key in c and not ok(c[key]):
            raise MixqError(f"{where}: config {key} is {c[key]!r}")
    try:
        return QuantConfig.from_dict(c).validate()
    except (TypeError, ValueError) as e:
        raise MixqError(f"{where}: config is not valid: {e}") from None
    except MixqError as e:
        raise MixqError(f"{where}: config is not valid: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_weights(qdir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """weights.safetensors, checked against the sha256 that quant.json must record."""
    from safetensors.torch import load

    path = qdir / WEIGHTS
    try:
        data = read_regular(path)
    except OSError as e:
        raise MixqError(f"cannot read {path}: {e.strerror or e}") from None
    want = meta.get(WEIGHTS_SHA256)
    if want is None:  # every writer records it: without it a swapped weights file would load unnoticed
        raise MixqError(f"{qdir / QUANT_JSON} records no {WEIGHTS_SHA256}, so {WEIGHTS} cannot be checked against it: "
                        "re-run the command that wrote the folder")
    have = hashlib.sha256(data).hexdigest()
    if have != want.lower():
        raise MixqError(f"{path} does not match {qdir / QUANT_JSON}: its sha256 is {have[:12]}…, quant.json records "
                        f"{want[:12]}… (edited, or replaced by an interrupted --overwrite)")
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - whatever the parser says, the file is unusable
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MixqError(f"cannot read {path}: {first}") from None
    return tensors


def _records(meta: dict[str, Any], where: str) -> dict[str, Any]:
    recs: dict[str, Any] = {}
    for i, r in enumerate(meta["quantizers"]):
        name = r.get("name") if isinstance(r, dict) else None
        if not isinstance(name, str):
            raise MixqError(f"{where}: quantizer record {i} has no name")
        if name in recs:
            raise MixqError(f"{where}: quantizer {name} is recorded twice")
        recs[name] = r
    return recs


def _weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight quantizer name -> shape of the layer weight it quantizes."""
    out = {}
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        w = getattr(m, "weight", None)
        if isinstance(wq, WeightQuantizer) and isinstance(w, torch.Tensor):
            out[wq.name] = tuple(w.shape)
    return out


def check_recorded_sha256(path: str | os.PathLike, want: str | None, what: str, where: str | os.PathLike) -> None:
    """Raise a one-line `MixqError` naming `path` and both sha256 prefixes unless the file's sha256 is `want`
    (the one `where` records); `want` None (a folder from before the hash was recorded) checks nothing."""
    if not want:
        return
    path = Path(path)
    try:
        have = sha256_file(path)
    except OSError as e:
        raise MixqError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if have != want.lower():
        raise MixqError(f"{what} {path} does not match {where}: its sha256 is {have[:12]}…, "
                        f"{Path(where).name} records {want[:12]}…")


def _check_model_matches(model: nn.Module, meta: dict[str, Any], qdir: Path) -> None:
    """The user's model must be the recorded one: same spec (a model file by the sha256 quant.json records,
    wherever it lies now: older folders record none, and their file is not compared), same checkpoint sha256."""
    from ..models import model_source, same_spec

    src, rec = model_source(model), meta["model"]
    where = qdir / QUANT_JSON
    if rec is not None:
        _check_preprocessing(model, rec, where)
    if src is None or rec is None:
        return  # a model built in Python, or a folder that records no source: nothing more to compare
    rfile, gfile = model_file(rec["spec"]), model_file(src.spec)
    files = rfile is not None and gfile is not None and rec["spec"].rpartition(":")[2] == src.spec.rpartition(":")[2]
    if not files and not same_spec(rec["spec"], src.spec):
        raise MixqError(f"{where} does not match the model: it was made from model {rec['spec']!r}, "
                        f"the model given is {src.spec!r}")
    if gfile is not None:
        check_recorded_sha256(gfile, rec.get(MODEL_SHA256), "model file", where)
    want, have = rec["checkpoint_sha256"], src.checkpoint_sha256
    if want != have:
        def show(sha: str | None, path: str | None) -> str:
            if not sha:
                return "no checkpoint (random or pretrained weights)"
            return f"checkpoint sha256 {sha[:12]}…" + (f" ({path})" if path else "")

        raise MixqError(f"{where} does not match the model: it was made from {show(want, rec['checkpoint'])}, "
                        f"the model given has {show(have, src.checkpoint)}")


def _recorded_preprocessing(rec: dict[str, Any], where: str | os.PathLike) -> Any:
    from ..models import Preprocessing

    try:
        return Preprocessing.from_dict(rec["preprocessing"])
    except MixqError as e:
        raise MixqError(f"{where}: model {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise MixqError(f"{where}: model preprocessing is not valid ({type(e).__name__}: {e})") from None


def _check_preprocessing(model: nn.Module, rec: dict[str, Any], where: str | os.PathLike) -> None:
    """The model must see its inputs as the result was calibrated on them: a quantized model evaluated,
    exported or verified under another mean, std or input size reports numbers for a model nobody made."""
    from ..models import get_preprocessing

    want, have = _recorded_preprocessing(rec, where), get_preprocessing(model)
    if want != have:
        def show(p: Any) -> str:
            return f"mean {list(p.mean)}, std {list(p.std)}, input size {list(p.input_size)}, {p.interpolation}"

        raise MixqError(f"{where} does not match the model's preprocessing: it was made with {show(want)}, the "
                        f"model given has {show(have)} (leave --mean/--std/--input-size out, or load the model "
                        "with the recorded ones)")


def load_quantized(model: nn.Module, qdir: str | os.PathLike) -> nn.Module:
    """Rebuild the fake-quant model of `qdir` on top of the float `model` (bit-exact).

    Every quantizer goes through `validate_record` first: values someone edited, or a damaged file,
    give a `MixqError` naming the quantizer instead of a model computing garbage."""
    qdir = Path(qdir)
    meta = read_quant_json(qdir)
    where = str(qdir / QUANT_JSON)
    _check_model_matches(model, meta, qdir)
    cfg = _config(meta, where)
    recs = _records(meta, where)
    tensors = _read_weights(qdir, meta)
    gm = prepare(model, cfg)
    qs = quantizers(gm)
    if set(qs) != set(recs):
        missing = sorted(set(recs) - set(qs))[:3]
        extra = sorted(set(qs) - set(recs))[:3]
        raise MixqError(f"{where} does not match the model: quantizers only in the file {missing}, "
                        f"only in the model {extra}")
    shapes = _weight_shapes(gm)
    for name, q in qs.items():
        r = recs[name]
        ts = {k: tensors.get(f"{name}.{k}") for k in _TENSOR_KEYS}
        validate_record(r, ts, shapes.get(name) if isinstance(q, WeightQuantizer) else None, like=q)
        scale, zp = ts["scale"], ts["zero_point"]
        assert scale is not None and zp is not None
        q.apply_spec(QuantSpec.from_record(r))  # bits and sign, from the one record of this quantizer
        if isinstance(q, WeightQuantizer):
            shape = q.scale_shape(ts["int"].shape)  # type: ignore[union-attr]
            q.set_scale(scale.reshape(shape), zp.reshape(shape))
            q.int_weight = ts["int"].clone()  # type: ignore[union-attr]
            q.mode = "int"
        else:
            assert isinstance(q, ActQuantizer)
            q.scale.data = scale.reshape(()).clone()
            q.zero_point = zp.reshape(()).clone()
            q.initialized.fill_(True)
            q.scale.requires_grad_(False)
    _load_biases(gm, meta.get(TRAINED_BIASES, []), tensors, where)
    gm.mixq_config = cfg  # type: ignore[attr-defined]
    gm.mixq_report = meta.get("report")  # type: ignore[attr-defined]
    gm.mixq_quant_meta = meta  # type: ignore[attr-defined]
    if cfg.weight_only:
        for q in qs.values():
            if isinstance(q, ActQuantizer):
                q.enabled = False
    return gm.eval()


def _load_biases(gm: nn.Module, names: list[Any], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Put the stored biases of `names` (quant.json's trained_biases) into their layers, each checked: a
    quantized layer of the model with a bias, a finite float tensor of that bias's shape."""
    layers = {m.name: m for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
    if len(set(map(str, names))) != len(names):
        raise MixqError(f"{where}: {TRAINED_BIASES} names a layer twice")
    for name in names:
        m = layers.get(name) if isinstance(name, str) else None
        if m is None or m.bias is None:
            raise MixqError(f"{where}: {TRAINED_BIASES} names {name!r}, not a quantized layer with a bias")
        t = tensors.get(f"{name}.bias")
        if t is None:
            raise MixqError(f"weights.safetensors lacks the trained bias of {name}")
        if tuple(t.shape) != tuple(m.bias.shape) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise MixqError(f"the trained bias of {name} in weights.safetensors is not {tuple(m.bias.shape)} finite "
                            f"floats (shape {tuple(t.shape)}, {t.dtype})")
        with torch.no_grad():
            m.bias.copy_(t.to(m.bias.dtype))
    gm.mixq_trained_biases = tuple(names)  # type: ignore[attr-defined]


def require_quantized(qmodel: nn.Module) -> None:
    """Refuse a float model where a quantized one is needed (writers of result folders and graphs)."""
    if not hasattr(qmodel, "mixq_config") or not quantizers(qmodel):
        raise MixqError("the model has no quantizers: pass the model `quantize`, `qat.train` or `load_quantized` "
                        "returned (a float model exports with export_fp)")


def validate_quantized_model(qmodel: nn.Module) -> None:
    """Apply `validate_record` to every quantizer of a model in memory (what `export_qdq` writes)."""
    shapes = _weight_shapes(qmodel)
    require_quantized(qmodel)
    for name, q in quantizers(qmodel).items():
        if isinstance(q, WeightQuantizer) and q.mode != "int":
            raise MixqError(f"quantizer {name}: weights are not frozen to integers (mode {q.mode!r}); "
                            "quantize must finish before export")
        rec, ts = quantizer_state(q)
        validate_record(rec, ts, shapes.get(name) if isinstance(q, WeightQuantizer) else None, like=q)


def folder_model(qdir: str | os.PathLike, spec: str | None = None, checkpoint: str | os.PathLike | None = None, *,
                 random_init: bool = False, mean: Any = None, std: Any = None, input_size: Any = None,
                 trust_model_code: bool = False) -> Any:
    """The float model of result folder `qdir` as `ModelOptions`: what its quant.json records (spec, checkpoint,
    preprocessing), with what the user gives (`spec`, `checkpoint`, ... : --model, --checkpoint, --mean, ...)
    in place of it, so a moved folder or moved model files are found again.

    A model file and a checkpoint, recorded or given, must have the sha256 quant.json records (checked
    before the file is read or imported; older folders record no model file hash, and nothing is then
    compared). A recorded spec naming code (`file.py:factory`, `package.module:factory`) or a hub model
    (`hf-hub:…`, fetched from the network) is used only with `trust_model_code`: a result folder can come
    from anyone, and reading it must never run code (or reach the network) the user did not choose. Zoo and
    timm names are always fine."""
    from ..models import ModelOptions, is_code_spec, is_hub_spec

    qdir = Path(qdir)
    meta = read_quant_json(qdir)
    src, where = meta["model"], qdir / QUANT_JSON
    if not src:
        if spec is None:
            raise MixqError(f"{where} records no model source; pass --model/--checkpoint")
        return ModelOptions(spec, None if checkpoint is None else str(checkpoint), random_init, mean, std, input_size)
    rec_spec = src["spec"]
    if spec is None:
        if is_code_spec(rec_spec) and not trust_model_code:
            raise MixqError(f"{where} names model code {rec_spec!r}; pass --model SPEC (it must match) "
                            "or --trust-model-code")
        if is_hub_spec(rec_spec) and not trust_model_code:
            raise MixqError(f"{where} names a Hugging Face hub model {rec_spec!r}, which would be fetched; pass "
                            "--model SPEC yourself or --trust-model-code")
        spec = rec_spec
    file, want = model_file(spec), src.get(MODEL_SHA256)
    if file is not None and model_file(rec_spec) is not None:  # the recorded file, or the user's copy of it
        if not file.is_file():
            moved = f"; pass --model PATH.py:{spec.rpartition(':')[2]}" + (f" (the file with sha256 {want[:12]}…)"
                                                                           if want else "")
            raise MixqError(f"model file not found: {file}" + (moved if spec == rec_spec else ""))
        check_recorded_sha256(file, want, "model file", where)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise MixqError(f"checkpoint not found: {checkpoint}")
        check_recorded_sha256(checkpoint, src["checkpoint_sha256"], "checkpoint", where)
    elif not random_init:
        checkpoint, random_init = src["checkpoint"], src["random_init"]
        if checkpoint and not Path(checkpoint).is_file():
            sha = src["checkpoint_sha256"]
            raise MixqError(f"checkpoint recorded in {where} is missing: {checkpoint}; pass --checkpoint FILE"
                            + (f" (the file with sha256 {sha[:12]}…)" if sha else ""))
    pre = _recorded_preprocessing(src, where)
    return ModelOptions(spec, None if checkpoint is None else str(checkpoint), random_init,
                        pre.mean if mean is None else tuple(mean), pre.std if std is None else tuple(std),
                        pre.input_size if input_size is None else input_size)


def load_source_model(qdir: str | os.PathLike, trust_model_code: bool = False) -> nn.Module:
    """The float model `qdir` records (spec, checkpoint, preprocessing); see `folder_model` for the checks
    and for when recorded model code is imported."""
    from ..models import load_model

    return load_model(folder_model(qdir, trust_model_code=trust_model_code))


def load_quantized_dir(qdir: str | os.PathLike, trust_model_code: bool = False) -> nn.Module:
    """Rebuild the quantized model from `qdir` alone (model spec and checkpoint as recorded); see
    `load_source_model` for when recorded model code is imported."""
    return load_quantized(load_source_model(qdir, trust_model_code), qdir)


def load_result(qdir: str | os.PathLike, model: Any = None, trust_model_code: bool = False
                ) -> tuple[nn.Module, nn.Module]:
    """(float model, quantized model) of a result folder, as every command that reads one needs them.

    The float model is the caller's `model` (an nn.Module or `ModelOptions`; checked against the recorded
    spec, checkpoint sha256 and preprocessing by `load_quantized`) or, without one, the recorded model (see
    `load_source_model` for when recorded model code is imported). A `ModelOptions` that leaves mean, std or
    input size unset takes the recorded ones, as the CLI's --model does."""
    from ..models import ModelOptions, load_model

    if model is None:
        fp = load_source_model(qdir, trust_model_code)
    elif isinstance(model, ModelOptions):
        rec = read_quant_json(qdir)["model"]
        if rec is not None:
            pre = _recorded_preprocessing(rec, Path(qdir) / QUANT_JSON)
            model = replace(model, mean=pre.mean if model.mean is None else model.mean,
                            std=pre.std if model.std is None else model.std,
                            input_size=pre.input_size if model.input_size is None else model.input_size)
        fp = load_model(model)
    else:
        fp = model
    return fp, load_quantized(fp, qdir)
