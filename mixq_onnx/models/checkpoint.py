"""Safe checkpoint loading: weights_only torch.load or safetensors, wrapper dicts, `module.` prefixes."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import MixqError

SUFFIXES = (".pt", ".pth", ".th", ".bin", ".safetensors")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file on CPU, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise MixqError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except MixqError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MixqError(f"cannot read checkpoint {path}: {first[:200]}") from None
    return _unwrap(obj, path)


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
