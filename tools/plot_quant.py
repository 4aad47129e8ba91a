"""Plot issue 3's accuracy table (docs/bench_quant.json, from tools/bench_quant.py) to docs/quant_accuracy.png:
top-1 per method and bit-width for each real CIFAR-10 network, symmetric mode, real calibration.

    python tools/plot_quant.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

METHODS = ("rtn", "adaround", "brecq", "qdrop", "genie")
BITS = ((8, 8), (4, 8), (4, 4), (2, 4))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((ROOT / "docs" / "bench_quant.json").read_text()).values()
    models = [m for m in ("resnet20", "resnet56", "resnet8") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True)
    axes = [axes] if len(models) == 1 else list(axes)
    for ax, model in zip(axes, models):
        sel = [r for r in rows if r["model"] == model and r["symmetric"] and r["source"] == "real"]
        fp = sel[0]["fp_top1"]
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            ys = []
            for w, a in BITS:
                hit = [r["top1"] for r in sel if r["method"] == method and (r["wbits"], r["abits"]) == (w, a)]
                ys.append(hit[0] if hit else float("nan"))
            xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(BITS))]
            ax.bar(xs, ys, width, label=method)
        ax.axhline(fp, color="k", lw=1, ls="--")
        ax.text(len(BITS) - 0.55, fp + 1, f"FP32 {fp:.2f}", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(BITS)), [f"W{w}A{a}" for w, a in BITS])
        ax.set_title(f"{model} (CIFAR-10, 5,000 test images)")
        ax.set_ylim(0, 92)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 %")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = ROOT / "docs" / "quant_accuracy.png"
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    update_section("quant-plot", f"## quant plot\n\n`python tools/plot_quant.py` · {stamp()} (plots the \"quant\" "
                   "table's symmetric, real-calibration rows)\n\n![top-1 by method and bit-width](quant_accuracy.png)")
    print(out)


if __name__ == "__main__":
    main()
