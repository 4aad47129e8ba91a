"""The one matplotlib style of every chart mixq-onnx draws (sweep.png, bits.png, the docs' benchmark plots):
fixed method order and colours, value labels, axis limits that follow the data, and atomic PNG saving.

matplotlib is imported lazily (and always with the Agg backend), so importing this module costs nothing.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DPI = 150

# Methods in the order every chart lists them, each with its own colour (matplotlib's tab10, so the docs'
# older plots keep their colours). A method not listed here gets a spare colour, in order of appearance.
METHOD_ORDER = ("rtn", "adaround", "brecq", "qdrop", "genie", "lsq", "nipq")
METHOD_COLOURS = {
    "rtn": "#1f77b4",
    "adaround": "#ff7f0e",
    "brecq": "#2ca02c",
    "qdrop": "#d62728",
    "genie": "#9467bd",
    "lsq": "#8c564b",
    "nipq": "#e377c2",
}
SPARE_COLOURS = ("#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#843c39", "#637939")
FP_COLOUR = "#333333"
# weights / activations in bits-per-layer charts
KIND_COLOURS = {"weights": "#4c72b0", "activations": "#dd8452"}

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.08,
    "axes.unicode_minus": True,
}
MINUS = "\u2212"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style() -> Iterator[Any]:
    """`with style() as plt:` draw and save inside the block, in the shared style."""
    plt = pyplot()
    with plt.rc_context(RC):
        yield plt


def order_methods(names: Iterable[str]) -> list[str]:
    """Unique names, METHOD_ORDER first (in its order), then any others in order of appearance."""
    seen = list(dict.fromkeys(names))
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def method_colour(name: str, others: Sequence[str] = ()) -> str:
    """The colour of `name`: fixed for known methods; for others, a spare colour by position in `others`."""
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    extra = [m for m in dict.fromkeys(others) if m not in METHOD_COLOURS]
    i = extra.index(name) if name in extra else sum(map(ord, name))
    return SPARE_COLOURS[i % len(SPARE_COLOURS)]


def group_positions(centre: float, n: int, width: float) -> list[float]:
    """Centres of `n` bars of `width` side by side, the group centred on `centre` (n counts only the bars
    actually drawn, so a sparse group is not off-centre)."""
    return [centre + (i - (n - 1) / 2) * width for i in range(n)]


def fmt_value(v: float, digits: int = 1, signed: bool = False) -> str:
    """'−1.2' / '+0.3' / '0.0' (typographic minus, like the axis ticks; no '−0.0')."""
    s = f"{abs(v):.{digits}f}"
    if float(s) == 0:
        return s
    if v < 0:
        return MINUS + s
    return "+" + s if signed else s


def data_limits(values: Iterable[float], *, pad: float = 0.08, include: Iterable[float] = (),
                lo: float | None = None, hi: float | None = None, min_span: float = 1.0) -> tuple[float, float]:
    """y-limits that follow the data: [min, max] of `values` and `include` (NaNs ignored), widened by `pad`
    of the span at both ends (room for value labels) and clamped to [lo, hi]."""
    vs = [float(v) for v in (*values, *include) if v is not None and math.isfinite(float(v))]
    if not vs:
        return (0.0 if lo is None else lo, 1.0 if hi is None else hi)
    a, b = min(vs), max(vs)
    if b - a < min_span:
        mid = (a + b) / 2
        a, b = mid - min_span / 2, mid + min_span / 2
    span = b - a
    a, b = a - pad * span, b + pad * span
    if lo is not None:
        a = max(a, lo)
    if hi is not None:
        b = min(b, hi)
    return a, b


def split_scale(values: Iterable[float], *, min_jump: float = 0.2, max_fine: float = 0.3) -> float | None:
    """Where to break a bar chart's axis. `values` are signed (e.g. changes from FP, mostly negative); sorted
    by magnitude, a gap between neighbours qualifies when it is at least `min_jump` of the largest magnitude
    and the magnitudes below it reach at most `max_fine` of it (so the fine scale magnifies at least
    1/max_fine times): then the bars below the widest qualifying gap get a fine scale of their own (a few
    large drops would otherwise flatten every small difference). Returns the largest magnitude below that
    gap (the fine scale's extent), or None: one scale shows everything."""
    mags = sorted({abs(float(v)) for v in values if v is not None and math.isfinite(float(v))})
    if len(mags) < 2 or mags[-1] == 0:
        return None
    gaps = [(b - a, a) for a, b in zip(mags, mags[1:]) if b - a >= min_jump * mags[-1] and a <= max_fine * mags[-1]]
    return max(gaps)[1] if gaps else None


def bar_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], *, fontsize: float = 7,
               colour: str = "#222222", pad_pt: float = 2.0, at_base: bool = False) -> list:
    """A label on each bar: past its end (above a positive bar, below a negative one), `pad_pt` points off
    it; or, `at_base`, inside the bar by its root (where markers at the bar's end cannot cover it; give a
    `colour` that reads on the bar). Bars with a non-finite height get none. Returns the Text artists."""
    out = []
    for x, y, t in zip(xs, ys, texts):
        if y is None or not math.isfinite(y):
            continue
        up = y >= 0
        out.append(ax.annotate(t, (x, 0.0 if at_base else y), xytext=(0, pad_pt if up else -pad_pt),
                               textcoords="offset points", ha="center",
                               va="bottom" if up else "top", fontsize=fontsize, color=colour, zorder=4))
    return out


def _side(prev: float | None, y: float, nxt: float | None, up: bool) -> str:
    """Which side of a point a label above (`up`) or below it can sit without its own line running through
    it: 'right', 'left' or 'centre'."""
    def toward(v: float | None) -> bool:  # does the segment to v leave on the label's side?
        return v is not None and (v > y if up else v < y)

    left, right = toward(prev), toward(nxt)
    if left == right:
        return "centre"
    return "left" if right else "right"


def point_labels(ax, series: Sequence[tuple[Sequence[float], Sequence[float], Sequence[str], str]], *,
                 fontsize: float = 7.5, offset_pt: float = 5.0) -> list:
    """Value labels for a line chart. `series`: (xs, ys, texts, colour) per line. At each x the highest
    point's label goes above it, the lowest's below it (a single point's above), any between to its right;
    each on the side (left/right/centre) its own line's segments leave free. Returns the Text artists."""
    at: dict[float, list[tuple[float, int, int]]] = {}
    for si, (xs, ys, _, _) in enumerate(series):
        for k, (x, y) in enumerate(zip(xs, ys)):
            if y is not None and math.isfinite(y):
                at.setdefault(x, []).append((y, si, k))
    out = []
    for pts in at.values():
        pts.sort()
        for rank, (y, si, k) in enumerate(pts):
            xs, ys, texts, colour = series[si]
            prev = ys[k - 1] if k > 0 else None
            nxt = ys[k + 1] if k + 1 < len(ys) else None
            if rank == len(pts) - 1 or rank == 0:
                up = rank == len(pts) - 1
                side = _side(prev, y, nxt, up)
                dx = {"right": 0.6, "left": -0.6, "centre": 0.0}[side] * offset_pt
                dy = offset_pt if up else -offset_pt
                ha = {"right": "left", "left": "right", "centre": "center"}[side]
                va = "bottom" if up else "top"
            else:
                dx, dy, ha, va = 1.4 * offset_pt, 0.0, "left", "center"
            out.append(ax.annotate(texts[k], (xs[k], y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                                   va=va, fontsize=fontsize, color=colour, zorder=5,
                                   bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}))
    return out


def figure_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write the figure as a PNG at `path` atomically (a temporary sibling renamed into place, removed on
    failure); the figure is closed. Returns the path."""
    from .utils import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, figure_bytes(fig, dpi))
    return path
