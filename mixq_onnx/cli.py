"""The `mixq-onnx` command line: each subcommand is a thin layer over one public library function."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Module level: click, the standard library and light package modules only. torch, timm, onnx, numpy, ...
# are imported inside the command bodies, so --help, --version and argument errors answer at once
# (tests/test_cli_startup.py checks this).
from . import __version__
from .cli_common import (
    BITS,
    CONTEXT,
    FINITE,
    POSITIVE,
    FiniteFloat,
    Range,
    augment_option,
    compute_command,
    read_paths,
    trust_model_code_option,
    warn_unquantized,
)
from .cli_common import emit_json as _emit_json
from .cli_qat import register as _register_qat
from .cli_trt import register as _register_trt
from .errors import MixqError
from .methods import METHODS, PRESETS
from .registry import BN_STATS, FILTERS, GENERATOR_MODULES, LOSSES, PROMPT_STRATEGIES, help_lines


def _floats(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None


def _ints(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.replace(",", " ").replace("x", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected integers like 32 or 3,32,32, got {value!r}") from None


def model_options(required: bool = False) -> Callable:
    """--model/--checkpoint/--random-weights/--mean/--std/--input-size, shared by every command."""

    def deco(f: Callable) -> Callable:
        opts = [
            click.option("--model", "model", required=required, metavar="SPEC",
                         help="timm name, zoo name (cifar_resnet20 … cifar_resnet110, mlperf_tiny_resnet8), "
                              "or path/to/file.py:factory / package.module:factory."),
            click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                         help="Weights (.pt/.pth/.th/.safetensors), loaded with weights_only=True."),
            click.option("--random-weights", is_flag=True, help="Keep random weights (smoke tests only)."),
            click.option("--mean", callback=_floats, default=None, metavar="R,G,B", help="Override input mean."),
            click.option("--std", callback=_floats, default=None, metavar="R,G,B", help="Override input std."),
            click.option("--input-size", callback=_ints, default=None, metavar="S|C,H,W",
                         help="Override the model input size."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def _csv(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v for v in value.replace(" ", ",").split(",") if v)
    if not items:
        raise click.BadParameter(f"expected a comma-separated list, got {value!r}")
    return items


STAGES = {  # the pipeline's order and one line each: `mixq-onnx --help` lists the commands so
    "calib": "make a calibration cache (mixup-class diffusion prompts, BN inversion, real, noise)",
    "cache": "list, inspect, verify or remove calibration caches",
    "quantize": f"learn rounding and step sizes on a cache ({', '.join(METHODS)})",
    "robustify": "fine-tune a float checkpoint with SymReg / SatNL to survive low bit-widths",
    "sweep": "quantize checkpoints at every bit-width x method: table and plot of top-1",
    "qat": "quantization-aware training: NIPQ learned mixed precision under a budget, or LSQ",
    "eval": "top-1/top-5 of a float or quantized model, and agreement with the float model",
    "export": "TensorRT-ready QDQ ONNX of a quantized model (or the float model with --fp)",
    "check": "onnx.checker, shape inference and a TensorRT QDQ rules lint",
    "verify": "onnxruntime against the PyTorch fake-quant model: agreement, integer-code mismatch",
    "build": "TensorRT / TensorRT-RTX engine (strongly typed: precision only from Q/DQ) + PLAN.json",
    "inspect": "per-layer engine precision: Int8 MAC share, INT4-weight GEMMs, fallbacks",
    "run": "inference through an engine (NVIDIA GPU)",
    "bench": "engine latency against an FP16 engine and onnxruntime (NVIDIA GPU)",
}


class _Stages(click.Group):
    """The top-level group: commands in pipeline order with their one-line `STAGES` description (one list)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in STAGES if n in names] + [n for n in names if n not in STAGES]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, STAGES.get(n) or self.get_command(ctx, n).get_short_help_str(80)) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Stages, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="mixq-onnx")
def cli() -> None:
    """mixq-onnx: quantize vision networks to low bit-widths without their training data. Every command has
    its own --help; bad input exits 2 with one `error:` line."""


# --------------------------------------------------------------------------- calib
def _Count(lo: int, hi: int | None = None) -> Range:  # noqa: N802  (reads as the type it returns)
    """calib's counts: a `Range` worded like the library's ('--num must be at least 1 and at most 100000')."""
    return Range(lo, hi, between=False)


@cli.command(context_settings=CONTEXT)
@click.option("--generator", type=GENERATOR_MODULES.choice(), default="diffusion",
              show_default=True,
              help=help_lines(GENERATOR_MODULES) + ".")
@click.option("--num", type=_Count(1, 100_000), default=256, show_default=True,
              help="Images to generate (candidates with --filter); at most 100,000.")
@click.option("--seed", type=_Count(0), default=0, show_default=True,
              help="Recipe seed. Diffusion, noise and the prompts: image i uses a seed derived from (seed, i) "
                   "alone. Inversion optimises each shard together from a seed of (seed, shard, its images), so "
                   "its images also depend on --shard-size (recorded in the recipe).")
@click.option("--size", type=_Count(8, 1024), default=None,
              help="Stored side length in pixels, 8 to 1024 (diffusion: its rendering resized) [default: real from an "
                   "npz: the source's own; else the model's input size, or 224 without --model].")
@click.option("--shard-size", type=_Count(1), default=None,
              help="Images per shard (the unit of resume; for inversion also the optimisation batch whose BN "
                   "statistics are matched) [default: inversion 256 for inputs up to 64 px, else 32; others 64]. Memory is checked before generating: about "
                   "2 x shard-size x size x size x 3 bytes (with --filter: (num + keep) x size x size x 3).")
@click.option("--classes", default="auto", show_default=True,
              help="imagenet | cifar10 | cifar100 | FILE (one class per line); auto: from the model's class count, "
                   "else imagenet.")
@click.option("--prompts", "strategy", type=PROMPT_STRATEGIES.choice(), default="mixup",
              show_default=True,
              help=help_lines(PROMPT_STRATEGIES) + ".")
@click.option("--k", type=_Count(2), default=2, show_default=True, help="Classes per mixup prompt (2 <= k <= classes).")
@click.option("--template", default=None, help="Mixup template with k '{}' slots [default: 'a photo of a {} and a {}'].")
@click.option("--alpha", type=FINITE, default=1.0, show_default=True,
              help="Dirichlet concentration of the mixing weights of --prompts mixup-embed: diffusion's "
                   "text-embedding weights, inversion's soft targets. Only with --prompts mixup-embed: the other "
                   "strategies mix classes equally and refuse it.")
@click.option("--gloss", is_flag=True, help="Append WordNet glosses to ImageNet names ('kite, a bird of prey …').")
@click.option("--pipeline", default="stable-diffusion-v1-5/stable-diffusion-v1-5", show_default=True,
              help="diffusers pipeline: hub id (from the local HF cache when offline) or a local folder.")
@click.option("--revision", default=None, help="Hub revision of --pipeline.")
@click.option("--steps", type=_Count(1), default=25, show_default=True, help="Diffusion denoising steps.")
@click.option("--guidance", type=FINITE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scheduler", default=None, help="diffusers scheduler class, e.g. DPMSolverMultistepScheduler.")
@click.option("--negative-prompt", default=None, help="Negative prompt for every image.")
@click.option("--batch-size", type=_Count(1), default=4, show_default=True, help="Diffusion images per forward pass.")
@click.option("--render-size", type=_Count(8), default=None,
              help="Diffusion: side length the pipeline renders at, a multiple of 8, before the resize to --size "
                   "[default: the pipeline's own, 512 for SD 1.5].")
@click.option("--iters", type=_Count(0), default=None, help="Inversion: optimisation steps per shard [default: 100].")
@click.option("--lr", type=FINITE, default=None, help="Inversion: learning rate [default: 0.01].")
@click.option("--source", type=click.Path(), default=None, help="real: an npz (x uint8 NHWC, y) or an image folder.")
@click.option("--skip-bad-images", is_flag=True,
              help="real, folder --source: leave out images that do not decode (a warning each; the skipped files "
                   "are recorded in the recipe) instead of failing.")
@click.option("--filter", "filter_", type=FILTERS.choice(), default=None,
              help="Over-generate --num candidates, score them with the model, keep the best --keep.")
@click.option("--keep", type=_Count(1, 100_000), default=None, help="Images kept by --filter (1 to --num).")
@model_options()
@click.option("--cache-root", type=click.Path(file_okay=False), default=None,
              help="Cache root [default: $MIXQ_CACHE_ROOT or ./calib_cache].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting when another process writes the same cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@compute_command("calib")
def calib(**o: Any) -> None:
    """Make (or resume) a calibration cache of synthetic or real images.

    The cache lands in CACHE_ROOT/<recipe-hash>/; re-running the same command resumes it, and the
    same recipe gives byte-identical shards at the same intra-op thread count (`--threads N`; the
    automatic count follows the machine's load, and float sums, so the diffusion and inversion shards, depend
    on it), also under `torchrun --nproc-per-node N`. Each diffusion or inversion shard records the thread count
    that made it (`torch_threads` in its stats).
    The last line of stdout is the cache path.
    """
    from .calib import CalibConfig, PromptConfig, make_calibration_cache

    # only what the command line gives: the generator refuses an option it does not read (its defaults are
    # the ones --help shows)
    given = _given_on_command_line()
    options = {k: o[k] for k in ("pipeline", "revision", "steps", "guidance", "scheduler", "negative_prompt",
                                 "batch_size", "render_size", "source", "iters", "lr", "skip_bad_images") if k in given}
    pc = {k: o[flag] for k, flag in (("strategy", "strategy"), ("k", "k"), ("template", "template"),
                                      ("alpha", "alpha"), ("use_gloss", "gloss")) if flag in given}
    cfg = CalibConfig(
        generator=o["generator"], num=o["num"], seed=o["seed"], size=o["size"], classes=o["classes"],
        prompts=PromptConfig(**pc),
        shard_size=o["shard_size"], options=options, filter=o["filter_"], keep=o["keep"],
        model=o["model"], checkpoint=o["checkpoint"], random_weights=o["random_weights"],
        mean=o["mean"], std=o["std"], input_size=o["input_size"],
    )
    path = make_calibration_cache(cfg, o["cache_root"], device=o["device"], wait_lock=not o["no_wait"],
                                  progress=not o["quiet"])
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        click.echo(str(path))


# --------------------------------------------------------------------------- cache
@cli.group(context_settings=CONTEXT)
def cache() -> None:
    """List, inspect, verify or remove calibration caches."""


_root_opt = click.option("--cache-root", type=click.Path(file_okay=False), default=None,
                         help="Cache root [default: $MIXQ_CACHE_ROOT or ./calib_cache].")


@cache.command("ls", context_settings=CONTEXT)
@_root_opt
@click.option("--json", "as_json", is_flag=True, help="One JSON list on stdout.")
def cache_ls(cache_root: str | None, as_json: bool) -> None:
    """List the caches under the cache root (unreadable ones with status `broken` and the reason)."""
    from .calib import list_caches

    rows = [c.summary() for c in list_caches(cache_root)]
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("no caches")
        return
    click.echo(f"{'hash':16}  {'status':10}  {'generator':9}  {'prompts':11}  {'images':>7}  {'shards':>7}  {'MB':>8}")
    for r in rows:
        click.echo(f"{r['hash']:16}  {r['status']:10}  {str(r['generator']):9}  {r['prompts'] or '–':11}  "
                   f"{r['images']:>7}  {r['shards']:>7}  {r['size_mb']:>8}"
                   + (f"  ({r['reason']})" if "reason" in r else ""))


@cache.command("info", context_settings=CONTEXT)
@click.argument("ref")
@_root_opt
@click.option("--json", "as_json", is_flag=True, help="Print the recipe and summary as JSON.")
def cache_info(ref: str, cache_root: str | None, as_json: bool) -> None:
    """Show one cache's recipe and status (REF: path, hash or hash prefix)."""
    from .calib import info

    ci = info(ref, cache_root)
    out = {**ci.summary(), "recipe": ci.recipe}
    if as_json:
        _emit_json(out)
    else:  # the summary as lines, then the recipe (what the hash covers) as indented JSON
        for k, v in ci.summary().items():
            click.echo(f"{k + ':':10} {'–' if v is None else v}")
        click.echo("recipe:\n" + json.dumps(ci.recipe, indent=2, sort_keys=True))


@cache.command("verify", context_settings=CONTEXT)
@click.argument("ref")
@_root_opt
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (path, ok, images, problems).")
def cache_verify(ref: str, cache_root: str | None, as_json: bool) -> None:
    """Re-hash every shard against the manifest and check its images and records.

    \b
    Exit codes: 0 intact; 1 a corrupt, missing or altered shard or manifest (each named); 2 bad input (no such
    cache)."""
    from .calib import verify

    res = verify(ref, cache_root)
    if as_json:
        _emit_json({"path": str(res.path), "ok": res.ok, "images": res.num_images, "problems": res.problems})
    elif res.ok:
        click.echo(f"ok: {res.num_images} images, every shard matches its sha256 ({res.path})")
    else:
        for p in res.problems:
            click.echo(f"FAIL: {p}", err=True)
    if not res.ok:
        sys.exit(1)


@cache.command("rm", context_settings=CONTEXT)
@click.argument("refs", nargs=-1, required=True)
@_root_opt
def cache_rm(refs: tuple[str, ...], cache_root: str | None) -> None:
    """Remove caches (REF: path, hash or hash prefix). Only a cache directly under the cache root whose
    folder name is its recipe hash is removed; every REF is checked before any is removed."""
    from .calib import remove

    for p in remove(refs, cache_root):
        click.echo(f"removed {p}")


def _given_on_command_line() -> set[str]:
    """The current command's parameters that the user gave (command line or environment), not defaults."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return {p.name for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name)
            not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


# --------------------------------------------------------------------------- quantize
def _model_options(o: dict[str, Any]):
    """The model flags as a `ModelOptions` (None when --model is absent)."""
    from .models import ModelOptions

    if not o.get("model"):
        return None
    return ModelOptions(o["model"], o["checkpoint"], o["random_weights"], o["mean"], o["std"], o["input_size"])


_MODEL_FLAGS = ("model", "checkpoint", "random_weights", "mean", "std", "input_size")


def _result_model(o: dict[str, Any]):
    """The model flags of a command that reads a result folder (--quantized): None when none is given (the
    folder's recorded model), else the recorded model with the given flags in its place (`folder_model`:
    e.g. --checkpoint for a moved checkpoint, --model for a moved model file), each file checked against
    the sha256 the folder records. Without --quantized: `_model_options`."""
    if not o.get("quantized"):
        return _model_options(o)
    if not any(o.get(k) for k in _MODEL_FLAGS):
        return None
    from .quant.io import folder_model

    return folder_model(o["quantized"], o["model"], o["checkpoint"], random_init=o["random_weights"], mean=o["mean"],
                        std=o["std"], input_size=o["input_size"], trust_model_code=o["trust_model_code"])


def _echo_notes(lines: list[str], quiet: bool = False) -> None:
    """`report_data`'s lines (data subset, preprocessing, resize warnings) on stderr; `quiet`: warnings only."""
    for ln in lines:
        if not quiet or ln.startswith("warning:"):
            click.echo(ln, err=True)


def _load_user_model(o: dict[str, Any]):
    from .models import load_model

    opts = _model_options(o)
    if opts is None:
        raise MixqError("--model is required")
    return load_model(opts)


@cli.command(context_settings=CONTEXT)
@model_options(required=True)
@click.option("--calib", "calib_ref", required=True, metavar="CACHE",
              help="Calibration cache: a path, or a hash (prefix) under --cache-root.")
@click.option("--method", type=METHODS.choice(), default="qdrop",
              show_default=True, help=help_lines(METHODS) + ".")
@click.option("--wbits", type=BITS, default=4, show_default=True, help="Weight bits.")
@click.option("--abits", type=Range(2, 8, also=(16,), why="weight-only"), default=4, show_default=True,
              help="Activation bits (16: weight-only).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True,
              help="symmetric: TensorRT-deployable (zero point 0); asymmetric: the papers' setting, not deployable.")
@click.option("--first-last-bits", type=Range(2, 8, also=(0,), why="same as the rest"), default=8, show_default=True,
              help="Bits of the first and last layer (0: same as the rest).")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="INT4 weight-only GEMMs (with --wbits 4 --abits 16): Linear weights get one scale per block "
                   "of this many input features; convolutions stay float.")
@click.option("--share-quantizers/--no-share-quantizers", default=True, show_default=True,
              help="One activation quantizer per tensor and grid: a tensor feeding several quantized consumers "
                   "(a block's first conv and its residual add) is quantized once, so the engine writes it once, "
                   "in INT8. --no-share-quantizers: one quantizer per consumer (the layout before sharing).")
@click.option("--integer-pools/--no-integer-pools", default=True, show_default=True,
              help="An average pool that a quantized layer reads (the global pool before the classifier) gets a "
                   "quantizer on its input at that layer's bits and averages integer codes: exact in every runtime "
                   "(verify max |diff| 0) and an INT8 pool in the engine. --no-integer-pools: the pool runs in "
                   "float (the layout before this rule).")
@click.option("--float-layers", default=None, metavar="NAMES", callback=_csv,
              help="Leave these Conv2d/Linear layers unquantized: a comma list of module names or fnmatch patterns "
                   "(`linear`, `'layer3.*.conv2'`). They get no quantizer, stay float in the QDQ graph and run in "
                   "float in the engine; the first/last-layer policy still counts them as the network's ends. "
                   "ModelOpt's ONNX PTQ leaves a classifier this way: one engine layer fewer (GEMM and bias fused) "
                   "for a float hand-off into it.")
@click.option("--preset", type=click.Choice(PRESETS), default="fast", show_default=True,
              help="paper: 20k iterations/unit, QDrop's reference learning rates (every method); fast: far fewer "
                   "iterations (CPU).")
@click.option("--iters", type=POSITIVE, default=None, help="Iterations per unit (overrides the preset).")
@click.option("--num-samples", type=POSITIVE, default=None, metavar="N",
              help="Calibration images used: the cache's first N, a fair sample because every generator stores "
                   "its images in a seeded order (real: a seeded random sample; synthetic: class-balanced "
                   "rounds) [default: 1024].")
@click.option("--batch-size", type=POSITIVE, default=None, help="Reconstruction batch [default: 32].")
@click.option("--seed", type=Range(0), default=0, show_default=True,
              help="Seed of the reconstruction's randomness (mini-batch order, QDrop's random drops): the same "
                   "seed, cache, options and --threads give the same weights.safetensors and quant.json (timings aside).")
@click.option("--cache-root", type=click.Path(file_okay=False), default=None,
              help="Where a --calib hash is looked up [default: $MIXQ_CACHE_ROOT or ./calib_cache].")
@click.option("--out", "out", required=True, type=click.Path(), help="Output directory (quant.json, weights.safetensors).")
@click.option("--overwrite", is_flag=True,
              help="Replace quant.json and weights.safetensors in a non-empty --out (other files stay).")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--json", "as_json", is_flag=True,
              help="Last stdout line: one JSON object: summary (method, bits, samples, config, model, calibration), "
                   "per-unit diagnostics (losses before/after, holdout gap, gradient statistics, it/s) and timings "
                   "(seconds per step).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@compute_command("quantize")
def quantize(**o: Any) -> None:
    """Learn rounding and quantizer step sizes on a calibration cache; write quant.json + weights."""

    from .calib import load_calibration
    from .data import report_data
    from .quant import QuantConfig, save_quantized, summarize
    from .quant import quantize as run_quantize
    from .quant.io import check_output_dir
    from .utils import resolve_device

    cfg = QuantConfig(
        wbits=o["wbits"], abits=o["abits"], method=o["method"], symmetric=o["symmetric"],
        first_last_bits=o["first_last_bits"], preset=o["preset"], iters=o["iters"],
        num_samples=o["num_samples"], batch_size=o["batch_size"], seed=o["seed"],
        block_size=int(o["block_size"]) if o["block_size"] else None, share_quantizers=o["share_quantizers"],
        integer_pools=o["integer_pools"], float_layers=o["float_layers"] or (),
    ).validate()  # bad options fail before the model loads
    dev = resolve_device(o["device"])
    out = check_output_dir(o["out"], o["overwrite"], inputs=read_paths(o, "calib_ref"))  # before the work
    clock = [("start", time.perf_counter())]
    model = _load_user_model(o)
    clock.append(("load_model", time.perf_counter()))
    ds = load_calibration(o["calib_ref"], model, o["cache_root"])
    clock.append(("load_calibration", time.perf_counter()))
    note = ds.made_from(model)
    if note:
        click.echo(note, err=True)
    report_data(ds.preprocessing, tuple(ds.images.shape[1:3]), ds.subset(cfg.resolved().num_samples),
                log=lambda m: click.echo(m, err=True), quiet=o["quiet"])
    qmodel = run_quantize(model.to(dev), cfg, ds, progress=not o["quiet"])  # records the cache's provenance
    clock.append(("quantize", time.perf_counter()))
    warn_unquantized(qmodel.mixq_report.get("unquantized_layers", ()))
    save_quantized(qmodel.cpu(), out, overwrite=o["overwrite"])
    clock.append(("save", time.perf_counter()))
    if not o["quiet"]:
        click.echo(summarize(qmodel.mixq_report), err=True)
    click.echo(str(out))
    if o["as_json"]:
        _emit_json(_quantize_json(out, qmodel.mixq_report, clock))


def _finite(obj: Any) -> Any:
    """`obj` with NaN/inf floats as null, so --json prints strict JSON (a unit without a holdout has gap NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _quantize_json(out: Path, report: dict[str, Any], clock: list[tuple[str, float]]) -> dict[str, Any]:
    """`quantize --json`: what the run wrote (read back from quant.json), its per-unit report and timings."""
    from .quant.io import WEIGHTS_SHA256, read_quant_json

    meta = read_quant_json(out)
    units = report.get("units") or []
    summary = {k: v for k, v in report.items() if k != "units"}
    summary.update(units=len(units), iters=sum(u.get("iters", 0) for u in units), deployable=meta.get("deployable"),
                   config=meta["config"], model=meta["model"], calibration=meta.get("calibration"),
                   weights_sha256=meta.get(WEIGHTS_SHA256))
    timings = {f"{name}_s": round(t - clock[i][1], 3) for i, (name, t) in enumerate(clock[1:])}
    timings["total_s"] = round(clock[-1][1] - clock[0][1], 3)
    return _finite({"out": str(out), "summary": summary, "units": units, "timings": timings})


# --------------------------------------------------------------------------- eval
@cli.command("eval", context_settings=CONTEXT)
@model_options()
@click.option("--quantized", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="A quantize output directory. The model flags are then optional: --model/--checkpoint replace "
                   "its recorded model file and checkpoint (moved files: each must have the sha256 DIR/quant.json "
                   "records).")
@click.option("--engine", type=click.Path(dir_okay=False), default=None,
              help="A TensorRT plan from `build`: top-1 through the engine (needs an NVIDIA GPU).")
@click.option("--data", required=True, type=click.Path(), help="npz (x uint8 NHWC, y) or an image folder per class.")
@click.option("--limit", type=POSITIVE, default=None, metavar="N",
              help="Evaluate a seeded, class-stratified sample of N images, never the first N: data files are "
                   "often sorted by class.")
@click.option("--batch-size", type=POSITIVE, default=250, show_default=True,
              help="Images per forward pass: memory and speed only, not the result (--engine: at most the "
                   "plan's MAX batch).")
@click.option("--json", "as_json", is_flag=True,
              help="Last stdout line: one JSON object (top1, top5, n, subset, ...; with --quantized also the "
                   "float model's fp_top1 and fp_top5 and the top-1 agreement).")
@trust_model_code_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@compute_command("eval")
def eval_cmd(**o: Any) -> None:
    """Top-1/top-5 accuracy; with --quantized also the float model's and the top-1 agreement;
    with --engine through TensorRT."""
    from .quant.evaluate import evaluate_data

    notes: list[str] = []  # data:/preprocessing: lines, shown once the run succeeds (errors stay one line)
    if o["engine"]:
        from .trt.runtime import evaluate_engine_data

        res = evaluate_engine_data(o["engine"], o["data"], model=_result_model(o), quantized=o["quantized"],
                                   trust_model_code=o["trust_model_code"], limit=o["limit"],
                                   batch_size=o["batch_size"], log=notes.append)
        _echo_notes(notes, o["quiet"])
        if o["as_json"]:
            _emit_json({**res.to_dict(), "engine": str(o["engine"])})
        else:
            click.echo(f"engine top1 {res.top1:.2f} %  top5 {res.top5:.2f} %  (n={res.n})")
        return
    res = evaluate_data(o["data"], quantized=o["quantized"], model=_result_model(o),
                        trust_model_code=o["trust_model_code"], limit=o["limit"], batch_size=o["batch_size"],
                        log=notes.append, progress=not o["quiet"])
    _echo_notes(notes, o["quiet"])
    if o["as_json"]:
        _emit_json(res.to_dict())
    else:
        line = f"top1 {res.top1:.2f} %  top5 {res.top5:.2f} %  (n={res.n})"
        if res.agreement is not None:
            line += f"  float top1 {res.fp_top1:.2f} %  top5 {res.fp_top5:.2f} %  agreement {res.agreement:.2f} %"
        click.echo(line)


# --------------------------------------------------------------------------- robustify
@cli.command(context_settings=CONTEXT)
@model_options(required=True)
@click.option("--data", "data_src", required=True, metavar="SRC",
              help="A calibration cache (data-free: KD from the original model) or labelled images (npz or "
                   "folder: cross-entropy, plus KD with --kd-weight).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors (a plain state dict; OUT.json holds the recipe and report).")
@click.option("--symreg", "beta", type=FINITE, default=0.0, show_default=True, metavar="BETA",
              help="SymReg weight: pairs each channel's i-th smallest and largest weights (0 = off).")
@click.option("--symreg-pairing", type=click.Choice(["1:1", "2:2"]), default="1:1", show_default=True,
              help="2:2 pairs sums of adjacent sorted weights (half the terms; some asymmetric "
                   "channels also score 0).")
@click.option("--satnl", is_flag=True, help="Train w = alpha*tanh(v/alpha) (one alpha per layer).")
@click.option("--fixed-alpha", is_flag=True, help="SatNL: keep alpha at its initial value (1.001 x max |w|) instead of learning it.")
@click.option("--loss", type=click.Choice(LOSSES), default="auto", show_default=True,
              help="auto: KD on a cache, CE on labelled data; ce needs labels.")
@click.option("--kd-weight", type=FINITE, default=None, help="KD weight next to CE on labelled data [default: 0].")
@click.option("--sam", type=click.Choice(["asam"]), default=None, help="Adaptive sharpness-aware minimisation.")
@click.option("--rho", type=FINITE, default=0.5, show_default=True, help="ASAM neighbourhood size.")
@click.option("--epochs", type=Range(1), default=10, show_default=True, help="Passes over the training images.")
@click.option("--lr", type=FINITE, default=1e-3, show_default=True, help="SGD learning rate (cosine to 0).")
@augment_option()
@click.option("--batch-size", type=POSITIVE, default=128, show_default=True, help="Training images per SGD step.")
@click.option("--bn-stats", type=click.Choice(BN_STATS), default="update", show_default=True,
              help="BatchNorm running statistics: update (they follow the training images, as in any fine-tune) or "
                   "freeze (BN normalises with the checkpoint's statistics and keeps them; its scale and shift still "
                   "train). A cache of synthetic images has other statistics than the real images the checkpoint "
                   "saw: eight steps on noise images at lr 1e-9 take ResNet-20 from 81 % to 47 % with update, none with "
                   "freeze (500 test images).")
@click.option("--seed", type=Range(0), default=0, show_default=True, help="Seed of the training image order.")
@click.option("--limit", type=POSITIVE, default=None, metavar="N",
              help="Train on a seeded, class-stratified sample of N images (a random one for unlabelled data or a "
                   "synthetic cache), never the first N.")
@click.option("--eval-data", type=click.Path(), default=None,
              help="Labelled images: FP top-1 before and after (other images than --data: a warning says when "
                   "they are the same file).")
@click.option("--cache-root", type=click.Path(file_okay=False), default=None,
              help="Cache root [default: $MIXQ_CACHE_ROOT or ./calib_cache].")
@click.option("--device", default=None,
              help="torch device to train on (cpu, cuda, cuda:1) [default: cuda if this torch sees a GPU, else cpu].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out that is not a checkpoint robustify wrote (one it wrote is always replaced).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@compute_command("robustify")
def robustify(**o: Any) -> None:
    """Fine-tune a float checkpoint with SymReg and/or SatNL so that it survives low bit-widths
    (Park, Jang, Park, ECCV 2022; this project's reading of the method, see mixq_onnx/robust)."""
    from .quant.evaluate import evaluate_data
    from .robust import RobustConfig, check_writable, save_checkpoint
    from .robust import robustify as run_robustify
    from .training import check_training_data, kd_weight_for, load_training_data, same_images
    from .utils import resolve_device

    cfg = RobustConfig(symreg=o["beta"], pairing=o["symreg_pairing"], satnl=o["satnl"],
                       learn_alpha=not o["fixed_alpha"], sam=o["sam"], rho=o["rho"], epochs=o["epochs"],
                       lr=o["lr"], batch_size=o["batch_size"], seed=o["seed"], augment=o["augment"],
                       kd_weight=o["kd_weight"] if o["kd_weight"] is not None else 0.0, loss=o["loss"],
                       bn_stats=o["bn_stats"]).validate()
    out = check_writable(o["out"], inputs=read_paths(o, "data_src"), overwrite=o["overwrite"])
    dev = resolve_device(o["device"])
    model = _load_user_model(o)
    notes: list[str] = []
    data = load_training_data(o["data_src"], model, cache_root=o["cache_root"], limit=o["limit"], log=notes.append)
    check_training_data(data, model)  # before the data lines: a refusal stays one line
    kd_weight_for(data, cfg.loss, cfg.kd_weight)
    _echo_notes(notes, o["quiet"])
    if o["eval_data"] and same_images(o["eval_data"], o["data_src"]):
        click.echo("warning: --eval-data is the training data: the FP top-1 after training is measured on the "
                   "images it trained on", err=True)
    eval_notes: list[str] = []
    before = evaluate_data(o["eval_data"], model=model, log=eval_notes.append).top1 if o["eval_data"] else None
    _echo_notes([("eval " + n) if n.startswith("data:") else n for n in eval_notes], o["quiet"])
    model, rep = run_robustify(model.to(dev), cfg, data, progress=not o["quiet"])
    model = model.cpu()
    after = evaluate_data(o["eval_data"], model=model).top1 if o["eval_data"] else None
    save_checkpoint(model, out, {"recipe": {**cfg.__dict__, "kd_weight": rep["kd_weight"], "model": o["model"],
                                            "checkpoint": o["checkpoint"], "data": data.source},
                                 "report": rep, "fp_top1_before": before, "fp_top1_after": after},
                    overwrite=o["overwrite"])
    if before is not None:
        click.echo(f"FP top-1 {before:.2f} % -> {after:.2f} %", err=True)
    click.echo(str(out))


@cli.command(context_settings=CONTEXT)
@model_options(required=True)
@click.option("--calib", "calib_ref", required=True, metavar="CACHE",
              help="Calibration cache for every cell: a path, or a hash (prefix) under --cache-root.")
@click.option("--data", required=True, type=click.Path(), help="Labelled evaluation images: npz (x uint8 NHWC, y) "
                                                                "or an image folder per class.")
@click.option("--bits", callback=_csv, default=",".join(("W8A8", "W4A8", "W4A4", "W3A3", "W2A4")), show_default=True,
              help="Bit-widths W<w>A<a> (weights 2-8, activations 2-8 or 16), comma-separated; the plot's x order.")
@click.option("--method", "methods", callback=_csv, default="rtn,qdrop", show_default=True,
              help=f"Quantization methods, comma-separated ({', '.join(METHODS)}).")
@click.option("--seeds", callback=_csv, default="0", show_default=True,
              help="Quantization seeds, comma-separated: several give mean and spread.")
@click.option("--compare", "compare", multiple=True, metavar="[LABEL=]CKPT",
              help="Another checkpoint of the same --model, overlaid (repeatable), e.g. --compare robust=robust.safetensors.")
@click.option("--label", default=None, help="Label of --checkpoint [default: its file name, or the model name].")
@click.option("--preset", type=click.Choice(PRESETS), default="fast", show_default=True,
              help="Every cell's quantize --preset: paper (20k iterations/unit) or fast (CPU).")
@click.option("--iters", type=POSITIVE, default=None, help="Iterations per unit (overrides the preset).")
@click.option("--num-samples", type=POSITIVE, default=None, metavar="N",
              help="Calibration images used: the cache's first N, already in a seeded order [default: 1024].")
@click.option("--batch-size", type=POSITIVE, default=None, help="Reconstruction batch [default: 32].")
@click.option("--symmetric/--asymmetric", default=True, show_default=True,
              help="symmetric: TensorRT-deployable (zero point 0); asymmetric: the papers' setting.")
@click.option("--first-last-bits", type=Range(2, 8, also=(0,), why="same as the rest"), default=8, show_default=True,
              help="Bits of the first and last layer (0: same as the rest).")
@click.option("--limit", type=POSITIVE, default=None, metavar="N",
              help="Evaluate every cell on the same seeded, class-stratified sample of N images (a random one for "
                   "unlabelled data), never the first N.")
@click.option("--cache-root", type=click.Path(file_okay=False), default=None,
              help="Where a --calib hash is looked up [default: $MIXQ_CACHE_ROOT or ./calib_cache].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Result folder: sweep.json, sweep.md, sweep.png. Re-running into it reuses finished cells.")
@click.option("--json", "as_json", is_flag=True, help="Last stdout line: sweep.json's cells as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
@compute_command("sweep")
def sweep(**o: Any) -> None:
    """Quantize one float checkpoint (and the --compare ones) at every bit-width x method x seed, evaluate
    each, and write a table and a plot of top-1 against bit-width: where does the network fall off?"""
    from .sweep import SweepConfig, check_sweep_dir, run_sweep, sweep_models, sweep_table

    try:
        seeds = tuple(int(s) for s in o["seeds"])
    except ValueError:
        raise MixqError(f"--seeds must be integers, got {','.join(o['seeds'])}") from None
    cfg = SweepConfig(bits=o["bits"], methods=tuple(o["methods"]), seeds=seeds,
                      preset=o["preset"], iters=o["iters"], num_samples=o["num_samples"],
                      batch_size=o["batch_size"], symmetric=o["symmetric"],
                      first_last_bits=o["first_last_bits"], limit=o["limit"]).validate()
    compared = tuple(c if os.path.lexists(c) else c.split("=", 1)[-1] for c in o["compare"] or ())  # [LABEL=]CKPT
    check_sweep_dir(o["out"], inputs=read_paths(o, "calib_ref", "data") + compared)
    models = sweep_models(_model_options(o), o["compare"], o["label"])
    doc = run_sweep(models, cfg, o["calib_ref"], o["data"], o["out"], cache_root=o["cache_root"],
                    progress=not o["quiet"], log=(lambda m: _echo_notes([m], True)) if o["quiet"] else None)
    if not o["quiet"]:
        click.echo(sweep_table(doc), err=True)
        if doc["reused"]:
            click.echo(f"reused {doc['reused']} finished cell(s) of the earlier run", err=True)
    click.echo(str(Path(o["out"])))
    if o["as_json"]:
        _emit_json({"out": str(Path(o["out"])), "reused": doc["reused"], "cells": doc["cells"]})


# --------------------------------------------------------------------------- export / verify
@cli.command(context_settings=CONTEXT)
@click.option("--quantized", type=click.Path(), default=None, metavar="DIR",
              help="A quantize output directory. --model/--checkpoint replace its recorded model file and "
                   "checkpoint (moved files: each must have the sha256 DIR/quant.json records).")
@model_options()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--fp", is_flag=True, help="Write the plain float model (baselines) instead of the QDQ graph.")
@click.option("--int4-weight-only", is_flag=True,
              help="W4A16: MatMul/Gemm weights as INT4 with block scales, no activation Q/DQ (TensorRT's INT4 "
                   "weight-only GEMMs). From --model (round to nearest here) or a --quantized DIR made with "
                   "--wbits 4 --abits 16 --block-size N.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="128", show_default=True,
              help="INT4 block size along the input features (with --int4-weight-only --model).")
@click.option("--layout", type=click.Choice(["integer", "dq-scales"]), default="integer", show_default=True,
              help="Where the scales of a quantized Conv/Gemm/MatMul live. integer: its DQ nodes give integer "
                   "codes and weights (scale 1) and one Mul(s_x*s_w) per output channel follows, the arithmetic "
                   "of an INT8 kernel: onnxruntime is bit-identical to PyTorch, TensorRT builds the same INT8 "
                   "kernels. dq-scales: scales on the DQ nodes (the ModelOpt layout, for tools that expect it); "
                   "fp32 summation order then flips rare codes at rounding ties between runtimes.")
@click.option("--external-data/--single-file", default=None,
              help="Where the weights go: --external-data writes them to OUT.<sha256 prefix>.data beside the graph, "
                   "--single-file into the graph file. Default: a data file only when they pass 1.5 GiB (protobuf "
                   "cannot write a file of 2 GiB, e.g. a float ViT-H). Readers check the digest in its name; move "
                   "the two files together.")
@trust_model_code_option()
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out that is not a graph mixq-onnx exported (one it exported is always "
                   "replaced).")
@compute_command("export")
def export(**o: Any) -> None:
    """Write a QDQ ONNX graph (opset 21, IR 10, dynamic batch) that TensorRT builds into INT8 kernels.

    Weights are INT8 initializers holding the learned integers behind DequantizeLinear (per-channel,
    axis of the output channels); activations get QuantizeLinear/DequantizeLinear exactly where PyTorch
    quantizes, with a float Clip in front when the grid is narrower than INT8. See --layout for where
    the scales are applied.
    """
    from .onnx.export import export_onnx

    given = _given_on_command_line()
    if "block_size" in given and not (o["int4_weight_only"] and not o["quantized"]):
        raise MixqError("--block-size applies to --int4-weight-only --model (a --quantized folder records its own)")
    if "layout" in given and (o["fp"] or o["int4_weight_only"]):
        raise MixqError("--layout applies to the QDQ graph of a --quantized folder, not to --fp or --int4-weight-only")
    path = export_onnx(o["out"], quantized=o["quantized"], model=_result_model(o), fp=o["fp"],
                       int4_weight_only=o["int4_weight_only"], block_size=int(o["block_size"]), layout=o["layout"],
                       trust_model_code=o["trust_model_code"], log=lambda m: click.echo(f"warning: {m}", err=True),
                       overwrite=o["overwrite"], external_data=o["external_data"])
    click.echo(str(path))


@cli.command(context_settings=CONTEXT)
@click.argument("onnx_path", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Last stdout line: one JSON object (ok, errors, violations: rule, severity, node, message).")
def check(onnx_path: str, as_json: bool) -> None:
    """Lint a QDQ graph against TensorRT's rules; every violation names its node.

    \b
    Exit codes: 0 no error (warnings allowed); 1 at least one error; 2 bad input (no such file, not ONNX)."""
    from .onnx.check import check_model, report

    vs = check_model(onnx_path)
    rep = report(vs)
    if as_json:
        _emit_json(rep)
    else:
        shown: dict[str, int] = {}
        for v in vs:  # every error; the first few warnings of each rule
            k = shown[v.rule] = shown.get(v.rule, 0) + 1
            if v.severity == "error" or k <= 3:
                click.echo(str(v), err=True)
        for rule in shown:
            hidden = sum(v.rule == rule and v.severity != "error" for v in vs) - 3
            if hidden > 0:
                click.echo(f"warning: [{rule}] … and {hidden} more", err=True)
        click.echo(f"{'ok' if rep['ok'] else 'FAILED'}: {rep['errors']} error(s) in {onnx_path}")
    if not rep["ok"]:
        sys.exit(1)


def _percent(_ctx: Any, param: Any, value: float | None) -> float | None:
    """A percent option: 0 < value <= 1 is almost surely a fraction (0.999 for 99.9 %), refused with the hint."""
    if value is not None and 0 < value <= 1:
        raise click.BadParameter(f"{value:g} reads as {value:g} %; it takes a percent (did you mean {100 * value:g}?)")
    return value


@cli.command(context_settings=CONTEXT)
@click.argument("onnx_path", type=click.Path())
@click.option("--quantized", required=True, type=click.Path(), metavar="DIR",
              help="The quantize output the graph came from. --model/--checkpoint replace its recorded model file "
                   "and checkpoint (moved files: each must have the sha256 DIR/quant.json records).")
@model_options()
@click.option("--data", required=True, type=click.Path(),
              help="npz (x uint8 NHWC; labels y optional, never read) or an image folder (per class, or flat).")
@click.option("--limit", type=POSITIVE, default=None, metavar="N",
              help="Compare on a seeded, class-stratified sample of N images (a random one for unlabelled data), "
                   "never the first N.")
@click.option("--min-agreement", type=FiniteFloat(0, 100), default=99.9, show_default=True, metavar="PERCENT",
              callback=_percent,
              help="Exit 1 when the exact run's top-1 agreement with PyTorch, counting near ties (an image whose two "
                   "best PyTorch logits lie closer than float rounding moved them) as agreeing, is below this "
                   "percent (0-100; a value above 0 and at most 1 is refused as a likely fraction).")
@click.option("--exact", is_flag=True,
              help="Also exit 1 unless the exact run is bit-exact: max |diff| 0 and no integer code differs (what "
                   "the integer layout gives where every op between quantizers is exact).")
@click.option("--json", "as_json", is_flag=True, help="Last stdout line: one JSON object (with the subset used).")
@trust_model_code_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@compute_command("verify")
def verify(**o: Any) -> None:
    """Run onnxruntime with every graph optimisation off (exact QDQ semantics) and with its defaults,
    against the PyTorch fake-quant model on the same images.

    \b
    Exit codes: 0 faithful; 1 top-1 agreement (near ties counted as agreeing) below --min-agreement, NaN/inf outputs, a quantizer input more
    than half a step from PyTorch's in the teacher-forced run, or (--exact) any difference; 2 bad input, including a graph exported from another result folder (names the first quantizer
    whose bits, scale or integer weights differ).
    """
    from .onnx.verify import verify_data

    notes: list[str] = []
    rep = verify_data(o["onnx_path"], o["data"], quantized=o["quantized"], model=_result_model(o),
                      trust_model_code=o["trust_model_code"], limit=o["limit"], log=notes.append,
                      progress=not o["quiet"])
    _echo_notes(notes, o["quiet"])
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    failures = rep.failures(o["min_agreement"], exact=o["exact"])
    if o["as_json"]:
        _emit_json({**rep.to_dict(), "ok": not failures, "failures": failures})
    else:
        ties = f" ({rep.near_ties} near-tie(s) at float rounding)" if rep.near_ties else ""
        click.echo(f"layout {rep.layout}; exact run: top-1 agreement {rep.top1_agreement:.2f} % on {rep.n} images{ties}, "
                   f"max |diff| {rep.max_abs_diff:.4g}, mean |diff| {rep.mean_abs_diff:.3g}")
        click.echo(f"integer codes: worst quantizer {100 * rep.code_mismatch_fraction:.4f} % differ on the same input, "
                   f"{100 * rep.segment_code_mismatch:.4f} % teacher-forced, "
                   f"{100 * rep.propagated_code_mismatch:.4f} % end to end (float rounding cascades)")
        click.echo(f"teacher-forced run: top-1 agreement {rep.forced_top1_agreement:.2f} %, max |diff| "
                   f"{rep.forced_max_abs_diff:.3g}, worst segment {rep.segment_step_diff:.3g} of a step "
                   f"({rep.worst_segment}); first free-run divergence: {rep.first_divergence or 'none'}")
        click.echo(f"default optimisations: top-1 agreement {rep.optimized_top1_agreement:.2f} %, max |diff| "
                   f"{rep.optimized_max_abs_diff:.4g}")
        click.echo(f"{'FAILED: ' + '; '.join(failures) if failures else 'ok'}")
    if failures:
        sys.exit(1)


_register_qat(cli)
_register_trt(cli)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit code 2 for bad input."""
    try:
        rv = cli.main(args=argv, prog_name="mixq-onnx", standalone_mode=False)
    except MixqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # a bare `mixq-onnx` or `mixq-onnx cache`: show the help
        click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        sys.exit(0)
    except click.ClickException as e:
        msg = " ".join(e.format_message().split())
        click.echo(f"error: {msg}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
