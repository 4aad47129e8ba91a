"""The on-disk calibration cache: fixed-size safetensors shards of uint8 images plus a manifest.

Layout of `calib_cache/<recipe-hash>/`:
  recipe.json          the recipe (written first; identifies an unfinished cache)
  shard-00000.safetensors ...  tensor `images` uint8 [n,H,W,3]; header metadata `records` (JSON list)
  manifest.json        written last: recipe, shards with sha256, one record per image
  .lock                flock-ed by the writing process

Every file is written to a temporary sibling and renamed, so a SIGKILL loses at most the shard in
progress and never leaves a readable-but-corrupt file. Readers of a sealed cache (`load_images`,
`verify`) read each shard once and check its bytes against the manifest's sha256 before decoding.
`remove` deletes only a cache directly under the cache root whose folder name is its recipe hash.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheLockedError, CorruptCacheError, MixqError
from ..utils import (
    LOCK_NAME,
    atomic_write_bytes,
    canonical_json,
    folder_lock,
    pid_alive,
    read_regular,
    sha256_bytes,
    sha256_file,
)

MANIFEST = "manifest.json"
RECIPE = "recipe.json"
LOCK = LOCK_NAME
FORMAT_VERSION = 1
DEFAULT_ROOT = Path("calib_cache")


def default_root() -> Path:
    return Path(os.environ.get("MIXQ_CACHE_ROOT", DEFAULT_ROOT))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


MAX_NUM = 100_000  # images of one cache (`calib --num`): a recipe asking for more is not one calib wrote


def candidate_name(i: int) -> str:
    """A `--filter` cache's candidate shard: scored, then replaced by the kept `shard_name` shards."""
    return f"cand-{i:05d}.safetensors"


LEFTOVER_PATTERNS = ("cand-*.safetensors", "*.stats.json", ".*.tmp")  # a writer's files, gone once sealed


#: the files a sealed cache keeps: its recipe, manifest and shards
_CACHE_ENTRY = re.compile(r"^(?:shard-\d{5}\.safetensors|recipe\.json|manifest\.json)$")


def _is_cache_entry(e: Path) -> bool:
    """An entry a cache writer makes (`check_removable` deletes no folder holding anything else): the lock, a
    `_CACHE_ENTRY` file, or one of the working files it sweeps itself (`LEFTOVER_PATTERNS`)."""
    if e.name == LOCK:
        return True
    if any(fnmatch.fnmatchcase(e.name, p) for p in LEFTOVER_PATTERNS):
        return e.is_file() or e.name.endswith(".tmp")
    return bool(_CACHE_ENTRY.match(e.name)) and e.is_file()


#: a cache folder's name under its root: its recipe hash
HASH_NAME = re.compile(r"^[0-9a-f]{16}$")


def recipe_hash(recipe: dict[str, Any]) -> str:
    """The cache key: a cache lives in `<root>/<recipe_hash(recipe)>/`."""
    return sha256_bytes(canonical_json(recipe).encode())[:16]


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
    """Images and records of a shard, without a hash check (for shards this run is still writing)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        images = f.get_tensor("images")
    records = json.loads(meta.get("records", "[]"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("the shard's records are not a list of objects")
    return images, records


def decode_shard(data: bytes) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Images and records from a shard's bytes (the bytes already hashed, so the file is read once)."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    images = load(data)["images"]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:  # what `encode_shard` writes
        raise ValueError(f"shard images must be uint8 [n,H,W,3], got {images.dtype} {tuple(images.shape)}")
    records = json.loads(meta.get("records", "[]"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("the shard's records are not a list of objects")
    return images, records


def read_shard_checked(path: Path, sha256: str) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A sealed shard, read once: its bytes must match the manifest's sha256 before they are decoded.

    Raises CorruptCacheError naming the shard when it is missing, altered or undecodable.
    """
    cache_dir, name = path.parent, path.name
    try:
        data = read_regular(path)
    except FileNotFoundError:
        if not (cache_dir / MANIFEST).is_file():  # `cache rm` renamed the folder away mid-read: not corruption
            raise MixqError(f"cache {cache_dir} was removed while it was being read") from None
        raise CorruptCacheError(f"cache {cache_dir} is missing shard {name}: run `mixq-onnx cache verify`") from None
    except OSError as e:
        raise CorruptCacheError(f"cannot read shard {name} of cache {cache_dir}: {e.strerror or e}") from None
    if sha256_bytes(data) != sha256:
        raise CorruptCacheError(
            f"shard {name} of cache {cache_dir} is corrupt (sha256 mismatch): remove the cache and re-run calib"
        )
    try:
        return decode_shard(data)
    except Exception as e:  # noqa: BLE001 - hash matched but the writer stored garbage
        msg = " ".join(str(e).split())[:160]
        raise CorruptCacheError(f"shard {name} of cache {cache_dir} cannot be decoded: {msg}") from None


def stats_path(shard: Path) -> Path:
    """A shard's stats file while its cache is being written (removed once sealed; the manifest keeps them)."""
    return shard.with_name(shard.name + ".stats.json")


def shard_is_written(path: Path, expected: int) -> bool:
    """A shard a writer finished: complete (`shard_is_complete`), with the bytes whose sha256 its stats file
    records. Resuming trusts nothing else: a shard edited after it was written, or one whose stats are gone (a
    sealed cache's, once its manifest is lost), is generated again, with the same bytes."""
    try:
        want = json.loads(read_regular(stats_path(path))).get("sha256")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(want, str) and shard_is_complete(path, expected) and sha256_file(path) == want


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
def cache_lock(cache_dir: Path, wait: bool = True, log=print,
               busy_hint: str = "wait for it or re-run without --no-wait") -> Iterator[None]:
    """Serialise writers of one cache: the second waits (or fails with `wait=False`).

    `busy_hint` ends the CacheLockedError message: the caller knows which advice fits its command.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(cache_dir, wait=wait, log=log, what=f"cache {cache_dir}", busy_hint=busy_hint,
                     busy_error=CacheLockedError):
        yield


@dataclass
class CacheInfo:
    path: Path
    complete: bool
    recipe: dict[str, Any]
    num_images: int
    shards_done: int
    shards_total: int
    size_bytes: int
    problem: str | None = None  # why the cache cannot be read (status "broken"); None when readable

    def summary(self) -> dict[str, Any]:
        r = self.recipe
        gen = r.get("generator")
        prompts = r.get("prompts")
        out = {
            "hash": self.path.name,
            "path": str(self.path),
            "status": "broken" if self.problem else ("complete" if self.complete else "incomplete"),
            "generator": gen.get("name") if isinstance(gen, dict) else None,
            "prompts": prompts.get("strategy") if isinstance(prompts, dict) else None,
            "num": r.get("num"),
            "images": self.num_images,
            "shards": f"{self.shards_done}/{self.shards_total}",
            "size_mb": round(self.size_bytes / 2**20, 2),
        }
        if self.problem:
            out["reason"] = self.problem
        return out


def _read_json(path: Path) -> dict[str, Any]:
    """A cache's JSON file as a dict; anything else is a one-line CorruptCacheError."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCacheError(f"cannot read {path}: {' '.join(str(e).split())[:160] or type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise CorruptCacheError(f"cannot read {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_count(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _check_manifest(m: dict[str, Any], path: Path) -> dict[str, Any]:
    """Structural checks, so a hand-edited manifest gives one line instead of a KeyError, and shard
    file names cannot point outside the cache."""

    def bad(what: str) -> CorruptCacheError:
        return CorruptCacheError(f"cache {path} has an invalid {MANIFEST}: {what}")

    if not isinstance(m.get("recipe"), dict):
        raise bad("no 'recipe' object")
    if not isinstance(m.get("hash"), str):  # without it an edited recipe would pass unnoticed
        raise bad("no recipe 'hash'")
    if m["hash"] != recipe_hash(m["recipe"]):  # every reader, not only `cache verify`
        raise bad(f"its recipe does not hash to the recorded hash {m['hash']} (an edited recipe)")
    if HASH_NAME.match(path.name) and path.name != m["hash"]:  # looked up by that name, it would serve this one
        raise bad(f"the folder is named {path.name} but holds the cache of recipe {m['hash']} (copied or renamed "
                  "into another recipe's place)")
    r = m["recipe"]  # a received cache can hash a mistyped recipe consistently: the counts readers use
    if not _is_count(r.get("num"), 1) or r["num"] > MAX_NUM or not (r.get("keep") is None or (
            _is_count(r["keep"], 1) and r["keep"] <= r["num"])):
        raise bad(f"its recipe's 'num' (and 'keep', where a filter keeps part) must be integers in 1..{MAX_NUM}")
    if not isinstance(m.get("shards"), list) or not isinstance(m.get("images"), list):
        raise bad("no 'shards' or 'images' list")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or s.get("file") != shard_name(i):
            raise bad(f"shard entry {i} is not {{'file': '{shard_name(i)}', ...}}")
        if not isinstance(s.get("sha256"), str) or not _is_count(s.get("count")) or not _is_count(s.get("start")):
            raise bad(f"shard entry {i} ({s['file']}) lacks sha256/count/start")
    for j, r in enumerate(m["images"]):
        if not isinstance(r, dict) or not _is_count(r.get("index")):
            raise bad(f"image record {j} has no integer 'index'")
    return m


def expected_images(recipe: dict[str, Any]) -> int:
    """How many images a finished cache of `recipe` holds (a filter keeps `keep` of `num`); the recipe was
    checked by `_check_manifest`."""
    return int(recipe.get("keep") or recipe.get("num") or 0)


def _check_recipe(r: dict[str, Any], path: Path) -> dict[str, Any]:
    if not _is_count(r.get("num"), 1) or not _is_count(r.get("shard_size"), 1) or r["num"] > MAX_NUM:
        raise CorruptCacheError(f"cache {path} has an invalid {RECIPE}: 'num' and 'shard_size' must be integers >= 1, "
                                f"'num' at most {MAX_NUM}")
    return r


def is_cache_dir(path: Path) -> bool:
    return (path / RECIPE).is_file() or (path / MANIFEST).is_file()


def is_calib_folder(path: Path) -> bool:
    """A folder `calib` made under a cache root (named by its recipe hash, holding its recipe or manifest), the
    kind `cache rm` deletes whole; a user's folder that merely holds a manifest.json is not one."""
    return bool(HASH_NAME.match(path.name)) and is_cache_dir(path)


def resolve_cache(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A cache directory given as a path, a hash, or a unique hash prefix under `root` (default: the cache
    root). Every public function here takes such a reference, as the `cache` commands do.

    An empty reference is an error: as a prefix it would match every cache under the root.
    """
    if not str(os.fspath(ref)).strip():
        raise MixqError("empty cache reference: give a cache path, hash or hash prefix")
    p = Path(ref)
    if p.is_dir() and is_cache_dir(p):
        return p
    if p.is_file():
        raise MixqError(f"{str(ref)!r} is a file, not a calibration cache: make one from it with `mixq-onnx calib "
                        f"--generator real --source {ref}`")
    root = Path(root) if root is not None else default_root()
    if root.is_dir():
        hits = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(str(ref)) and is_cache_dir(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise MixqError(f"cache reference {ref!r} is ambiguous under {root}: {', '.join(h.name for h in hits[:5])}")
    raise MixqError(f"no calibration cache at {ref!r} (looked for a directory with {MANIFEST}, and under {root})")


def _shard_bytes(path: Path) -> int:
    """Bytes of the cache's image files: sealed shards, and a filtered cache's candidates while it runs."""
    total = 0
    for pattern in ("shard-*.safetensors", "cand-*.safetensors"):
        for f in path.glob(pattern):
            with contextlib.suppress(OSError):  # removed meanwhile (a finishing writer)
                total += f.stat().st_size
    return total


def info(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> CacheInfo:
    """Status of one cache (a path, hash or hash prefix under `root`); CorruptCacheError (one line) when its
    manifest or recipe is unreadable."""
    path = resolve_cache(ref, root)
    if (path / MANIFEST).is_file():
        m = load_manifest(path)
        n = len(m["shards"])
        missing = [s["file"] for s in m["shards"] if not (path / s["file"]).is_file()]
        if missing:  # cheap (no hashing): `cache verify` and a re-run of calib check the bytes
            raise CorruptCacheError(f"cache {path} is missing {len(missing)} shard(s), first {missing[0]}: "
                                    "re-run the same calib command to regenerate them")
        return CacheInfo(path, True, m["recipe"], len(m["images"]), n, n, _shard_bytes(path))
    recipe = _check_recipe(_read_json(path / RECIPE), path)
    num, ss = recipe["num"], recipe["shard_size"]
    total = -(-num // ss)
    # an unfinished --filter cache writes its candidates first (cand-*), the kept shards only when sealing
    name = candidate_name if recipe.get("filter") else shard_name
    done = sum(1 for i in range(total) if shard_is_complete(path / name(i), min(ss, num - i * ss)))
    return CacheInfo(path, False, recipe, done * ss if done < total else num, done, total, _shard_bytes(path))


def list_caches(root: str | os.PathLike | None = None) -> list[CacheInfo]:
    """Every cache under `root`, unreadable ones included with status `broken` (hiding them would
    leave the user no way to see why a cache vanished)."""
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir() or not is_cache_dir(d):
            continue  # `.…removing…` tombs of an in-progress `cache rm`
        try:
            out.append(info(d))
        except (MixqError, OSError, KeyError, TypeError, ValueError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            out.append(CacheInfo(d, False, {}, 0, 0, 0, _shard_bytes(d), problem=reason))
    return out


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a finished cache, structurally checked."""
    man = path / MANIFEST
    if not man.is_file():
        if (path / RECIPE).is_file():
            raise MixqError(f"cache {path} is incomplete (no {MANIFEST}): re-run the same calib command to finish it")
        raise MixqError(f"{path} is not a calibration cache (no {MANIFEST})")
    return _check_manifest(_read_json(man), path)


def damaged_shards(path: Path) -> list[str]:
    """The files of a sealed cache that a re-run of its calib must make again: shards missing or whose
    bytes no longer match the manifest's sha256, or [MANIFEST] when the manifest itself is unreadable."""
    try:
        m = load_manifest(path)
    except CorruptCacheError:
        return [MANIFEST]
    bad = []
    for s in m["shards"]:
        try:
            ok = sha256_file(path / s["file"]) == s["sha256"]
        except OSError:
            ok = False
        if not ok:
            bad.append(s["file"])
    return bad


@dataclass
class VerifyResult:
    path: Path
    ok: bool
    num_images: int
    problems: list[str]


def _index_problem(indices: list[int], recipe: dict[str, Any], expected: int) -> str | None:
    """Image indices must be 0..N-1 in order; a filtered cache keeps increasing candidate indices < num."""
    if recipe.get("filter"):
        num = recipe.get("num")
        for k, ix in enumerate(indices):
            if (k and ix <= indices[k - 1]) or not (isinstance(num, int) and ix < num):
                return f"image record {k} has index {ix}: a filtered cache keeps increasing candidate indices below {num}"
        return None
    for k, ix in enumerate(indices):
        if ix != k:
            return f"image record {k} has index {ix}, expected {k} (indices must be 0..{expected - 1})"
    return None


def verify(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> VerifyResult:
    """Re-hash every shard of a cache (a path, hash or hash prefix under `root`) against the manifest; check
    counts, that image indices are exactly 0..N-1, and that the manifest's image records are the shards' own
    records. A missing cache is bad input (MixqError); a damaged one a failed result."""
    path = resolve_cache(ref, root)
    if not (path / MANIFEST).is_file():  # a cache (its recipe is there) never sealed, or whose manifest was lost
        return VerifyResult(path, False, 0, [f"missing {MANIFEST}: the cache is incomplete or its manifest was removed "
                                             "(re-run the same calib command to finish or reseal it)"])
    try:
        m = load_manifest(path)
    except CorruptCacheError as e:  # an unreadable manifest is a failed verification, not bad input
        return VerifyResult(path, False, 0, [str(e)])
    recipe = m["recipe"]
    problems: list[str] = []
    shard_records: list[dict[str, Any]] = []
    all_read = True
    count = 0
    for s in m["shards"]:
        f = path / s["file"]
        try:
            data = read_regular(f)
        except FileNotFoundError:
            problems.append(f"missing shard {s['file']}")
            all_read = False
            continue
        except OSError as e:
            problems.append(f"unreadable shard {s['file']}: {e.strerror or e}")
            all_read = False
            continue
        if sha256_bytes(data) != s["sha256"]:
            problems.append(f"corrupt shard {s['file']} (sha256 mismatch)")
            all_read = False
            continue
        try:
            images, records = decode_shard(data)
        except Exception as e:  # noqa: BLE001
            problems.append(f"unreadable shard {s['file']}: {' '.join(str(e).split())[:160]}")
            all_read = False
            continue
        n = int(images.shape[0])
        size = recipe.get("size")
        if isinstance(size, int) and tuple(images.shape[1:3]) != (size, size):
            problems.append(f"shard {s['file']} holds {images.shape[1]}x{images.shape[2]} images, the recipe "
                            f"{size}x{size}")
        if n != s["count"] or len(records) != s["count"]:
            problems.append(f"shard {s['file']} holds {n} images and {len(records)} records, manifest says {s['count']}")
        if s["start"] != count:
            problems.append(f"shard {s['file']} starts at image {s['start']}, expected {count}")
        count += n
        shard_records.extend(records)
    expected = expected_images(recipe)
    if count != expected and all_read:
        problems.append(f"cache holds {count} images, recipe asks for {expected}")
    if len(m["images"]) != expected:
        problems.append(f"manifest lists {len(m['images'])} image records, recipe asks for {expected}")
    bad_index = _index_problem([r["index"] for r in m["images"]], recipe, expected)
    if bad_index:
        problems.append(f"{MANIFEST}: {bad_index}")
    if all_read and shard_records != m["images"]:
        k = next((k for k, (a, b) in enumerate(zip(shard_records, m["images"])) if a != b),
                 min(len(shard_records), len(m["images"])))
        problems.append(f"the manifest's image records differ from the shards' records (first at image {k})")
    return VerifyResult(path, not problems, count, problems)


def _refuse(path: Path, why: str) -> MixqError:
    return MixqError(f"refusing to remove {str(path)!r}: {why}")


def check_removable(path: str | os.PathLike, root: Path) -> None:
    """Only a complete or partial cache directly under `root`, named by its recipe hash, may be deleted:
    a typo, a hand-made folder holding a manifest.json, or a symlink out of the root never is."""
    if not os.fspath(path).strip():  # Path("") would silently become "."
        raise _refuse(Path(), "empty cache reference")
    path = Path(path)
    rparts = Path(root).parts  # a root given as ../caches is the user's choice: only what follows it counts
    tail = path.parts[len(rparts):] if path.parts[:len(rparts)] == rparts else path.parts
    if ".." in tail:
        raise _refuse(path, "'..' in a cache path")
    if path.is_symlink():
        raise _refuse(path, "it is a symbolic link, not a cache directory")
    if not path.is_dir() or not is_cache_dir(path):
        raise _refuse(path, "not a calibration cache")
    try:
        inside = root.is_dir() and path.resolve().parent == root.resolve()
    except OSError:
        inside = False
    if not inside:
        raise _refuse(path, f"not a cache directly under the cache root {root} (pass --cache-root)")
    recipes: list[Any] = []
    for name, pick in ((RECIPE, lambda d: d), (MANIFEST, lambda d: d.get("recipe"))):
        f = path / name
        if f.is_file():
            try:
                d = _read_json(f)
            except CorruptCacheError:
                continue
            recipes.append(pick(d))
            if name == MANIFEST and "hash" in d and d["hash"] != path.name:
                raise _refuse(path, f"its name is not the hash of its recipe ({MANIFEST} records {d['hash']!r})")
    hashes = {recipe_hash(r) if isinstance(r, dict) else None for r in recipes}
    if not recipes or hashes != {path.name}:
        raise _refuse(path, "its name is not the hash of its recipe, so it is not a cache this tool made")
    foreign = sorted(e.name for e in path.iterdir() if not _is_cache_entry(e))
    if foreign:
        raise _refuse(path, f"it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} a cache does not "
                            f"({', '.join(foreign[:4])}{', …' if len(foreign) > 4 else ''}): move them out first")


def remove(refs: str | os.PathLike | Iterable[str | os.PathLike], root: str | os.PathLike | None = None
           ) -> list[Path]:
    """Delete caches under `root` (default: the cache root), each a path, hash or hash prefix; returns their
    paths. Every one is resolved and passes `check_removable` before any is deleted, so one typo among
    several removes nothing. Fails with CacheLockedError while another process writes one."""
    root = Path(root) if root is not None else default_root()
    refs = [refs] if isinstance(refs, (str, os.PathLike)) else list(refs)
    if not refs:
        raise MixqError("no cache to remove: give a cache path, hash or hash prefix")
    for ref in refs:  # an empty reference is refused before it could resolve to anything
        if not os.fspath(ref).strip():
            raise _refuse(Path(), "empty cache reference")
    paths = [resolve_cache(ref, root) for ref in refs]
    for path in paths:
        check_removable(path, root)
    for path in paths:
        with cache_lock(path, wait=False, busy_hint="wait for it to finish, then run `cache rm` again"):
            tomb = path.with_name(f".{path.name}.removing.{os.getpid()}.{int(time.time())}")
            os.replace(path, tomb)
        shutil.rmtree(tomb, ignore_errors=True)
    sweep_tombs(root)
    return paths


_TOMB = re.compile(r"\.[0-9a-f]{16}\.removing\.(\d+)\.\d+")


def sweep_tombs(root: Path) -> int:
    """Finish the removals an interrupted `cache rm` left: it renames a cache to a hidden `.HASH.removing.PID.T`
    first, so a kill mid-delete hid the rest from `cache ls` for good. Only tombs whose process is gone."""
    n = 0
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
    except OSError:
        return 0
    for d in entries:
        m = _TOMB.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def load_images(path: Path) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """All images (uint8 [N,H,W,3]) and their manifest records, in index order.

    Each shard is read once and its bytes checked against the manifest's sha256 before decoding,
    so a flipped byte stops every reader (quantize, CalibrationSet) with a CorruptCacheError.
    """
    m = load_manifest(path)
    recipe = m["recipe"]
    size = recipe.get("size")
    chunks = []
    count = 0
    for s in m["shards"]:
        images, records = read_shard_checked(path / s["file"], s["sha256"])
        n = int(images.shape[0])
        if n != s["count"] or s["start"] != count or records != m["images"][count:count + n]:
            raise CorruptCacheError(f"shard {s['file']} of cache {path} does not match its manifest entry (image "
                                    "count, start or records): run `mixq-onnx cache verify`")
        if isinstance(size, int) and tuple(images.shape[1:3]) != (size, size):
            raise CorruptCacheError(f"shard {s['file']} of cache {path} holds {images.shape[1]}x{images.shape[2]} "
                                    f"images, its recipe {size}x{size}: run `mixq-onnx cache verify`")
        chunks.append(images)
        count += n
    if not chunks:
        raise MixqError(f"cache {path} holds no images")
    expected = expected_images(recipe)
    if count != expected or len(m["images"]) != expected or _index_problem([r["index"] for r in m["images"]],
                                                                           recipe, expected):
        raise CorruptCacheError(f"cache {path} holds {count} images ({len(m['images'])} records) where its recipe "
                                f"asks for {expected}: run `mixq-onnx cache verify`")
    return torch.cat(chunks), m["images"]
