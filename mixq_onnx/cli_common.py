"""Pieces shared by `cli.py` and `cli_trt.py`: light on purpose (click and the standard library only).

Nothing here may import torch, onnx, numpy or any other heavy module at module level: every CLI
invocation, `--help` and argument errors included, imports this file.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
POSITIVE = click.IntRange(min=1)  # counts and sizes: 0 or a negative number is bad input, never "all"


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and inf (click's FLOAT and FloatRange take them, and a NaN learning rate
    or weight passes every `x <= 0` check after it)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(v, param, ctx)

    def _describe_range(self) -> str:
        """No bounds: show nothing (click's would print 'x<=None')."""
        return "" if self.min is None and self.max is None else super()._describe_range()


FINITE = FiniteFloat()


class Range(click.IntRange):
    """An integer option checked while the command line is parsed, before the command imports torch (a bad
    --wbits answered after 7 s), in the library's words ("--wbits must be between 2 and 8, got 9"), with the
    range in --help. `also`: values allowed outside it, explained by `why`; `between` False words a bounded range
    as "at least A and at most B" (calib's counts, as its library says it)."""

    def __init__(self, lo: int, hi: int | None = None, also: tuple[int, ...] = (), why: str = "",
                 between: bool = True):
        super().__init__(lo, hi)
        self.also, self.why, self.between = also, why, between

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = click.INT.convert(value, param, ctx)
        if v in self.also or (self.min <= v and (self.max is None or v <= self.max)):
            return v
        name = max(param.opts, key=len) if param is not None else "value"
        span = (f"at least {self.min}" if self.max is None else f"between {self.min} and {self.max}" if self.between
                else f"at least {self.min} and at most {self.max}")
        other = f", or {' or '.join(map(str, self.also))}{f' ({self.why})' if self.why else ''}" if self.also else ""
        raise click.UsageError(f"{name} must be {span}{other}, got {v}", ctx)

    def _describe_range(self) -> str:
        return super()._describe_range() + "".join(f" or {a}" for a in self.also)


BITS = Range(2, 8)  # a deployable bit-width


def trust_model_code_option() -> Callable:
    """--trust-model-code, the same words on every command that loads a result folder's model."""
    return click.option(
        "--trust-model-code", is_flag=True,
        help="Import the model file or module that DIR/quant.json names. A result folder from someone else "
             "never runs code otherwise: pass --model PATH.py:factory yourself (its file must have the "
             "sha256 the folder records). zoo and timm names need neither.")


def augment_option() -> Callable:
    """`--augment` of the commands that train on the shared loop (qat, robustify)."""
    from .registry import AUGMENTS

    return click.option("--augment", type=click.Choice(AUGMENTS), default="none", show_default=True,
                        help="flip-crop: each training image mirrored left-right with probability 1/2 and shifted "
                             "by up to 1/8 of its size (reflect padding); seeded.")


def read_paths(o: dict[str, Any], *data_keys: str) -> tuple[str, ...]:
    """What a command reads, for `utils.check_apart` (an output must not hold nor lie inside any of it): the
    checkpoint, a model file (path.py:factory), and each data/cache option in `data_keys` as a path, or a cache
    hash resolved under --cache-root. A reference that does not resolve (a hash of no cache, a folder given as
    --calib that is no cache) is left to the loader's own error."""
    from .calib.cache import is_cache_dir, resolve_cache
    from .errors import MixqError

    out = [o.get("checkpoint")]
    spec = str(o.get("model") or "")
    if ".py:" in spec:
        out.append(spec.rsplit(":", 1)[0])
    for key in data_keys:
        ref = o.get(key)
        if not ref:
            continue
        if os.path.lexists(ref):
            if key != "calib_ref" or is_cache_dir(Path(ref)):  # --calib names a cache, never a data folder
                out.append(ref)
            continue
        try:
            out.append(str(resolve_cache(ref, o.get("cache_root"))))
        except MixqError:
            pass
    return tuple(str(p) for p in out if p)


def emit_json(obj: Any) -> None:
    """One JSON object (or list) on one stdout line, keys sorted: the `--json` output of every command."""
    click.echo(json.dumps(obj, sort_keys=True))


def warn_unquantized(names: Any) -> None:
    """One warning naming the conv/linear-like layers quantize left float without being asked."""
    if names:
        few = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
        click.echo(f"warning: {len(names)} conv/linear-like layer(s) stay float (a type or forward mixq-onnx does not "
                   f"quantize): {few}; name them in --float-layers to accept that, check INT8 coverage with "
                   "build --require-int8", err=True)


def tune_malloc() -> bool:
    """Keep freed tensors in the process instead of handing each one back to the OS (glibc's defaults unmap
    every allocation over its mmap threshold on free, so the next one of that size faults in zeroed pages
    again): less wall time for quantize and eval, the same bytes out, somewhat more peak memory
    (docs/benchmarks.md, section quantize-speed). glibc only; MIXQ_MALLOC_TUNE=0 turns it off."""
    if os.environ.get("MIXQ_MALLOC_TUNE", "1").strip() == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def compute_command(stage: str) -> Callable:
    """Add `--threads` to a command that computes, set the thread policy before its body imports torch,
    and close with one stderr line giving the stage's wall time (kept under -q: it is the summary)."""

    def deco(f: Callable) -> Callable:
        @click.option("--threads", type=POSITIVE, default=None, metavar="N",
                      help="Intra-op CPU threads [default: OMP_NUM_THREADS if set, else auto: as many as there are "
                           "idle cores, re-measured every few seconds, so a busy machine slows this in proportion].")
        @functools.wraps(f)
        def wrapper(*args: Any, threads: int | None = None, **kw: Any) -> Any:
            from .threads import configure

            tune_malloc()
            desc = configure(threads)
            t0 = time.perf_counter()

            def wall() -> None:
                click.echo(f"{stage}: {time.perf_counter() - t0:.1f} s wall ({desc})", err=True)

            try:
                rv = f(*args, **kw)
            except SystemExit as e:  # a bad verdict (exit 1) is a finished run: it gets its line too
                if e.code in (None, 0, 1):
                    wall()
                raise
            wall()
            return rv

        return wrapper

    return deco
