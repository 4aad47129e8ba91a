"""SymReg / SatNL robustness on the real CIFAR-10 networks in ../shared (issue 13's tables).

Runs `mixq-onnx robustify` and `mixq-onnx sweep` as a user would, one subprocess per step, resumable
(a finished checkpoint or sweep cell is never recomputed).

For ResNet-20 and ResNet-8, two training modes, each with four fine-tuned checkpoints next to the original:
  control (no regulariser), +SymReg, +SatNL, +both; same recipe and epochs for all four.
  - ce: labelled, cross-entropy on 4,500 of the 5,000 cifar10_train_calib.npz images (the first 450 of each
    class); the other 500 (50 per class) are held out for choosing hyper-parameters (`--stage tune`).
  - kd: data-free, knowledge distillation from the original on a BN-inversion cache (the product's default).
Every checkpoint is then swept on all 5,000 cifar10_test_dev.npz images: FP, and RTN and QDrop at W4A4, W3A3
and W2A4, calibrated on the network's inversion cache. Two seeds: seed k trains the checkpoints and seeds the
quantizers; tables show mean and spread.

    python tools/bench_robust.py --stage tune      # candidates on the 500 held-out images (seed 0)
    python tools/bench_robust.py                   # the checkpoints, the sweeps, the section "robust"
    python tools/bench_robust.py --plot-only       # redraw docs/robust_*.png from the recorded sweeps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

SHARED = Path(os.environ.get("MIXQ_SHARED", ROOT.parent / "shared"))
MODELS = {
    "resnet20": ("cifar_resnet20", "models/resnet20-12fca82f.th"),
    "resnet8": ("mlperf_tiny_resnet8", "models/mlperf-tiny-resnet8_cifar10_state_dict.pt"),
}
WORK = ROOT / "runs" / "bench_robust"
BITS = ("W4A4", "W3A3", "W2A4")

# The recipe every fine-tuned checkpoint of a mode shares (chosen on the held-out 500; see --stage tune).
RECIPE = {
    "ce": {"epochs": 5, "lr": 1e-2, "batch-size": 128},
    "kd": {"epochs": 10, "lr": 1e-2, "batch-size": 128},
}
BETA = 100.0  # SymReg weight (held-out choice: see TUNE)
# per (network, mode) where the held-out images chose otherwise; none did: for resnet8 data-free no candidate
# met the bar on the held-out images (see TUNE), so it keeps the resnet20 choice
BETAS: dict[tuple[str, str], float] = {}
VARIANTS = ("control", "symreg", "satnl", "both")


def beta(net: str, mode: str) -> float:
    return BETAS.get((net, mode), BETA)


def variant_args(net: str, mode: str, variant: str) -> list[str]:
    b = ["--symreg", f"{beta(net, mode):g}"]
    return {"control": [], "symreg": b, "satnl": ["--satnl"], "both": [*b, "--satnl"]}[variant]


SWEEP_ITERS = 50  # QDrop iterations per unit (the `fast` preset's 400 x 108 cells does not fit a CPU afternoon)
SWEEP_SAMPLES = 512
INVERSION_IMAGES = 2048


def cli(*args: object, threads: int | None = 1) -> str:
    """Run one mixq-onnx command as a user would; `threads` None for commands without --threads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mixq_onnx.cli", *map(str, args), *(["--threads", str(threads)] if threads else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def model_args(net: str) -> list[str]:
    spec, ck = MODELS[net]
    return ["--model", spec, "--checkpoint", str(SHARED / ck)]


def split_data() -> tuple[Path, Path]:
    """4,500 training images (first 450 per class) and 500 held out (last 50 per class) of the train split."""
    d = WORK / "data"
    d.mkdir(parents=True, exist_ok=True)
    tr, ho = d / "train4500.npz", d / "holdout500.npz"
    if not (tr.exists() and ho.exists()):
        z = np.load(SHARED / "data" / "cifar10_train_calib.npz")
        keep = z["index_within_class"] < 450
        np.savez(tr, x=z["x"][keep], y=z["y"][keep])
        np.savez(ho, x=z["x"][~keep], y=z["y"][~keep])
    return tr, ho


def inversion_cache(net: str) -> str:
    marker = WORK / f"cache-{net}.txt"
    if marker.exists():
        return marker.read_text().strip()
    path = cli("calib", "--generator", "inversion", *model_args(net), "--num", INVERSION_IMAGES, "--seed", 0,
               "--cache-root", WORK / "cache", "-q", threads=2)
    marker.write_text(path)
    return path


def checkpoint(net: str, mode: str, variant: str, seed: int, extra: list[str] | None = None, tag: str = "") -> Path:
    if extra is None and variant in ("symreg", "both") and beta(net, mode) != BETA:
        tag = f"-b{beta(net, mode):g}"
    out = WORK / "ckpt" / f"{net}-{mode}-{variant}{tag}-s{seed}.safetensors"
    if out.exists() and out.with_name(out.name + ".json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tr, ho = split_data()
    rec = RECIPE[mode]
    data = str(tr) if mode == "ce" else inversion_cache(net)
    args = ["robustify", *model_args(net), "--data", data, "--out", out, "--seed", seed,
            "--epochs", rec["epochs"], "--lr", rec["lr"], "--batch-size", rec["batch-size"],
            "--loss", "ce" if mode == "ce" else "kd", "--eval-data", ho, "-q", *(extra if extra is not None else variant_args(net, mode, variant))]
    t0 = time.time()
    cli(*args)
    print(f"  {out.name}: {time.time() - t0:.0f} s", flush=True)
    return out


def sweep(net: str, seed: int, ckpts: dict[str, Path], data: Path, out: Path, bits=BITS, methods=("rtn", "qdrop"),
          limit: int | None = None, threads: int = 1) -> dict:
    args = ["sweep", *model_args(net), "--label", "original", "--calib", inversion_cache(net), "--data", data,
            "--bits", ",".join(bits), "--method", ",".join(methods), "--seeds", seed, "--iters", SWEEP_ITERS,
            "--num-samples", SWEEP_SAMPLES, "--out", out, "-q"]
    for label, p in ckpts.items():
        args += ["--compare", f"{label}={p}"]
    if limit:
        args += ["--limit", limit]
    cli(*args, threads=threads)
    return json.loads((out / "sweep.json").read_text())


def run_jobs(fns, jobs: int) -> list:
    with ThreadPoolExecutor(jobs) as ex:
        return [f.result() for f in [ex.submit(fn) for fn in fns]]


# ----------------------------------------------------------------------------- tuning on the held-out 500
TUNE = {  # net -> (tag, mode, extra args): what was tried, all on seed 0, measured on the held-out images only
    "resnet20": [  # (tag, mode, extra args): what was tried, all on seed 0, measured on the held-out images only
        ("control-lr1e-3", "ce", ["--lr", "1e-3"]),
        ("both1000-lr1e-3", "ce", ["--lr", "1e-3", "--symreg", "1000", "--satnl"]),
        ("control", "ce", ["--lr", "1e-2"]),
        ("symreg100", "ce", ["--lr", "1e-2", "--symreg", "100"]),
        ("symreg1000", "ce", ["--lr", "1e-2", "--symreg", "1000"]),
        ("satnl-learned", "ce", ["--lr", "1e-2", "--satnl"]),
        ("satnl-fixed", "ce", ["--lr", "1e-2", "--satnl", "--fixed-alpha"]),
        ("both100", "ce", ["--lr", "1e-2", "--symreg", "100", "--satnl"]),
        ("both1000", "ce", ["--lr", "1e-2", "--symreg", "1000", "--satnl"]),
        ("both1000-2to2", "ce", ["--lr", "1e-2", "--symreg", "1000", "--symreg-pairing", "2:2", "--satnl"]),
        ("both1000-asam", "ce", ["--lr", "1e-2", "--symreg", "1000", "--satnl", "--sam", "asam", "--rho", "0.5"]),
    ],
    "resnet8": [  # the resnet20 choice (BETA 100) lost 3.5 pp of FP top-1 in data-free mode: weaker BETAs
        ("kd-control", "kd", []),
        ("kd-both100", "kd", ["--symreg", "100", "--satnl"]),
        ("kd-both30", "kd", ["--symreg", "30", "--satnl"]),
        ("kd-both10", "kd", ["--symreg", "10", "--satnl"]),
        ("kd-symreg30", "kd", ["--symreg", "30"]),
    ],
}


def stage_tune(nets: list[str], jobs: int) -> str:
    _, ho = split_data()
    for net in nets:
        inversion_cache(net)
        cands = TUNE[net]
        cks = run_jobs([lambda net=net, t=t, m=m, e=e: checkpoint(net, m, "tune", 0, e, tag=f"-{t}") for t, m, e in cands],
                       jobs)
        doc = sweep(net, 0, {t: p for (t, _, _), p in zip(cands, cks)}, ho, WORK / f"tune-{net}",
                    bits=("W3A3", "W2A4"), threads=2)
        s = {(c["label"], c["method"], c["bits"]): c["top1"] for c in doc["cells"]}
        rows = [f"| {net} | {t} | {m} | `{' '.join(e) or '-'}` | {s[(t, 'fp', 'FP')]:.1f} | {s[(t, 'rtn', 'W3A3')]:.1f} "
                f"| {s[(t, 'qdrop', 'W2A4')]:.1f} |" for t, m, e in cands]
        rows.append(f"| {net} | original | - | - | {s[('original', 'fp', 'FP')]:.1f} | {s[('original', 'rtn', 'W3A3')]:.1f} "
                    f"| {s[('original', 'qdrop', 'W2A4')]:.1f} |")
        (WORK / f"tune-{net}.md").write_text("\n".join(rows) + "\n")
    return tune_table()


def tune_table() -> str:
    rows = [p.read_text().strip() for p in sorted(WORK.glob("tune-*.md"))]
    if not rows:
        return "(run `--stage tune` first)"
    return "\n".join(["| net | candidate | mode | robustify args | FP | RTN W3A3 | QDrop W2A4 |",
                      "|---|---|---|---|---:|---:|---:|", *rows])


# ----------------------------------------------------------------------------- the measurement
def stage_main(nets: list[str], modes: list[str], seeds: list[int], jobs: int) -> dict:
    for net in nets:
        inversion_cache(net)
    todo = [(n, m, v, s) for s in seeds for n in nets for m in modes for v in VARIANTS]
    run_jobs([lambda a=a: checkpoint(*a) for a in todo], jobs)
    test = SHARED / "data" / "cifar10_test_dev.npz"
    pairs = [(n, s) for n in nets for s in seeds]
    docs = run_jobs([lambda n=n, s=s: sweep(n, s, {f"{m}-{v}": checkpoint(n, m, v, s) for m in modes for v in VARIANTS},
                                            test, WORK / f"sweep-{n}-s{s}") for n, s in pairs], jobs)
    return {f"{n}-s{s}": d for (n, s), d in zip(pairs, docs)}


def table(docs: dict, nets: list[str], modes: list[str], seeds: list[int]) -> tuple[str, list[str]]:
    cols = [("fp", "FP")] + [(m, b) for m in ("rtn", "qdrop") for b in BITS]
    lines = ["| net | checkpoint | " + " | ".join("FP" if m == "fp" else f"{m.upper() if m == 'rtn' else 'QDrop'} {b}"
                                                  for m, b in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    verdicts = []
    for net in nets:
        vals: dict[tuple[str, str, str], list[float]] = {}
        for s in seeds:
            for c in docs[f"{net}-s{s}"]["cells"]:
                vals.setdefault((c["label"], c["method"], c["bits"]), []).append(c["top1"])

        def mean(k, vals=vals):
            return float(np.mean(vals[k]))

        for label in ["original"] + [f"{m}-{v}" for m in modes for v in VARIANTS]:
            cells = []
            for m, b in cols:
                v = vals[(label, m, b)]
                cells.append(f"{np.mean(v):.2f} ± {(max(v) - min(v)) / 2:.2f}")
            lines.append(f"| {net} | {label} | " + " | ".join(cells) + " |")
        for mode in modes:
            d3 = mean((f"{mode}-both", "rtn", "W3A3")) - mean((f"{mode}-control", "rtn", "W3A3"))
            d2 = mean((f"{mode}-both", "qdrop", "W2A4")) - mean((f"{mode}-control", "qdrop", "W2A4"))
            dfp = mean((f"{mode}-both", "fp", "FP")) - mean(("original", "fp", "FP"))
            ok = d3 >= 2 and d2 >= 2 and dfp >= -0.5
            verdicts.append(f"| {net} | {mode} | {d3:+.2f} | {d2:+.2f} | {dfp:+.2f} | {'holds' if ok else 'does not hold'} |")
    return "\n".join(lines), verdicts


def plot(docs: dict, net: str, modes: list[str], seeds: list[int]) -> Path:
    """docs/robust_NET.png: the original, each mode's control and +both, RTN and QDrop, seeds merged (error
    bars: their spread)."""
    sys.path.insert(0, str(ROOT))
    from mixq_onnx.sweep import plot_sweep

    keep = ["original"] + [f"{m}-{v}" for m in modes for v in ("control", "both")]
    first = docs[f"{net}-s{seeds[0]}"]
    merged = {**first, "config": {**first["config"], "seeds": seeds, "bits": list(BITS)},
              "models": [m for m in first["models"] if m["label"] in keep],
              "cells": [c for s in seeds for c in docs[f"{net}-s{s}"]["cells"] if c["label"] in keep]}
    return plot_sweep(merged, ROOT / "docs" / f"robust_{net}.png")


def plot_recorded(nets: list[str], modes: list[str], seeds: list[int]) -> list[Path]:
    """Redraw the plots from the sweeps already recorded under WORK (missing ones are an error)."""
    docs = {}
    for n in nets:
        for s in seeds:
            f = WORK / f"sweep-{n}-s{s}" / "sweep.json"
            if not f.exists():
                raise SystemExit(f"{f} is missing: run the benchmark first (without --plot-only)")
            docs[f"{n}-s{s}"] = json.loads(f.read_text())
    return [plot(docs, net, modes, seeds) for net in nets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["tune", "main"], default="main")
    ap.add_argument("--models", default="resnet20,resnet8")
    ap.add_argument("--modes", default="ce,kd")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true",
                    help="Only redraw docs/robust_NET.png from the recorded runs/bench_robust/sweep-NET-sSEED/sweep.json "
                         "(nothing is trained or quantized; docs/benchmarks.md is left as it is).")
    a = ap.parse_args()
    nets, modes, seeds = a.models.split(","), a.modes.split(","), [int(s) for s in a.seeds.split(",")]
    if a.plot_only:
        for p in plot_recorded(nets, modes, seeds):
            print(p)
        return
    t0 = time.time()
    if a.stage == "tune":
        print(stage_tune(nets, a.jobs))
        return
    docs = stage_main(nets, modes, seeds, a.jobs)
    tab, verdicts = table(docs, nets, modes, seeds)
    plots = [plot(docs, net, modes, seeds) for net in nets]
    tune = tune_table()
    body = f"""## robust: SymReg / SatNL checkpoints across bit-widths (issue 13)

`python tools/bench_robust.py --stage tune && python tools/bench_robust.py` · {stamp()} · this invocation {time.time() - t0:.0f} s
(finished checkpoints and sweep cells are reused; the first full run took about 46 minutes)

Top-1 % on all 5,000 images of `cifar10_test_dev.npz` (JPEG-75 CIFAR-10), mean ± half the spread of 2 seeds
(seed k trains the checkpoint and seeds the quantizers). `original`: the shared checkpoint. Every fine-tuned
checkpoint of a mode shares one recipe: `ce` = cross-entropy on 4,500 labelled train images
({RECIPE['ce']['epochs']} epochs, SGD lr {RECIPE['ce']['lr']} cosine, batch {RECIPE['ce']['batch-size']});
`kd` = data-free distillation from the original on a {INVERSION_IMAGES}-image BN-inversion cache
({RECIPE['kd']['epochs']} epochs, same optimiser). Variants: `control` (no regulariser), `symreg` (BETA {BETA:g},
1:1 pairing{''.join(f'; {n} {m}: {b:g}' for (n, m), b in BETAS.items())}), `satnl` (learned alpha), `both`. Quantization: symmetric per-channel weights, first/last layer
8-bit, calibrated on the same inversion cache ({SWEEP_SAMPLES} images); QDrop with {SWEEP_ITERS} iterations per
unit (fewer than the `fast` preset's 400, so that 108 QDrop runs fit on 2 CPU cores).

{tab}

The bar: `both` beats `control` by at least 2 pp at RTN W3A3 and at QDrop W2A4 (mean of the seeds) and loses
at most 0.5 pp of FP top-1 against the original.

| net | mode | Δ RTN W3A3 (both − control) | Δ QDrop W2A4 (both − control) | Δ FP (both − original) | bar |
|---|---|---:|---:|---:|---|
{chr(10).join(verdicts)}

{chr(10).join(f"![{p.stem}]({p.name})" for p in plots)}

What was tried, on the 500 held-out train images only (seed 0; `--stage tune`):

{tune}
"""
    update_section("robust", body)
    print(body)


if __name__ == "__main__":
    main()
