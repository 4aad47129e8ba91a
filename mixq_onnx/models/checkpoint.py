"""Safe checkpoint loading: weights_only torch.load or safetensors, wrapper dicts, `module.` prefixes."""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import MixqError

_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file on CPU, never unpickling arbitrary objects.

    Refuses NaN or inf in any floating tensor: such weights quantize to garbage scales silently."""
    path = Path(path)
    if not path.is_file():
        raise MixqError(f"checkpoint not found: {path}")
    if path.name == "weights.safetensors" and (path.parent / "quant.json").is_file():
        raise MixqError(f"{path} holds the quantizers of the result folder {path.parent}, not a float checkpoint: "
                        f"pass --quantized {path.parent} (it records the checkpoint it was made from)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MixqError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    check_sidecar(path, data)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            obj: object = load_safetensors(data)
        else:
            with warnings.catch_warnings():  # torch warns about a raw pickle before refusing it: one line, ours
                warnings.simplefilter("ignore")
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MixqError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is the user's file
        raise MixqError(f"cannot read checkpoint {path}: {_load_failure(e, path)}") from None
    sd = _unwrap(obj, path)
    bad = first_non_finite(sd)
    if bad is not None:
        raise MixqError(f"checkpoint {path} has {bad[1]} values in tensor {bad[0]}: refusing non-finite weights")
    return sd


def check_sidecar(path: Path, data: bytes) -> None:
    """A checkpoint written by mixq-onnx (`robustify`, `qat`) has a sidecar PATH.json recording its sha256:
    refuse the file when its bytes no longer match (edited, truncated or swapped after it was written)."""
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        return
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError, RecursionError):  # a damaged sidecar must not switch the check off
        raise MixqError(f"{side.name}, the sidecar beside checkpoint {path}, is not readable JSON, so the sha256 it "
                        "records cannot be checked: restore it, or move it away to load the checkpoint unchecked"
                        ) from None
    if not isinstance(rec, dict) or "sha256" not in rec:
        return  # another JSON document of that name (not a mixq-onnx sidecar): nothing recorded to check against
    want = rec["sha256"]
    if not (isinstance(want, str) and re.fullmatch(r"[0-9a-f]{64}", want)):
        raise MixqError(f"{side.name}, the sidecar beside checkpoint {path}, records no valid sha256 ({want!r:.40}): "
                        "restore it, or move it away to load the checkpoint unchecked")
    if hashlib.sha256(data).hexdigest() != want:
        raise MixqError(f"checkpoint {path} does not match the sha256 recorded in {side.name}: the file changed "
                        "after it was written")


def first_non_finite(sd: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(key, "NaN"/"inf") of the first floating tensor holding a non-finite value, or None."""
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            return k, ("NaN" if bool(torch.isnan(v).any()) else "inf")
    return None


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*)")


def _names_loaded_object(name: str) -> bool:
    """True if `name` is an attribute path in an already imported module (looked up statically: no
    import and no module `__getattr__` runs)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for part in parts[i:]:
            obj = inspect.getattr_static(obj, part, None)
            if obj is None:
                return False
        return True
    return False


def _load_failure(e: Exception, path: Path) -> str:
    """Why a checkpoint did not load, in words that never advise `weights_only=False`: torch's own
    message does, and following it would run whatever code the file pickles."""
    text = str(e)
    m = _GLOBAL.search(text)
    if m and _names_loaded_object(m.group(1)):
        return (f"it pickles {m.group(1)}, not just tensors, and mixq-onnx never unpickles objects: "
                "save the model's state_dict() (or a .safetensors file) instead")
    if m:  # a cut-off name ("torch._utils._rebu") is a truncated file, or an object of code not loaded here
        return f"the file is truncated or not a PyTorch checkpoint (unpickling stopped at {m.group(1)})"
    if isinstance(e, PermissionError):
        return f"permission denied ({e.strerror})"
    kind = "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    first = first.split(". ")[0].rstrip(".")  # torch appends advice after the first sentence
    if not first or re.search(r"weights.?only|unpickl|pickle", first, re.IGNORECASE):
        first = type(e).__name__
    return f"the file is truncated or not a {kind} ({first[:120]})"


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise MixqError(f"checkpoint {path} holds no state dict (expected tensors, or a dict with 'state_dict'/'model')")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `sd` into `model`, or raise one line naming the first missing/unexpected/mismatched keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (first: {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"shape mismatch {len(shape)} (first: {'; '.join(shape[:2])})")
        raise MixqError(f"checkpoint {source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(dict(sd), strict=False)
