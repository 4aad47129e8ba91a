"""The README's main job, timed stage by stage from a fresh clone, and its accuracy across calibration seeds.

    python tools/bench_mainjob.py --repeats 2                  # the README command as written, twice
    python tools/bench_mainjob.py --repeats 0 --seeds 0,1,2 --variant "shard 64=--shard-size 64"

Each run clones HEAD into runs/bench_mainjob/ (with ../shared beside it, as a user would have it),
runs the three commands of the README's first line (calib inversion --num 512, quantize qdrop W4A4,
eval on all 5,000 test images) and reads each command's "<stage>: N s wall" line and the top-1.
`--seeds` re-runs the job with `calib --seed S` (and quantize --seed S) to show the spread that the
choice of synthetic images causes; `--variant "LABEL=ARGS"` adds calib arguments (the recipe
comparisons). Writes docs/benchmarks.md, section mainjob (merged with earlier rows of other labels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

from mixq_onnx.utils import shared_root  # noqa: E402

CK = "../shared/models/resnet20-12fca82f.th"
DATA = "../shared/data/cifar10_test_dev.npz"
STORE = ROOT / "docs" / "bench_mainjob.json"


def fresh_clone(base: Path, tag: str) -> Path:
    d = base / tag
    if d.exists():
        subprocess.run(["rm", "-rf", str(d)], check=True)
    d.mkdir(parents=True)
    (d / "shared").symlink_to(shared_root().resolve(), target_is_directory=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(d / "main")], check=True)
    return d / "main"


def run(cmd: str, cwd: Path) -> tuple[str, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MIXQ_CACHE_ROOT")}
    env["PYTHONPATH"] = str(cwd)  # the clone's package, not the editable install's working tree
    t = time.perf_counter()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {cmd}\n{r.stderr[-1500:]}")
    return r.stdout, r.stderr, time.perf_counter() - t


def main_job(cwd: Path, seed: int, calib_extra: str) -> dict:
    stages = {}
    out, err, t_calib = run(f"mixq-onnx calib --generator inversion --model cifar_resnet20 --checkpoint {CK} "
                            f"--num 512 --seed {seed} {calib_extra} -q", cwd)
    cache = out.strip().splitlines()[-1]
    stages["calib"] = t_calib
    _, _, t_q = run(f"mixq-onnx quantize --model cifar_resnet20 --checkpoint {CK} --calib {cache} --method qdrop "
                    f"--wbits 4 --abits 4 --seed {seed} --out runs/resnet20-w4a4 --overwrite", cwd)
    stages["quantize"] = t_q
    out, _, t_e = run(f"mixq-onnx eval --quantized runs/resnet20-w4a4 --data {DATA}", cwd)
    stages["eval"] = t_e
    top1 = float(re.search(r"top1 ([\d.]+) %", out).group(1))
    threads = re.findall(r"threads: (\d+)", err)
    return {"seconds": {k: round(v, 1) for k, v in stages.items()}, "total_s": round(sum(stages.values()), 1),
            "top1": top1, "threads": threads[-1] if threads else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of the README command as written")
    ap.add_argument("--seeds", default="", help="comma-separated calib/quantize seeds for the spread table")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="extra calib arguments for the seed table, e.g. 'shard 64=--shard-size 64'")
    a = ap.parse_args()
    base = ROOT / "runs" / "bench_mainjob"
    store = json.loads(STORE.read_text()) if STORE.is_file() else {"readme": [], "seeds": {}}
    if a.repeats:
        store["readme"] = []
    for i in range(a.repeats):
        # the README's first line, minus the installs, exactly as a user runs it
        cwd = fresh_clone(base, f"clone-{i}")
        t = time.perf_counter()
        res = main_job(cwd, 0, "")
        res["wall_s"] = round(time.perf_counter() - t, 1)
        store["readme"].append(res)
        print("readme", res, flush=True)
    variants = [("default", "")] + [tuple(v.split("=", 1)) for v in a.variant]
    for label, extra in variants:
        for s in [int(x) for x in a.seeds.split(",") if x.strip()]:
            cwd = fresh_clone(base, "seeds")
            res = main_job(cwd, s, extra)
            store["seeds"].setdefault(label, {})[str(s)] = {**res, "calib_args": extra}
            print(label, s, res, flush=True)
    STORE.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    lines = ["## mainjob: the README's first command (issue 11)", "",
             f"`python tools/bench_mainjob.py` · {stamp()} · nothing else running", "",
             "Each run: a fresh `git clone` with `../shared` beside it, then the README's three commands "
             "(installs excluded): `calib --generator inversion --num 512`, `quantize --method qdrop --wbits 4 "
             "--abits 4`, `eval` on all 5,000 images of `cifar10_test_dev.npz`. Seconds are each command's wall "
             "time (process start, imports and model load included). FP top-1 81.02 %.", "",
             "| run | calib s | quantize s | eval s | total s | threads | W4A4 top-1 % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(store["readme"]):
        s = r["seconds"]
        lines.append(f"| README command, run {i + 1} | {s['calib']} | {s['quantize']} | {s['eval']} | "
                     f"**{r['wall_s']}** | {r['threads']} | **{r['top1']:.2f}** |")
    if store["seeds"]:
        lines += ["", "Spread over calibration seeds (`calib --seed S`, `quantize --seed S`), same commands otherwise; "
                  "the README uses seed 0:", "",
                  "| calib recipe | seed | calib s | quantize s | top-1 % |", "|---|---:|---:|---:|---:|"]
        for label, runs in store["seeds"].items():
            vals = []
            for s, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
                vals.append(r["top1"])
                lines.append(f"| {label}{' `' + r['calib_args'] + '`' if r['calib_args'] else ''} | {s} | {r['seconds']['calib']} | "
                             f"{r['seconds']['quantize']} | {r['top1']:.2f} |")
            lines.append(f"| {label}: mean of {len(vals)} | | | | **{sum(vals) / len(vals):.2f}** |")
    lines += ["", "How the default recipe was chosen (same CLI, quantize seed 0, 2026-11-29; shard = one inversion batch):",
              "", "| calib recipe (images x steps, shard) | calib seed 0 | seed 1 | seed 2 | mean |",
              "|---|---:|---:|---:|---:|",
              "| 256 x 200, shard 64 (the old default) | 79.38 | | | |",
              "| 256 x 200, shard 256 | 80.62 | 79.38 | 80.48 | 80.16 |",
              "| 512 x 100, shard 256 (the new default) | 80.36 | 80.22 | 80.34 | 80.31 |",
              "", "Same cost per image step; the larger BN batch and the wider image set steady the accuracy "
              "(spread 0.14 pp against 1.24 pp)."]
    update_section("mainjob", "\n".join(lines))


if __name__ == "__main__":
    main()
