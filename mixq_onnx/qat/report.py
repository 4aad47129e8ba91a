"""What `qat` leaves beside quant.json: qat.json (the full report), bits.png (bits per layer), and the short
stderr summary."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..quant.io import save_quantized

QAT_JSON = "qat.json"
BITS_PNG = "bits.png"


def summary(rep: dict[str, Any]) -> str:
    """A few lines: method, achieved budget against the target, moves at freezing, bits per layer."""
    a = rep["achieved"]
    t = rep["target"]
    want = (f" (target {t['bits']:g} bits)" if t and "bits" in t else
            f" (target {t['gbops']:g} GBOPs)" if t else "")
    lines = [f"{rep['method']}: weights {a['weight_bits']:.3f} bits, activations {a['act_bits']:.3f} bits, "
             f"{a['gbops']:.4g} GBOPs{want}; {len(rep['moves'])} bit move(s) at freezing; {rep['seconds']:.1f} s"]
    by = {q["name"]: q for q in rep["quantizers"]}
    cells = []
    for layer in rep["layers"]:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {q["name"]: q for q in rep["quantizers"]}
    labels, wb, ab, wl, al = [], [], [], [], []
    for layer in rep["layers"]:
        labels.append(layer["name"])
        wq = by[layer["weight"]]
        aq = by.get(layer["input"]) if layer["input"] else None
        wb.append(wq["bits"])
        wl.append(wq["learned_bits"])
        ab.append(aq["bits"] if aq else 0)
        al.append(aq["learned_bits"] if aq else float("nan"))
    for q in rep["quantizers"]:
        if q["kind"] == "act" and q["placement"] != "input":
            labels.append(q["name"])
            wb.append(0)
            wl.append(float("nan"))
            ab.append(q["bits"])
            al.append(q["learned_bits"])
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 2), 4.2), dpi=110)
    xs = list(range(n))
    ax.bar([x - 0.2 for x in xs], wb, width=0.4, label="weights", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], ab, width=0.4, label="activations", color="#dd8452")
    ax.plot([x - 0.2 for x in xs], wl, "k.", ms=4, label="learned (before rounding)")
    ax.plot([x + 0.2 for x in xs], al, "k.", ms=4)
    ax.set_xticks(xs, labels, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(8, *wb, *ab) + 1)
    a = rep["achieved"]
    ax.set_title(f"{rep['method']}: W {a['weight_bits']:.2f} bits, A {a['act_bits']:.2f} bits, "
                 f"{a['gbops']:.3g} GBOPs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_qat(qmodel: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """quant.json + weights.safetensors (as `quantize` writes them) plus qat.json and bits.png, all in one
    temporary sibling renamed into place (or, with `overwrite`, each file replaced atomically)."""
    rep = qmodel.mixq_qat_report  # type: ignore[attr-defined]
    files = {QAT_JSON: (json.dumps(rep, indent=2) + "\n").encode(), BITS_PNG: plot_bits(rep)}
    return save_quantized(qmodel, out, overwrite=overwrite, files=files)
