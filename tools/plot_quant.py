"""Plot issue 3's accuracy table (docs/bench_quant.json, from tools/bench_quant.py) to docs/quant_accuracy.png:
for each real CIFAR-10 network (one panel each), the change in top-1 from the FP32 model per method and
bit-width (symmetric mode, real calibration), in percentage points, every bar labelled with its value.

When a few drops (W2A4) are an order of magnitude larger than the rest, each panel's y-axis is broken in two:
a fine scale on top (FP down to the largest small drop, where W4A4's differences are) and a compressed one
below for the large drops; both scales are shared by all panels.

    python tools/plot_quant.py [--json docs/bench_quant.json] [--out docs/quant_accuracy.png] [--no-doc]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

from mixq_onnx.plotting import (  # noqa: E402
    FP_COLOUR,
    bar_labels,
    data_limits,
    fmt_value,
    group_positions,
    method_colour,
    order_methods,
    save_figure,
    split_scale,
    style,
)

MODELS = ("resnet20", "resnet56", "resnet8")  # listed first, in this order; others follow
GROUP_WIDTH = 0.8  # of the unit spacing between bit-widths, for the fullest group
YLABEL = "top-1 change from FP32 (pp)"


def select(rows) -> dict[str, dict]:
    """model -> {"fp": FP top-1, "cells": {(wbits, abits): {method: top-1 - FP}}} for the symmetric,
    real-calibration rows."""
    out: dict[str, dict] = {}
    for r in rows:
        if not (r.get("symmetric") and r.get("source") == "real"):
            continue
        m = out.setdefault(r["model"], {"fp": float(r["fp_top1"]), "cells": {}})
        m["cells"].setdefault((int(r["wbits"]), int(r["abits"])), {})[r["method"]] = float(r["top1"]) - m["fp"]
    order = [m for m in MODELS if m in out] + sorted(m for m in out if m not in MODELS)
    return {m: out[m] for m in order}


def draw(data: dict[str, dict], title: str | None = None):
    """The figure (see the module doc). `data` as `select` returns it. Returns the matplotlib Figure; every
    bar carries its value as a label (an Axes text)."""
    plt = _plt()
    bits = sorted({b for d in data.values() for b in d["cells"]}, key=lambda wa: (-wa[0], -wa[1]))
    methods = order_methods(m for d in data.values() for c in d["cells"].values() for m in c)
    colours = {m: method_colour(m, methods) for m in methods}
    fullest = max((len(c) for d in data.values() for c in d["cells"].values()), default=1)
    width = GROUP_WIDTH / fullest
    values = [v for d in data.values() for c in d["cells"].values() for v in c.values()]
    cut = split_scale(values)
    fine = [v for v in values if cut is None or abs(v) <= cut]
    coarse = [v for v in values if cut is not None and abs(v) > cut]
    fine_lim = data_limits(fine, include=[0.0], pad=0.13)
    coarse_lim = (data_limits(coarse, pad=0.3)[0], fine_lim[0]) if cut else None  # continues the fine scale

    n = len(data)
    fig = plt.figure(figsize=(11.0, 3.5 * n + 0.6), layout="constrained")
    subs = fig.subfigures(n, 1, hspace=0.04) if n > 1 else [fig]
    for sub, (model, d) in zip(subs, data.items()):
        if cut:
            top, bottom = sub.subplots(2, 1, sharex=True, height_ratios=[3.2, 1.5],
                                       gridspec_kw={"hspace": 0.02})
            axes = [top, bottom]
        else:
            top = bottom = sub.subplots(1, 1)
            axes = [top]
        for j, wa in enumerate(bits):
            cell = d["cells"].get(wa, {})
            present = [m for m in methods if m in cell]
            xs = group_positions(j, len(present), width)
            for ax in axes:
                ax.bar(xs, [cell[m] for m in present], width * 0.92, color=[colours[m] for m in present],
                       label=None, zorder=2)
            for x, m in zip(xs, present):
                v = cell[m]
                ax = top if cut is None or abs(v) <= cut else bottom
                bar_labels(ax, [x], [v], [fmt_value(v, signed=True)], fontsize=7.5)
        top.set_ylim(*fine_lim)
        top.axhline(0, color=FP_COLOUR, lw=0.9, zorder=3)
        top.set_title(f"{model} · FP32 top-1 {d['fp']:.2f} %", loc="left", fontweight="bold")
        top.set_ylabel(YLABEL)
        if cut:
            bottom.set_ylim(*coarse_lim)
            top.spines["bottom"].set_visible(False)
            top.tick_params(axis="x", bottom=False)
            bottom.spines["top"].set_visible(False)
            kw = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 9, "linestyle": "none", "color": "k",
                  "mec": "k", "mew": 1, "clip_on": False}
            top.plot([0], [0], transform=top.transAxes, **kw)
            bottom.plot([0], [1], transform=bottom.transAxes, **kw)
            bottom.set_ylabel("(scale broken)", fontsize=7, color="#555555")
        bottom.set_xticks(range(len(bits)), [f"W{w}A{a}" for w, a in bits])
        bottom.set_xlim(-0.5, len(bits) - 0.5)
        for ax in axes:
            ax.grid(axis="x", visible=False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
    fig.legend(handles, methods, loc="outside lower center", ncol=len(methods), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _plt():
    from mixq_onnx.plotting import pyplot

    return pyplot()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench_quant.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "quant_accuracy.png")
    ap.add_argument("--no-doc", action="store_true", help="Do not rewrite the section in docs/benchmarks.md.")
    a = ap.parse_args(argv)
    data = select(json.loads(a.json.read_text()).values())
    if not data:
        raise SystemExit(f"{a.json}: no symmetric, real-calibration rows to plot")
    with style():
        fig = draw(data, "Top-1 change from FP32 by method and bit-width (CIFAR-10, 5,000 test images; "
                         "symmetric, real calibration; below 0 = accuracy lost)")
        out = save_figure(fig, a.out)
    if not a.no_doc:
        update_section("quant-plot", f"## quant plot\n\n`python tools/plot_quant.py` · {stamp()} (plots the "
                       "\"quant\" table's symmetric, real-calibration rows: top-1 minus FP32 top-1 in pp per "
                       "method and bit-width; the y-axis is broken where the W2A4 drops would flatten the rest)"
                       "\n\n![top-1 change from FP32 by method and bit-width](quant_accuracy.png)")
    print(out)


if __name__ == "__main__":
    main()
