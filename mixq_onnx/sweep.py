"""`sweep`: one or more float checkpoints quantized at every bit-width x method (x seed), each evaluated, so a
user sees where a network falls off before choosing a bit-width (and whether `robustify` moved the cliff).

The result folder holds `sweep.json` (every cell, rewritten atomically after each one), `sweep.md` (a table)
and `sweep.png` (top-1 against bit-width, one line per checkpoint and method, dashed FP lines). A cell is
keyed by its checkpoint label, method, bits and seed, and carries a fingerprint of everything that decides
its number (the checkpoint's sha256, the quantization config, the calibration cache's recipe hash, the
evaluation data, and the mixq-onnx version: an upgrade measures every cell again); re-running the command
reuses every cell whose fingerprint still matches. An edit to the code of an installed version is not in it:
a fresh --out measures everything.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import MixqError
from .utils import (
    LOCK_NAME,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    check_apart,
    folder_lock,
    sha256_bytes,
    sha256_file,
)

SWEEP_VERSION = 1
DEFAULT_BITS = ("W8A8", "W4A8", "W4A4", "W3A3", "W2A4")
_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


def parse_bits(text: str) -> tuple[int, int]:
    """"W4A4" -> (4, 4); weights 2..8 bits, activations 2..8 (or 16: weight-only), as `quantize` supports."""
    m = _BITS.match(text.strip())
    if not m:
        raise MixqError(f"bit-width {text!r} is not of the form W<bits>A<bits>, e.g. W4A4")
    w, a = int(m.group(1)), int(m.group(2))
    if not 2 <= w <= 8 or not (2 <= a <= 8 or a == 16):
        raise MixqError(f"bit-width {text!r} is outside the supported set: weights 2-8 bits, activations 2-8 "
                        "(or 16 for weight-only)")
    return w, a


@dataclass
class SweepConfig:
    """The grid and the quantization settings every cell shares (the `quantize` defaults otherwise)."""

    bits: tuple[str, ...] = DEFAULT_BITS
    methods: tuple[str, ...] = ("rtn", "qdrop")
    seeds: tuple[int, ...] = (0,)
    preset: str = "fast"
    iters: int | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    symmetric: bool = True
    first_last_bits: int | None = 8
    limit: int | None = None  # evaluate on `pick_subset`'s seeded, class-stratified sample of N labelled images

    def validate(self) -> SweepConfig:
        from .methods import METHODS

        if not self.bits or not self.methods or not self.seeds:
            raise MixqError("a sweep needs at least one bit-width, one method and one seed")
        # canonical spelling ("w08a8" is W8A8): one cell per bit-width, a duplicate however spelled is refused
        self.bits = tuple("W{}A{}".format(*parse_bits(b)) for b in self.bits)
        self.methods = tuple(m.strip().lower() for m in self.methods)  # as the CLI spells them
        for m in self.methods:
            METHODS.lookup(m)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise MixqError(f"seeds must be integers of at least 0, got {', '.join(map(repr, self.seeds))}")
        self.first_last_bits = self.first_last_bits or None  # 0, as the CLI's --first-last-bits 0: as the rest
        for name, seq in (("bit-width", self.bits), ("method", self.methods), ("seed", self.seeds)):
            if len(set(seq)) != len(seq):
                raise MixqError(f"a {name} is listed twice: {', '.join(map(str, seq))}")
        for cfg in self.quant_configs():
            cfg.validate()
        if self.limit is not None and self.limit < 1:
            raise MixqError(f"--limit must be at least 1, got {self.limit}")
        return self

    def quant_config(self, method: str, bits: str, seed: int):
        from .quant import QuantConfig

        w, a = parse_bits(bits)
        return QuantConfig(wbits=w, abits=a, method=method, symmetric=self.symmetric,
                           first_last_bits=self.first_last_bits, preset=self.preset, iters=self.iters,
                           num_samples=self.num_samples, batch_size=self.batch_size, seed=seed)

    def quant_configs(self) -> list:
        return [self.quant_config(m, b, s) for m in self.methods for b in self.bits for s in self.seeds]


@dataclass
class SweepModel:
    """One line family of the plot: a label and a float model; `identity` names its weights (a checkpoint's
    sha256), so that a finished cell is reused only for the same weights."""

    label: str
    model: nn.Module
    identity: str
    source: dict[str, Any] = field(default_factory=dict)  # what the user named: spec, checkpoint path

    @classmethod
    def of(cls, label: str, model: nn.Module, source: dict[str, Any] | None = None) -> SweepModel:
        """Identity from the weights and from `source` (spec, preprocessing overrides, ...), which also decide
        a cell's number."""
        source = dict(source or {})
        fixed = {k: v for k, v in source.items() if k != "checkpoint"}  # the path may move; the weights decide
        return cls(label, model, sha256_bytes(canonical_json([model_identity(model), fixed]).encode()), source)


def sweep_models(base: Any, compare: Sequence[str] = (), label: str | None = None) -> list[SweepModel]:
    """The line families of `sweep --model ... [--compare [LABEL=]CKPT ...]`: `base` (a `models.ModelOptions`, or
    a model name) under `label` (default: its checkpoint's file name, or the model name), then each compared
    checkpoint of the same model and preprocessing, loaded now. Their `source` (spec, preprocessing, checkpoint path) goes into
    each cell's identity, so this is what decides which finished cells a re-run reuses."""
    import dataclasses

    from .models import ModelOptions, load_model

    if isinstance(base, str):
        base = ModelOptions(base)
    if not isinstance(base, ModelOptions):
        raise MixqError(f"sweep_models takes a model name or models.ModelOptions, got {type(base).__name__}; an "
                        "in-memory model goes in as SweepModel.of(label, model)")
    entries = [(label or (Path(base.checkpoint).stem if base.checkpoint else base.spec), base.checkpoint)]
    for c in compare:
        name, sep, path = c.partition("=")
        if not sep:
            name, path = Path(c).stem, c
        if not name or not path:
            raise MixqError(f"--compare {c!r}: expected [LABEL=]CHECKPOINT")
        entries.append((name, path))
    prep = {"spec": base.spec, "mean": base.mean, "std": base.std, "input_size": base.input_size}
    models = []
    for name, ckpt in entries:
        opts = base if ckpt == base.checkpoint else dataclasses.replace(base, checkpoint=ckpt, random_init=False)
        models.append(SweepModel.of(name, load_model(opts), {**prep, "checkpoint": ckpt}))
    return models


def model_identity(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes, bytes): stable across processes."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_identity(path: str | os.PathLike) -> str:
    """An npz's sha256; for an image folder, a hash of every file's relative path and sha256 (the pixels: an
    edited image of the same size must not reuse the old cells)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    from .calib.generators.real import folder_files

    files, _, _ = folder_files(p)  # exactly the files the reader reads (symlinked class folders included)
    entries = sorted(f"{f.relative_to(p)}|{sha256_file(f)}" for f in files)
    return sha256_bytes("\n".join(entries).encode("utf-8", "surrogateescape"))


def check_sweep_dir(out: str | os.PathLike, inputs: tuple[Any, ...] = ()) -> Path:
    """The result folder: new, empty, or an earlier sweep's (resumed). Anything else is refused, so a sweep
    never writes into (or over) a folder it did not make; so is one inside what it reads (`inputs`: checkpoints,
    data, cache) or inside a calibration cache (`utils.check_apart`)."""
    out = Path(out)
    check_apart(out, inputs)
    if out.exists() and not out.is_dir():
        raise MixqError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (out / "sweep.json").is_file():
        raise MixqError(f"--out {out} is a non-empty folder without sweep.json: choose a new folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise MixqError(f"cannot create --out {out}: its parent folder is missing or read-only")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise MixqError(f"cannot write into --out {out}: it is read-only")
    return out


_CELL_STR = ("key", "label", "method", "bits", "fingerprint")  # what a re-run and the table read of a cell


def read_sweep(out: str | os.PathLike) -> dict[str, Any]:
    """An earlier `sweep.json` (checked), or an empty result."""
    import json

    p = Path(out) / "sweep.json"
    if not p.is_file():
        return {"version": SWEEP_VERSION, "cells": []}
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise MixqError(f"{p} is not readable JSON ({type(e).__name__}): move it away or choose a new --out") from None
    if not isinstance(doc, dict) or doc.get("version") != SWEEP_VERSION or not isinstance(doc.get("cells"), list) \
            or not isinstance(doc.get("earlier", []), list):
        raise MixqError(f"{p} is not a mixq-onnx sweep (version {SWEEP_VERSION}): choose a new --out")
    for i, c in enumerate(doc["cells"] + doc.get("earlier", [])):
        if not (isinstance(c, dict) and all(isinstance(c.get(k), str) for k in _CELL_STR)
                and _percent(c.get("top1")) and all(_percent(c.get(k), none=True) for k in ("top5", "agreement"))):
            raise MixqError(f"{p}: cell {i} is not a sweep cell ({', '.join(_CELL_STR)} strings, top1 a percentage): "
                            "choose a new --out")
        if "sha256" in c and c["sha256"] != _cell_sha(c):
            raise MixqError(f"{p}: cell {i} ({c['label']} {c['method']} {c['bits']}) changed after the sweep wrote it "
                            "(its sha256 differs): choose a new --out, or remove the cell to measure it again")
    return doc


def _percent(v: Any, none: bool = False) -> bool:
    """A percentage as a cell records it: a finite number in [0, 100] (or, with `none`, absent / null)."""
    if v is None:
        return none
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return 0 <= v <= 100  # compares ints exactly (a 400-digit one too) and is False for NaN


def _cell_sha(cell: dict[str, Any]) -> str:
    """The sha256 a cell records of itself (the rest of its fields), so a re-run reuses only what it wrote."""
    return sha256_bytes(canonical_json({k: v for k, v in cell.items() if k != "sha256"}).encode())


def _sealed(cell: dict[str, Any]) -> dict[str, Any]:
    return {**cell, "sha256": _cell_sha(cell)}


def _fingerprint(*parts: Any) -> str:
    return sha256_bytes(canonical_json(list(parts)).encode())[:16]


def _tqdm_write(line: str) -> None:
    """A stderr line that leaves the progress bar intact."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def subset_key(limit: int | None) -> Any:
    """What a cell's number owes to `--limit`: the count, `pick_subset`'s rule and seed, so a cell measured on
    other images (an older first-N prefix, or a changed rule) is never reused. All images: None, as before."""
    from .data import SUBSET_RULE

    return None if limit is None else [limit, SUBSET_RULE, 0]


def run_sweep(models: list[SweepModel], cfg: SweepConfig, calib: Any, data: str | os.PathLike,
              out: str | os.PathLike, *, cache_root: str | os.PathLike | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize every model at every (method, bits, seed) of `cfg` with calibration cache `calib` (a path or
    hash), evaluate top-1 on labelled `data`, and write sweep.json / sweep.md / sweep.png into `out`.
    Finished cells of an earlier run with the same fingerprint are reused; those this run's grid does not ask for
    (a re-run with fewer --bits) stay in sweep.json's "earlier" list, out of the table, for a later run to reuse.
    Returns the sweep document.
    `log` (default: stderr, above the progress bar) gets the `data:` / `preprocessing:` lines of each model
    evaluated. One sweep at a time writes a folder (`.lock` in it): a second waits, then reuses the cells."""
    cfg.validate()
    if not models:
        raise MixqError("a sweep needs at least one model")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise MixqError(f"two checkpoints share the label {next(x for x in labels if labels.count(x) > 1)!r}: "
                        "name them LABEL=PATH")
    reads = [data, *(m.source.get("checkpoint") for m in models)]
    if isinstance(calib, (str, os.PathLike)):
        with contextlib.suppress(MixqError):  # a calibration cache that does not resolve: the loader says so
            from .calib.cache import resolve_cache

            reads.append(resolve_cache(calib, cache_root))
    out = check_sweep_dir(out, inputs=tuple(reads))
    read_sweep(out)  # a damaged sweep.json is refused before anything is made (read again under the lock)
    made, had_lock = not out.exists(), (out / LOCK_NAME).exists()
    out.mkdir(parents=False, exist_ok=True)
    try:
        with folder_lock(out, log=log or _tqdm_write, what=f"sweep {out}"):  # one sweep at a time per --out
            return _sweep_locked(models, cfg, calib, data, out, cache_root=cache_root, progress=progress, log=log)
    except BaseException:
        with contextlib.suppress(OSError):  # a lock this run made goes; so does its folder if still empty
            if not had_lock:
                (out / LOCK_NAME).unlink(missing_ok=True)
            if made and not any(out.iterdir()):
                out.rmdir()
        raise


def _sweep_locked(models: list[SweepModel], cfg: SweepConfig, calib: Any, data: str | os.PathLike, out: Path, *,
                  cache_root: str | os.PathLike | None, progress: bool,
                  log: Callable[[str], None] | None) -> dict[str, Any]:
    """`run_sweep` under the folder's lock: sweep.json is read, extended and rewritten by one process."""
    from .calib import load_calibration
    from .data import LabelledData, model_hw, preprocessing_notes, read_labelled, report_data
    from .models import get_preprocessing
    from .quant import evaluate, quantize

    doc = read_sweep(out)
    old = {c["key"]: c for c in doc.get("earlier", []) + doc["cells"]}  # read_sweep checked every cell
    data_id = data_identity(data)
    calibsets = {m.label: load_calibration(calib, m.model, cache_root) for m in models}  # checked up front
    ds = calibsets[models[0].label]
    calib_id = ds.provenance()["hash"]  # the recipe's, whatever the folder is called
    cells: list[dict[str, Any]] = []
    doc = {"version": SWEEP_VERSION, "config": asdict(cfg), "data": {"path": str(data), "sha256": data_id},
           "calib": ds.provenance(), "models": [], "cells": cells}
    grid = [(m, method, bits, seed) for m in models for method in ["fp", *cfg.methods]
            for bits in (["FP"] if method == "fp" else cfg.bits)
            for seed in ([0] if method == "fp" else cfg.seeds)]
    from . import __version__
    from .progress import progress_bar

    bar = progress_bar(len(grid), "sweep", "cell", enabled=progress)
    evalsets: dict[int, LabelledData] = {}  # by input size: the labelled images, read once
    told: set[str] = set()  # models whose data:/preprocessing: lines were shown
    reused = 0
    try:
        for sm in models:
            doc["models"].append({"label": sm.label, "identity": sm.identity, **sm.source})
        for sm, method, bits, seed in grid:
            key = f"{sm.label}|{method}|{bits}|{seed}"
            qcfg = None if method == "fp" else cfg.quant_config(method, bits, seed).resolved()
            fp = _fingerprint(sm.identity, qcfg.to_dict() if qcfg else None, calib_id if qcfg else None,
                              data_id, subset_key(cfg.limit), __version__)
            bar.set_postfix_str(f"{sm.label} {method} {bits} s{seed}")
            prev = old.get(key)
            if prev is not None and prev.get("fingerprint") == fp and isinstance(prev.get("top1"), (int, float)):
                cells.append(prev)
                reused += 1
                bar.update(1)
                continue
            pre = get_preprocessing(sm.model)
            size = model_hw(pre)
            if size not in evalsets:
                evalsets[size] = read_labelled(data, size, cfg.limit)
            ev = evalsets[size]
            if sm.label not in told:  # once per model: the eval subset, its preprocessing, any resize warning
                told.add(sm.label)
                cal = calibsets[sm.label]
                lines = report_data(pre, ev.source_hw, ev.subset, log=lambda m: None,
                                    resized_on_load=ev.resized_on_load)
                lines += [ln for ln in preprocessing_notes(pre, tuple(cal.images.shape[1:3]))
                          if ln.startswith("warning:") and ln not in lines]  # the calibration images' resize
                note = cal.made_from(sm.model)  # an inversion cache of another network: as quantize says it
                if note:
                    lines.append(note)
                for ln in lines:
                    (log or _tqdm_write)(ln if ln.startswith("warning:") else f"{sm.label}: {ln}")
            images, y = ev.images, ev.labels
            t0 = time.perf_counter()
            if qcfg is None:
                res = evaluate(sm.model, images, y)
            else:
                qmodel = quantize(sm.model, qcfg, calibsets[sm.label], progress=False)
                res = evaluate(qmodel, images, y, fp_model=sm.model)
            cells.append(_sealed({"key": key, "label": sm.label, "method": method, "bits": bits, "seed": seed,
                                  "fingerprint": fp, "top1": round(res.top1, 4), "top5": round(res.top5, 4),
                                  "n": res.n, "agreement": None if res.agreement is None else round(res.agreement, 4),
                                  "seconds": round(time.perf_counter() - t0, 2)}))
            atomic_write_json(out / "sweep.json", {**doc, "cells": cells + _pending(old, cells)})
            bar.update(1)
    finally:
        bar.close()
    doc["reused"] = reused
    doc["earlier"] = _pending(old, cells)  # cells this run did not ask for (other --bits): kept, reused when asked again
    atomic_write_json(out / "sweep.json", doc)
    atomic_write_text(out / "sweep.md", sweep_table(doc))
    plot_sweep(doc, out / "sweep.png")
    return doc


def _pending(old: dict[str, dict], done: list[dict]) -> list[dict]:
    """Earlier cells not yet revisited: kept in sweep.json while a re-run is under way, so an interrupted
    re-run loses nothing the first run finished."""
    seen = {c["key"] for c in done}
    return [c for k, c in old.items() if k not in seen]


def summarize_cells(doc: dict[str, Any]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(label, method, bits) -> (mean top-1, spread = max - min over seeds, seeds)."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for c in doc["cells"]:
        groups.setdefault((c["label"], c["method"], c["bits"]), []).append(float(c["top1"]))
    return {k: (sum(v) / len(v), max(v) - min(v), len(v)) for k, v in groups.items()}


def sweep_table(doc: dict[str, Any]) -> str:
    """Markdown: one row per checkpoint and method, one column per bit-width; mean top-1 over seeds, with
    ± half the spread when there are several."""
    s = summarize_cells(doc)
    bits = list(doc["config"]["bits"])
    lines = [f"Top-1 % on {doc['data']['path']} ({_n(doc)} images); calibration {doc['calib'].get('hash', '?')[:12]}; "
             f"seeds {', '.join(map(str, doc['config']['seeds']))}; preset {doc['config']['preset']}.", "",
             "| checkpoint | method | FP | " + " | ".join(bits) + " |",
             "|---|---|---:|" + "---:|" * len(bits)]
    for m in doc["models"]:
        fp = s.get((m["label"], "fp", "FP"))
        for method in doc["config"]["methods"]:
            row = [m["label"], method, f"{fp[0]:.2f}" if fp else "-"]
            for b in bits:
                v = s.get((m["label"], method, b))
                row.append("-" if v is None else (f"{v[0]:.2f}" + (f" ± {v[1] / 2:.2f}" if v[2] > 1 else "")))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _n(doc: dict[str, Any]) -> int | str:
    return next((c["n"] for c in doc["cells"] if "n" in c), "?")


def plot_sweep(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Top-1 against bit-width (x in the sweep's order): one panel per checkpoint (all on one y-scale that
    follows the data), one line per method in its fixed colour (mixq_onnx.plotting), each point labelled with
    its mean top-1 (error bars: the seeds' min..max), and the checkpoint's FP top-1 as a dashed line."""
    from . import plotting as P

    s = summarize_cells(doc)
    bits = list(doc["config"]["bits"])
    methods = P.order_methods(doc["config"]["methods"])
    labels = [m["label"] for m in doc["models"]] or ["-"]
    xs = list(range(len(bits)))
    ys = [v[0] + sign * v[1] / 2 for v in s.values() for sign in (-1, 1) if math.isfinite(v[0])]
    lim = P.data_limits(ys, pad=0.1, lo=0, hi=100, min_span=5)
    n = len(labels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    with P.style() as plt:
        fig, axes = plt.subplots(nrows, ncols, figsize=((0.9 * len(bits) + 1.4) * ncols + 0.5, 3.0 * nrows + 0.7),
                                 sharey=True, squeeze=False, layout="constrained")
        flat = [ax for row in axes for ax in row]
        for ax in flat[n:]:
            ax.set_visible(False)
        for ax, label in zip(flat, labels):
            fp = s.get((label, "fp", "FP"))
            if fp:
                ax.axhline(fp[0], color=P.FP_COLOUR, lw=0.9, ls=(0, (4, 3)), zorder=1)
            lines = []
            for method in methods:
                colour = P.method_colour(method, methods)
                pts = [(x, s[(label, method, b)]) for x, b in zip(xs, bits) if (label, method, b) in s]
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] / 2 for p in pts],
                            fmt="o-", color=colour, capsize=3, ms=4.5, lw=1.6, zorder=3)
                lines.append(([p[0] for p in pts], [p[1][0] for p in pts], [P.fmt_value(p[1][0]) for p in pts], colour))
            P.point_labels(ax, lines)
            ax.set_title(f"{label}" + (f" · FP {fp[0]:.2f} %" if fp else ""), loc="left", fontsize=9)
            ax.set_xticks(xs, bits)
            ax.set_xlim(-0.4, len(bits) - 0.6)
            ax.set_ylim(*lim)
        for row in axes:
            row[0].set_ylabel("top-1 %")
        handles = [plt.Line2D([], [], color=P.method_colour(m, methods), marker="o", lw=1.6) for m in methods]
        handles.append(plt.Line2D([], [], color=P.FP_COLOUR, lw=0.9, ls=(0, (4, 3))))
        fig.legend(handles, [*methods, "FP (float model)"], loc="outside lower center", ncol=len(handles))
        n_img = _n(doc)
        seeds = list(doc["config"]["seeds"])
        how = (f"labels: mean over seeds {', '.join(map(str, seeds))}; error bars: their spread" if len(seeds) > 1
               else f"seed {seeds[0]}" if seeds else "")
        fig.suptitle(f"top-1 across bit-widths ({f'{n_img:,}' if isinstance(n_img, int) else n_img} images; {how})",
                     fontsize=10)
        return P.save_figure(fig, path)
