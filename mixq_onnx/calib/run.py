"""`make_calibration_cache`: plan, generate, shard, (filter), and seal a calibration cache.

The cache key is a hash of the recipe, so the same command always lands in the same directory and
resumes it; shard `i` holds images [i*S, (i+1)*S), each a function of (recipe, index) alone, which
makes runs byte-reproducible and lets `torchrun` ranks split shards round-robin.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..progress import progress_bar
from ..registry import FILTERS, PROMPT_STRATEGIES
from ..utils import atomic_write_json, resolve_device, sha256_bytes, sha256_file
from . import cache as C
from .classes import load_classes, resolve_classes
from .filters import check_filter_model
from .generators import GENERATORS, GenContext
from .prompts import PromptConfig, plan_images

#: Largest `--num`: the whole cache is loaded into memory by quantize (and by --filter while scoring).
MAX_NUM = C.MAX_NUM
#: Stored side lengths: at least 8 pixels, at most 1024 (the largest diffusion resolution, SDXL's).
MIN_SIZE, MAX_SIZE = 8, 1024


@dataclass
class CalibConfig:
    """A calibration-cache recipe. Every field that changes the images is part of the cache key."""

    generator: str = "diffusion"
    num: int = 256
    seed: int = 0
    size: int | None = None  # stored side length; None: the generator's default
    classes: str = "auto"  # the CLI's default; imagenet | cifar10 | cifar100 | FILE | auto (from the model's class count)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    shard_size: int | None = None  # None: the generator's default (inversion: its optimisation batch)
    options: dict[str, Any] = field(default_factory=dict)  # generator-specific
    filter: str | None = None
    keep: int | None = None
    # model (needed by inversion and filters; optional for noise)
    model: str | None = None
    checkpoint: str | None = None
    random_weights: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, ...] | None = None


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _lib_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("mixq-onnx", "torch", "numpy", "timm", "diffusers", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _remove_empty(created: list[Path]) -> None:
    """Undo `_check_writable`'s folders, deepest first, each only while it is still empty: a concurrent calib may
    already be writing a cache under one of them."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass


def _undo_new_cache(cache_dir: Path, created: list[Path]) -> None:
    """Remove a cache folder this run made, if it still holds only its recipe and lock (and temporaries)."""
    try:
        names = {p.name for p in cache_dir.iterdir() if not p.name.endswith(".tmp")}
        if names <= {C.RECIPE, C.LOCK}:
            for p in cache_dir.iterdir():
                p.unlink()
            cache_dir.rmdir()
            _remove_empty(created)
    except OSError:  # a concurrent writer got in: the folder is no longer only ours
        pass


def _check_writable(root: Path) -> list[Path]:
    """Create `root` if needed and prove it is writable; return the directories this created."""
    created: list[Path] = []
    p = root.resolve()
    missing = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another calib made it a moment ago: it is not ours to remove
                if not d.is_dir():
                    raise
                continue
            created.append(d)
        probe = root / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _remove_empty(created)
        raise MixqError(f"cache directory {root} is not writable: {e.strerror or e}") from None
    return created


def build_recipe(cfg: CalibConfig, gen_recipe: dict[str, Any], model: nn.Module | None, vocab, size: int) -> dict:
    from ..models import model_source

    uses_prompts = GENERATORS[cfg.generator].uses_prompts
    recipe: dict[str, Any] = {
        "format": C.FORMAT_VERSION,
        "generator": {"name": cfg.generator, **{k: v for k, v in gen_recipe.items() if k not in ("name", "generator")}},
        "num": cfg.num,
        "seed": cfg.seed,
        "size": size,
        "shard_size": cfg.shard_size,
        "prompts": cfg.prompts.to_dict() if uses_prompts else None,
        "classes": (
            {"source": vocab.source, "count": len(vocab), "sha256": sha256_bytes("\n".join(vocab.names).encode())}
            if vocab is not None else None
        ),
        "filter": {"method": cfg.filter, "keep": cfg.keep} if cfg.filter else None,
        "keep": cfg.keep if cfg.filter else None,
        "model": None,
    }
    src = model_source(model) if model is not None else None
    if src is not None:
        recipe["model"] = {
            "spec": src.spec,
            "checkpoint_sha256": src.checkpoint_sha256,
            "random_init": src.random_init,
            "preprocessing": src.preprocessing,
        }
    return recipe


recipe_hash = C.recipe_hash  # the cache key is defined next to the layout it names


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping (Linux MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def peak_image_bytes(cfg: CalibConfig, size: int) -> int:
    """Image memory one run holds at once: a shard as a tensor plus its encoded bytes; with --filter,
    every candidate (they are scored together) plus the kept copy."""
    px = size * size * 3
    need = 2 * min(cfg.shard_size, cfg.num) * px
    if cfg.filter:
        need = max(need, (cfg.num + (cfg.keep or 0)) * px)
    return need


def _check_memory(cfg: CalibConfig, size: int) -> None:
    need, avail = peak_image_bytes(cfg, size), available_memory()
    if avail is not None and need > avail:
        what = "--num (all candidates are scored at once with --filter)" if cfg.filter else "--shard-size"
        raise MixqError(
            f"{cfg.num if cfg.filter else cfg.shard_size} images of {size}x{size} need about {need / 2**30:.1f} GiB "
            f"of memory, more than the {avail / 2**30:.1f} GiB available: lower {what} or --size"
        )


def make_calibration_cache(
    cfg: CalibConfig,
    cache_root: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    wait_lock: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Create (or resume) the cache described by `cfg`; return its directory.

    Raises `MixqError` for bad input before any directory is created.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(cache_root) if cache_root is not None else C.default_root()
    # ---- validate everything cheap before touching the disk
    if cfg.generator not in GENERATORS:
        raise MixqError(f"unknown generator {cfg.generator!r}: choose one of {', '.join(sorted(GENERATORS))}")
    gen_cls = GENERATORS[cfg.generator]
    if cfg.options.get("skip_bad_images") and cfg.generator != "real":
        raise MixqError("--skip-bad-images only applies to --generator real")
    # an option the generator does not read is a mistake (`--source` with noise made a noise cache), never
    # silently ignored; the CLI passes only the options given on its command line
    foreign = sorted(set(cfg.options) - set(gen_cls.option_names))
    if not gen_cls.uses_prompts and (cfg.prompts != PromptConfig() or cfg.classes != "auto"):
        foreign.append("prompts")
    if foreign:
        flags = ", ".join("--prompts/--k/--template/--alpha/--gloss/--classes" if k == "prompts"
                          else "--" + k.replace("_", "-") for k in foreign)
        reads = ", ".join("--" + k.replace("_", "-") for k in gen_cls.option_names) or "none of these"
        raise MixqError(f"{flags} do(es) not apply to --generator {cfg.generator} (its own options: {reads})")
    if cfg.seed < 0:
        raise MixqError(f"--seed must be at least 0, got {cfg.seed}")
    if not 1 <= cfg.num <= MAX_NUM:
        raise MixqError(f"--num must be at least 1 and at most {MAX_NUM}, got {cfg.num}")
    if cfg.shard_size is not None and cfg.shard_size < 1:
        raise MixqError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    if cfg.size is not None and not MIN_SIZE <= cfg.size <= MAX_SIZE:
        raise MixqError(f"--size must be at least {MIN_SIZE} and at most {MAX_SIZE} pixels, got {cfg.size}")
    if cfg.classes == "auto":  # the model's class count decides, so load it first
        if model is None and cfg.model:
            from ..models import load_model

            model = load_model(cfg.model, cfg.checkpoint, random_init=cfg.random_weights, mean=cfg.mean, std=cfg.std,
                               input_size=cfg.input_size)
        cfg = dataclasses.replace(cfg, classes=resolve_classes(cfg.classes, model))
    vocab = None
    strategy = PROMPT_STRATEGIES.get(cfg.prompts.strategy)
    if gen_cls.uses_prompts and not gen_cls.reads_text and (cfg.prompts.template is not None or cfg.prompts.use_gloss):
        raise MixqError(f"--template/--gloss shape the prompt's words, and --generator {cfg.generator} reads only "
                        "its classes: drop them")
    if gen_cls.uses_prompts and (strategy is None or strategy.conditioned):
        vocab = load_classes(cfg.classes)
        cfg.prompts.validate(len(vocab))
        if cfg.prompts.use_gloss and not any(vocab.glosses):
            raise MixqError(f"--gloss appends WordNet glosses, and the {vocab.source} classes have none: drop it")
    elif strategy is None:
        cfg.prompts.validate(10)  # unknown strategy
    if cfg.filter:
        FILTERS.lookup(cfg.filter)
        if cfg.keep is None or not 1 <= cfg.keep <= cfg.num:
            raise MixqError(f"--filter needs --keep N with 1 <= N <= --num ({cfg.num})")
    elif cfg.keep is not None:
        raise MixqError("--keep only makes sense with --filter")
    if model is None and cfg.model:
        from ..models import load_model

        model = load_model(
            cfg.model, cfg.checkpoint, random_init=cfg.random_weights,
            mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
        )
    if model is None and (gen_cls.needs_model or cfg.filter):
        what = f"--generator {cfg.generator}" if gen_cls.needs_model else f"--filter {cfg.filter}"
        raise MixqError(f"{what} needs --model (and --checkpoint)")
    if cfg.filter and model is not None:  # what the filter needs of the model, before any candidate is made
        check_filter_model(cfg.filter, model)
    dev = resolve_device(device)
    if model is not None:
        model = model.eval().to(dev)
    size = cfg.size or gen_cls.default_size(model, cfg.options)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MixqError(f"image size {size} is outside {MIN_SIZE}..{MAX_SIZE} pixels: pass --size")
    if cfg.shard_size is None:
        cfg = dataclasses.replace(cfg, shard_size=gen_cls.default_shard_size(size))
    _check_memory(cfg, size)
    ctx = GenContext(
        num=cfg.num, seed=cfg.seed, size=size, prompts=cfg.prompts, vocab=vocab, model=model,
        device=dev, options=dict(cfg.options), log=log,
    )
    gen = gen_cls(ctx)
    gen.validate()
    recipe = build_recipe(cfg, gen.recipe(), model, vocab, size)
    key = recipe_hash(recipe)
    cache_dir = root / key
    if cache_dir.is_symlink() or (cache_dir.exists() and cache_dir.resolve().parent != root.resolve()):
        # calib deletes and rewrites files in its cache folder: never in a folder elsewhere that a link names
        raise MixqError(f"{cache_dir} is a symbolic link or leads out of the cache root: a cache this tool writes "
                        "lives directly under its root; remove the link")

    rank, world = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)

    if (cache_dir / C.MANIFEST).is_file():
        try:
            held = json.loads((cache_dir / C.MANIFEST).read_text()).get("hash")
        except (OSError, ValueError, AttributeError):
            held = None  # unreadable: damaged_shards names it and the run regenerates it
        if isinstance(held, str) and held != key:
            raise MixqError(f"{cache_dir} holds the cache of another recipe ({held}), copied or renamed into this "
                            "recipe's place: move it away (or `mixq-onnx cache rm` it) and re-run")
        damaged = C.damaged_shards(cache_dir)
        if not damaged:
            log(f"cache already complete: {cache_dir}")
            _sweep_leftovers(cache_dir)
            return cache_dir
        if world > 1:  # ranks must agree on what to redo before any of them changes the folder
            raise MixqError(f"cache {cache_dir} is sealed but {_damage(damaged)}: re-run this calib in one process "
                            "to regenerate them")
        log(f"cache {cache_dir}: {_damage(damaged)}; regenerating")
    made_dir, created = False, []
    with contextlib.ExitStack() as stack:
        if rank == 0:
            created = _check_writable(root)
            C.sweep_tombs(root)  # caches an interrupted `cache rm` was deleting
            try:
                cache_dir.mkdir()
                made_dir = True
            except FileExistsError:
                pass
            except OSError as e:
                _remove_empty(created)
                raise MixqError(f"cannot create cache directory {cache_dir}: {e.strerror or e}") from None
            stack.enter_context(C.cache_lock(cache_dir, wait=wait_lock, log=log))
            if (cache_dir / C.MANIFEST).is_file():  # sealed meanwhile, or damaged: unseal what must be redone
                _unseal_damaged(cache_dir)
            if not (cache_dir / C.MANIFEST).is_file():  # else: finished by the process we waited for
                for stale in cache_dir.glob(".*.tmp"):  # left by a killed writer
                    stale.unlink(missing_ok=True)
                atomic_write_json(cache_dir / C.RECIPE, recipe)
        barrier()  # other ranks start only once rank 0 holds the lock and has cleaned up
        if not (cache_dir / C.MANIFEST).is_file():
            t0 = time.perf_counter()
            try:
                _generate_shards(gen, cfg, cache_dir, rank, world, progress, log)
            except MixqError:  # refused before any image (e.g. a pipeline that needs custom code): no half cache
                if made_dir:
                    _undo_new_cache(cache_dir, created)
                raise
            barrier()
            if rank == 0:
                _finalize(cfg, gen, recipe, key, cache_dir, model, time.perf_counter() - t0, log)
        barrier()
    if world > 1:
        torch.distributed.destroy_process_group()
    return cache_dir


def _shard_ranges(n: int, ss: int) -> list[tuple[int, int]]:
    return [(s, min(s + ss, n)) for s in range(0, n, ss)]


def _generate_shards(gen, cfg: CalibConfig, cache_dir: Path, rank: int, world: int, progress: bool, log) -> None:
    name = C.candidate_name if cfg.filter else C.shard_name
    ranges = _shard_ranges(cfg.num, cfg.shard_size)
    mine = [(i, r) for i, r in enumerate(ranges) if i % world == rank]
    todo = [(i, r) for i, r in mine if not C.shard_is_written(cache_dir / name(i), r[1] - r[0])]
    done_imgs = sum(r[1] - r[0] for i, r in mine) - sum(r[1] - r[0] for i, r in todo)
    if not todo:
        return
    if done_imgs:
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already done")
    total = sum(r[1] - r[0] for _, r in mine)
    bar = progress_bar(total, f"calib[{cfg.generator}]" + (f" rank {rank}" if world > 1 else ""), "image",
                       enabled=progress, initial=done_imgs)
    vocab = gen.ctx.vocab
    try:
        bar.set_postfix_str("loading the generator")
        gen.setup()  # a diffusion pipeline takes a while to load: the bar's lines show it is alive
        for k, (i, (start, stop)) in enumerate(todo):
            bar.set_postfix_str(f"shard {k + 1}/{len(todo)}")
            before = bar.n

            def advance(fraction: float, before: float = before, count: int = stop - start) -> None:
                # whole images, so the count reads as one; the shard's images are written together at its end
                target = before + int(max(0.0, min(1.0, fraction)) * count)
                if target > bar.n:
                    bar.update(target - bar.n)

            gen.ctx.shard_progress = advance
            plans = plan_images(cfg.prompts if gen.uses_prompts else PromptConfig("none"), vocab, cfg.seed, start, stop)
            t = time.perf_counter()
            out = gen.generate(i, plans)
            if out.images.shape[0] != stop - start:
                raise RuntimeError(f"generator {cfg.generator} returned {out.images.shape[0]} images for {stop - start}")
            records = [{**p.record(), **(out.extra[j] if j < len(out.extra) else {})} for j, p in enumerate(plans)]
            sha = C.write_shard(cache_dir / name(i), out.images.cpu(), records)
            stats = {**out.stats, "seconds": round(time.perf_counter() - t, 3), "sha256": sha}
            atomic_write_json(C.stats_path(cache_dir / name(i)), stats)
            bar.update(before + (stop - start) - bar.n)
    finally:
        gen.ctx.shard_progress = lambda _fraction: None
        bar.close()


def _finalize(cfg, gen, recipe, key, cache_dir: Path, model, seconds: float, log) -> None:
    ranges = _shard_ranges(cfg.num, cfg.shard_size)
    name = C.candidate_name if cfg.filter else C.shard_name
    for i, (s, e) in enumerate(ranges):  # every rank's shards must be there before sealing
        if not C.shard_is_written(cache_dir / name(i), e - s):
            raise MixqError(f"shard {name(i)} is missing, or changed after it was written; re-run to generate it")
    shard_stats = []
    for i in range(len(ranges)):
        p = C.stats_path(cache_dir / name(i))
        shard_stats.append(json.loads(p.read_text()) if p.is_file() else {})
    if cfg.filter:
        _apply_filter(cfg, cache_dir, model, ranges, log)
        ranges = _shard_ranges(cfg.keep, cfg.shard_size)
    shards, images = [], []
    for i, (s, e) in enumerate(ranges):
        f = cache_dir / C.shard_name(i)
        _, records = C.read_shard(f)
        shards.append({"file": f.name, "sha256": sha256_file(f), "start": s, "count": e - s})
        images.extend(records)
    manifest = {
        "format": C.FORMAT_VERSION,
        "hash": key,
        "recipe": recipe,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _lib_versions(),
        "seconds": round(seconds, 2),
        "shard_stats": shard_stats,
        "shards": shards,
        "images": images,
    }
    atomic_write_json(cache_dir / C.MANIFEST, manifest)
    _remove_leftovers(cache_dir)


def _damage(files: list[str]) -> str:
    if files == [C.MANIFEST]:
        return "its manifest is unreadable"
    return f"{len(files)} shard(s) are missing or changed (first {files[0]})"


def _unseal_damaged(cache_dir: Path) -> None:
    """Under the lock: remove the manifest and the shards a re-run must make again, so that generation
    resumes as after a kill. With an unreadable manifest no shard can be trusted (their hashes are gone)."""
    damaged = C.damaged_shards(cache_dir)
    if not damaged:
        return
    shards = list(cache_dir.glob("shard-*.safetensors")) if damaged == [C.MANIFEST] else [
        cache_dir / f for f in damaged]
    (cache_dir / C.MANIFEST).unlink()
    for f in shards:
        f.unlink(missing_ok=True)


def _remove_leftovers(cache_dir: Path) -> None:
    for pattern in C.LEFTOVER_PATTERNS:
        for f in cache_dir.glob(pattern):
            f.unlink(missing_ok=True)


def _sweep_leftovers(cache_dir: Path) -> None:
    """A writer killed between sealing a cache and removing its working files (candidates, shard stats,
    temporaries) left them for good: the next calib of the same recipe removes them, unless the lock cannot
    be taken (another process holds it, or it is not a lock this tool made): the cache itself is complete."""
    if not any(next(cache_dir.glob(p), None) for p in C.LEFTOVER_PATTERNS):
        return
    with contextlib.suppress(MixqError, OSError):
        with C.cache_lock(cache_dir, wait=False):
            _remove_leftovers(cache_dir)


def _apply_filter(cfg: CalibConfig, cache_dir: Path, model, ranges, log) -> None:
    """Score every candidate with the target model; keep the best `keep` (ties: lower index), in index order."""
    from .filters import keep_top, score_images

    imgs, recs = [], []
    for i in range(len(ranges)):
        x, r = C.read_shard(cache_dir / C.candidate_name(i))
        imgs.append(x)
        recs.extend(r)
    images = torch.cat(imgs)
    scores = score_images(model, images, cfg.filter).double().cpu()
    order = keep_top(scores, cfg.keep).tolist()  # ascending indices; ties: lower index; NaN last
    log(f"filter {cfg.filter}: kept {len(order)} of {len(recs)} (score >= {float(scores[order].min()):.4g})")
    kept_imgs = images[order]
    kept = [{**recs[j], "score": round(float(scores[j]), 6)} for j in order]
    for i, (s, e) in enumerate(_shard_ranges(cfg.keep, cfg.shard_size)):
        C.write_shard(cache_dir / C.shard_name(i), kept_imgs[s:e].contiguous(), kept[s:e])
