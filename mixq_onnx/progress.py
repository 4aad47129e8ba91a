"""Progress of long steps: a tqdm bar on a terminal, plain lines everywhere else.

tqdm redraws one line with carriage returns. In a pipe, a CI log or under `script` that gives one
unreadable line (or nothing until the end), so when the stream is not a TTY `progress_bar` returns a
`PlainProgress` instead: a whole line every `interval` seconds and a final one (left out only when bad
input, a `MixqError`, ends the step: that stays one `error:` line), e.g.

    quantize: 12/40 units, 0.8 unit/s, 15 s, ETA 35 s (layer2.1)

A heartbeat thread repeats the line when a single step outlasts the interval, so a log never goes
silent while the process is alive. The interval is `MIXQ_PROGRESS_INTERVAL` seconds (default 10);
a terminal without a size (a pty of `script` run from a pipe) gets the lines as well, and
`MIXQ_PROGRESS=plain` gives them on any terminal (a session recorded by `script`, a CI runner's pty).
`enabled=False` (the commands' `-q`) gives a bar that prints nothing. All three share one API:
`update(n)`, `set_postfix(...)`, `set_postfix_str(s)`, `close()`, and use as a context manager.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref
from typing import Any, Protocol, TextIO

from .errors import MixqError

DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "MIXQ_PROGRESS_INTERVAL"
STYLE_ENV = "MIXQ_PROGRESS"  # auto (a bar on a terminal, else lines) | plain (lines everywhere)

__all__ = ["DEFAULT_INTERVAL", "INTERVAL_ENV", "STYLE_ENV", "PlainProgress", "Progress", "progress_bar",
           "progress_interval"]


class Progress(Protocol):
    """What every bar offers (tqdm's names, so a tqdm instance is one)."""

    n: float
    total: float | None

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: Any) -> Any: ...


def progress_interval() -> float:
    """Seconds between plain progress lines: `MIXQ_PROGRESS_INTERVAL`, else 10."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise MixqError(f"{INTERVAL_ENV} must be a positive number of seconds, got {raw!r}")
    return v


def _plain_forced() -> bool:
    style = os.environ.get(STYLE_ENV, "").strip().lower() or "auto"
    if style not in ("auto", "plain"):
        raise MixqError(f"{STYLE_ENV} must be auto or plain, got {style!r}")
    return style == "plain"


MIN_BAR_WIDTH = 20  # columns; a narrower (or unknown) terminal gets the plain lines


def _bar_fits(stream: TextIO) -> bool:
    """A terminal a bar can be drawn on. A pty without a size (`script` run from a pipe, some CI runners)
    reports 0 columns, and tqdm then draws empty lines: such a stream gets the plain lines instead."""
    try:
        if not stream.isatty():
            return False
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # closed, not a file at all, or no size
        cols = 0  # (tqdm, too, takes the ioctl's 0 over $COLUMNS: no bar without a real width)
    return cols >= MIN_BAR_WIDTH


def progress_bar(total: float | None, desc: str, unit: str = "it", *, enabled: bool = True, initial: float = 0,
                 stream: TextIO | None = None, interval: float | None = None) -> Progress:
    """A progress bar for a long step: tqdm (rate and ETA) when `stream` (default stderr) is a terminal with
    a width, else plain lines every `interval` seconds (default `progress_interval()`) and a final line; silent
    when not `enabled`."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return _Silent(total, initial)
    if interval is None:
        interval = progress_interval()
    elif not interval > 0:
        raise MixqError(f"the progress interval must be positive, got {interval}")
    if not _plain_forced() and _bar_fits(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, initial=initial, stream=stream, interval=interval)


class _Silent:
    """The bar of `-q`: counts, prints nothing."""

    def __init__(self, total: float | None, initial: float = 0):
        self.total, self.n = total, initial

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plural(unit: str) -> str:
    if unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _rate(r: float) -> str:
    return f"{r:.3g}" if r >= 0.01 else f"{r:.2g}"


class PlainProgress:
    """Whole lines for logs and pipes: at most one per `interval` seconds from `update`, one from the
    heartbeat when no update printed for `interval` seconds, and a final one from `close`."""

    def __init__(self, total: float | None, desc: str, unit: str = "it", *, initial: float = 0,
                 stream: TextIO | None = None, interval: float = DEFAULT_INTERVAL, clock: Any = time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = float(interval)
        self._clock = clock
        self._initial = initial
        self._start = self._last = clock()
        self._postfix = ""
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The thread holds only a weak reference: a bar dropped without close() is collected and stops it.
        self._beat = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop),
                                      name=f"progress {desc}", daemon=True)
        self._beat.start()

    def line(self, final: bool = False) -> str:
        """The current line, e.g. `quantize: 12/40 units, 0.8 unit/s, 15 s, ETA 35 s (layer2.1)`."""
        elapsed = self._clock() - self._start
        done = self.n - self._initial  # the rate counts this run's work, not a resumed part
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{_count(self.n)}/{_count(self.total)}" if self.total is not None else _count(self.n)
        parts = [f"{count} {_plural(self.unit)}", f"{_rate(rate)} {self.unit}/s"]
        if final:
            finished = self.total is None or self.n >= self.total
            parts.append(f"{'done in' if finished else 'stopped after'} {_duration(elapsed)}")
        else:
            parts.append(_duration(elapsed))
            if self.total is not None:
                left = self.total - self.n
                parts.append(f"ETA {_duration(left / rate)}" if rate > 0 else "ETA ?")
        return f"{self.desc}: {', '.join(parts)}" + (f" ({self._postfix})" if self._postfix else "")

    def _emit(self, final: bool = False) -> None:
        """Print one line (caller holds the lock); a closed or broken stream never stops the work."""
        self._last = self._clock()
        try:
            self.stream.write(self.line(final) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _beat_once(self) -> float:
        """Print when no line came for `interval` seconds; the seconds until the next one is due."""
        with self._lock:
            if not self._closed and self._clock() - self._last >= self.interval:
                self._emit()
            return max(0.01, self._last + self.interval - self._clock())

    def update(self, n: float = 1) -> None:
        with self._lock:
            self.n += n
            if not self._closed and self._clock() - self._last >= self.interval:
                self._emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = str(s)

    def close(self) -> None:
        """Stop the heartbeat and print the final line, unless a `MixqError` is on its way out (from a
        `finally:`): bad input stays one `error:` line."""
        self._finish(sys.exc_info()[1])

    def _finish(self, exc: BaseException | None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not isinstance(exc, MixqError):
                self._emit(final=True)
        self._stop.set()
        if self._beat is not threading.current_thread():
            self._beat.join(timeout=1.0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, _type: Any, exc: BaseException | None, _tb: Any) -> None:
        self._finish(exc)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _heartbeat(ref: weakref.ref, stop: threading.Event) -> None:
    """The heartbeat thread's loop: wakes when the next line is due, until `stop` or the bar is gone."""
    bar = ref()
    wait = bar.interval if bar is not None else 0.0
    del bar
    while not stop.wait(wait):
        bar = ref()
        if bar is None:
            return
        wait = bar._beat_once()
        del bar
