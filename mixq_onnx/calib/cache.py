"""The on-disk calibration cache: fixed-size safetensors shards of uint8 images plus a manifest.

Layout of `calib_cache/<recipe-hash>/`:
  recipe.json          the recipe (written first; identifies an unfinished cache)
  shard-00000.safetensors ...  tensor `images` uint8 [n,H,W,3]; header metadata `records` (JSON list)
  manifest.json        written last: recipe, shards with sha256, one record per image
  .lock                flock-ed by the writing process

Every file is written to a temporary sibling and renamed, so a SIGKILL loses at most the shard in
progress and never leaves a readable-but-corrupt file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheLockedError, CorruptCacheError, MixqError
from ..utils import atomic_write_bytes, sha256_bytes, sha256_file

MANIFEST = "manifest.json"
RECIPE = "recipe.json"
LOCK = ".lock"
FORMAT_VERSION = 1
DEFAULT_ROOT = Path("calib_cache")


def default_root() -> Path:
    return Path(os.environ.get("MIXQ_CACHE_ROOT", DEFAULT_ROOT))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def encode_shard(images: torch.Tensor, records: list[dict[str, Any]]) -> bytes:
    """Deterministic bytes: one tensor, one metadata key (safetensors' header order is then fixed)."""
    from safetensors.torch import save

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"shard images must be uint8 [n,H,W,3], got {images.dtype} {tuple(images.shape)}")
    meta = {"records": json.dumps(records, sort_keys=True, separators=(",", ":"))}
    return save({"images": images.contiguous()}, metadata=meta)


def write_shard(path: Path, images: torch.Tensor, records: list[dict[str, Any]]) -> str:
    data = encode_shard(images, records)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_shard(path: Path) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        images = f.get_tensor("images")
    return images, json.loads(meta.get("records", "[]"))


def shard_is_complete(path: Path, expected: int) -> bool:
    """A shard file that parses and holds `expected` images (renames are atomic, so this is cheap)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("images").get_shape()[0]) == expected
    except Exception:  # noqa: BLE001 - unreadable means not done
        return False


@contextlib.contextmanager
def cache_lock(cache_dir: Path, wait: bool = True, poll_s: float = 1.0, log=print) -> Iterator[None]:
    """Serialise writers of one cache: the second waits (or fails with `wait=False`)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise CacheLockedError(
                    f"cache {cache_dir} is being written by another process (pid {holder}); "
                    "wait for it or re-run without --no-wait"
                ) from None
            log(f"waiting for cache lock held by pid {holder} ({cache_dir})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class CacheInfo:
    path: Path
    complete: bool
    recipe: dict[str, Any]
    num_images: int
    shards_done: int
    shards_total: int
    size_bytes: int

    def summary(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "hash": self.path.name,
            "path": str(self.path),
            "status": "complete" if self.complete else "incomplete",
            "generator": r.get("generator", {}).get("name"),
            "prompts": (r.get("prompts") or {}).get("strategy"),
            "num": r.get("num"),
            "images": self.num_images,
            "shards": f"{self.shards_done}/{self.shards_total}",
            "size_mb": round(self.size_bytes / 2**20, 2),
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"cannot read {path}: {e}") from None


def is_cache_dir(path: Path) -> bool:
    return (path / RECIPE).is_file() or (path / MANIFEST).is_file()


def resolve_cache(ref: str | os.PathLike, root: Path | None = None) -> Path:
    """A cache directory given as a path, a hash, or a unique hash prefix under `root`."""
    p = Path(ref)
    if p.is_dir() and is_cache_dir(p):
        return p
    root = root or default_root()
    if root.is_dir():
        hits = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(str(ref)) and is_cache_dir(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise MixqError(f"cache reference {ref!r} is ambiguous under {root}: {', '.join(h.name for h in hits[:5])}")
    raise MixqError(f"no calibration cache at {ref!r} (looked for a directory with {MANIFEST}, and under {root})")


def info(path: Path) -> CacheInfo:
    man = path / MANIFEST
    if man.is_file():
        m = _read_json(man)
        size = sum(f.stat().st_size for f in path.glob("shard-*.safetensors"))
        return CacheInfo(path, True, m["recipe"], len(m["images"]), len(m["shards"]), len(m["shards"]), size)
    recipe = _read_json(path / RECIPE)
    num, ss = int(recipe["num"]), int(recipe["shard_size"])
    total = -(-num // ss)
    done = sum(1 for i in range(total) if shard_is_complete(path / shard_name(i), min(ss, num - i * ss)))
    size = sum(f.stat().st_size for f in path.glob("shard-*.safetensors"))
    return CacheInfo(path, False, recipe, done * ss if done < total else num, done, total, size)


def list_caches(root: Path | None = None) -> list[CacheInfo]:
    root = root or default_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and is_cache_dir(d):
            try:
                out.append(info(d))
            except (MixqError, KeyError, ValueError):
                continue
    return out


def load_manifest(path: Path) -> dict[str, Any]:
    man = path / MANIFEST
    if not man.is_file():
        if (path / RECIPE).is_file():
            raise MixqError(f"cache {path} is incomplete (no {MANIFEST}): re-run the same calib command to finish it")
        raise MixqError(f"{path} is not a calibration cache (no {MANIFEST})")
    return _read_json(man)


@dataclass
class VerifyResult:
    path: Path
    ok: bool
    num_images: int
    problems: list[str]


def verify(path: Path) -> VerifyResult:
    """Re-hash every shard against the manifest; check counts and index uniqueness."""
    m = load_manifest(path)
    problems: list[str] = []
    seen: set[int] = set()
    count = 0
    for s in m["shards"]:
        f = path / s["file"]
        if not f.is_file():
            problems.append(f"missing shard {s['file']}")
            continue
        if sha256_file(f) != s["sha256"]:
            problems.append(f"corrupt shard {s['file']} (sha256 mismatch)")
            continue
        try:
            images, records = read_shard(f)
        except Exception as e:  # noqa: BLE001
            problems.append(f"unreadable shard {s['file']}: {e}")
            continue
        if images.shape[0] != s["count"] or len(records) != s["count"]:
            problems.append(f"shard {s['file']} holds {images.shape[0]} images, manifest says {s['count']}")
        for r in records:
            if r["index"] in seen:
                problems.append(f"duplicate image index {r['index']} in {s['file']}")
            seen.add(r["index"])
        count += int(images.shape[0])
    expected = int(m["recipe"].get("keep") or m["recipe"]["num"])
    if count != expected and not problems:
        problems.append(f"cache holds {count} images, recipe asks for {expected}")
    if len(m["images"]) != expected:
        problems.append(f"manifest lists {len(m['images'])} image records, recipe asks for {expected}")
    return VerifyResult(path, not problems, count, problems)


def remove(path: Path) -> None:
    if not is_cache_dir(path):
        raise MixqError(f"refusing to remove {path}: not a calibration cache")
    with cache_lock(path, wait=False):
        tomb = path.with_name(f".{path.name}.removing.{os.getpid()}.{int(time.time())}")
        os.replace(path, tomb)
    shutil.rmtree(tomb, ignore_errors=True)


def load_images(path: Path) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """All images (uint8 [N,H,W,3]) and their manifest records, in index order."""
    m = load_manifest(path)
    chunks = []
    for s in m["shards"]:
        f = path / s["file"]
        if not f.is_file():
            raise CorruptCacheError(f"cache {path} is missing shard {s['file']}: run `mixq-onnx cache verify`")
        images, _ = read_shard(f)
        chunks.append(images)
    if not chunks:
        raise MixqError(f"cache {path} holds no images")
    return torch.cat(chunks), m["images"]
