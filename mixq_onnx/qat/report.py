"""What `qat` leaves beside quant.json: qat.json (the full report), bits.png (bits per layer), and the short
stderr summary."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..quant.io import QAT_REPORT_FILES, save_quantized

QAT_JSON, BITS_PNG = QAT_REPORT_FILES  # quant.io owns the names: an overwrite by quantize removes them


def _averages(a: dict[str, Any]) -> str:
    """The averages `achieved` gives, with their scope named when the budget counted the learned quantizers."""
    out = f"weights {a['weight_bits']:.3f} bits, activations {a['act_bits']:.3f} bits"
    if "weight_bits_all" in a:
        out += (f" over the learned quantizers (all: weights {a['weight_bits_all']:.3f}, activations "
                f"{a['act_bits_all']:.3f})")
    return out


def summary(rep: dict[str, Any]) -> str:
    """A few lines: method, achieved budget against the target, moves at freezing, bits per layer."""
    a = rep["achieved"]
    t = rep["target"]
    want = (f" (target {t['bits']:g} bits)" if t and "bits" in t else
            f" (target {t['gbops']:g} GBOPs)" if t else "")
    lines = [f"{rep['method']}: {_averages(a)}, {a['gbops']:.4g} GBOPs{want}; {len(rep['moves'])} bit move(s) at "
             f"freezing; {rep['seconds']:.1f} s"]
    if rep.get("float_layers"):
        d = rep["deployed"]
        lines.append(f"  {len(rep['float_layers'])} layer(s) stay float (--max-bits 16; each counts 16 bits): "
                     + ", ".join(f"{f['name']} (learned W{f['learned_weight_bits']:.1f}"
                                 f"A{'-' if f['learned_input_bits'] is None else format(f['learned_input_bits'], '.1f')})"
                                 for f in rep["float_layers"])
                     + f"; deployed, counting them at 16 bits: {_averages(d)}, {d['gbops']:.4g} GBOPs")
    by = {q["name"]: q for q in rep["quantizers"]}
    cells = []
    for layer in rep["layers"]:
        if layer.get("float"):
            cells.append(f"{layer['name']} float")
            continue
        w = by[layer["weight"]]["bits"]
        a_ = by[layer["input"]]["bits"] if layer["input"] else "-"
        cells.append(f"{layer['name']} W{w}A{a_}")
    others = [q for q in rep["quantizers"] if q["kind"] == "act" and q["placement"] != "input"]
    cells += [f"{q['name']} A{q['bits']}" for q in others]
    lines.append("  " + ", ".join(cells))
    return "\n".join(lines)


def plot_bits(rep: dict[str, Any]) -> bytes:
    """PNG bar chart: per Conv/Linear layer (execution order) its weight bits and input activation bits;
    residual and matmul activation quantizers after them. Learned bits before rounding as dots."""
    import math

    from .. import plotting as P

    by = {q["name"]: q for q in rep["quantizers"]}
    labels, wb, ab, wl, al = [], [], [], [], []
    floats = {f["name"]: f for f in rep.get("float_layers", [])}
    for layer in rep["layers"]:
        if layer.get("float"):  # drawn at 16 bits (float), the bits it learned as dots
            f = floats.get(layer["name"], {})
            labels.append(f"{layer['name']} (float)")
            wb.append(16)
            ab.append(16 if f.get("input_bits") is not None else 0)
            wl.append(f.get("learned_weight_bits", float("nan")))
            li = f.get("learned_input_bits")
            al.append(li if li is not None else float("nan"))
            continue
        labels.append(layer["name"])
        wq = by[layer["weight"]]
        aq = by.get(layer["input"]) if layer["input"] else None
        wb.append(wq["bits"])
        wl.append(wq["learned_bits"])
        ab.append(aq["bits"] if aq else 0)
        al.append(aq["learned_bits"] if aq and aq["learned_bits"] is not None else float("nan"))
    for q in rep["quantizers"]:
        if q["kind"] == "act" and q["placement"] != "input":
            labels.append(q["name"])
            wb.append(0)
            wl.append(float("nan"))
            ab.append(q["bits"])
            al.append(q["learned_bits"] if q["learned_bits"] is not None else float("nan"))  # None: no source
    n = len(labels)
    xs = list(range(n))
    top = max([8, *wb, *ab, *(v for v in (*wl, *al) if math.isfinite(v))])
    with P.style() as plt:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 2), 4.2))
        for dx, bits, learned, kind in ((-0.2, wb, wl, "weights"), (0.2, ab, al, "activations")):
            pos = [x + dx for x in xs]
            ax.bar(pos, bits, width=0.4, label=kind, color=P.KIND_COLOURS[kind], zorder=2)
            ax.plot(pos, learned, "k.", ms=4, zorder=3, label="learned (before rounding)" if dx < 0 else None)
            if n <= 64:  # one label per bar while they still fit
                shown = [(x, b) for x, b in zip(pos, bits) if b]
                P.bar_labels(ax, [x for x, _ in shown], [b for _, b in shown], [str(b) for _, b in shown],
                             fontsize=6.5 if n <= 32 else 5, colour="white", at_base=True)
        ax.set_xticks(xs, labels, rotation=90, fontsize=6)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel("bits")
        ax.set_ylim(0, top + 1.5)
        ax.grid(axis="x", visible=False)
        a = rep["achieved"]
        scope = " (learned quantizers)" if "weight_bits_all" in a else ""
        ax.set_title(f"{rep['method']}: W {a['weight_bits']:.2f} bits, A {a['act_bits']:.2f} bits{scope}, "
                     f"{a['gbops']:.3g} GBOPs", fontsize=10)
        ax.legend(loc="upper right", ncol=3)
        fig.tight_layout()
        return P.figure_bytes(fig)


def save_qat(qmodel: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """quant.json + weights.safetensors (as `quantize` writes them) plus qat.json and bits.png, all in one
    temporary sibling renamed into place (or, with `overwrite`, each file replaced atomically)."""
    rep = qmodel.mixq_qat_report  # type: ignore[attr-defined]
    files = {QAT_JSON: (json.dumps(rep, indent=2) + "\n").encode(), BITS_PNG: plot_bits(rep)}
    return save_quantized(qmodel, out, overwrite=overwrite, files=files)
