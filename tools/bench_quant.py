"""PTQ accuracy on the real CIFAR-10 networks in ../shared (issue 3's tables).

Runs `mixq-onnx calib/quantize/eval` as a user would, one subprocess per row, resumable: finished
rows are kept in docs/bench_quant.json, so an interrupted run continues where it stopped.

    python tools/bench_quant.py --jobs 2                 # every row
    python tools/bench_quant.py --models resnet20 --only main
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

SHARED = Path(os.environ.get("MIXQ_SHARED", ROOT.parent / "shared"))
MODELS = {
    "resnet20": ("cifar_resnet20", "models/resnet20-12fca82f.th", 81.02),
    "resnet56": ("cifar_resnet56", "models/resnet56-4bfd9763.th", 83.02),
    "resnet8": ("mlperf_tiny_resnet8", "models/mlperf-tiny-resnet8_cifar10_state_dict.pt", 76.44),
}
RESULTS = ROOT / "docs" / "bench_quant.json"
WORK = ROOT / "runs" / "bench_quant"
CACHE_ROOT = ROOT / "calib_cache"


def rows(models: list[str], only: str) -> list[dict]:
    out = []
    for m in models:
        def add(method, w, a, sym=True, source="real", group="main", m=m):
            out.append({"model": m, "method": method, "wbits": w, "abits": a, "symmetric": sym, "source": source,
                        "group": group})
        for w, a in ((8, 8), (4, 8), (4, 4), (2, 4)):
            add("rtn", w, a)
        for w, a in ((4, 8), (4, 4), (2, 4)):
            add("qdrop", w, a)
        for method in ("adaround", "brecq", "genie"):
            for w, a in ((4, 4), (2, 4)):
                add(method, w, a, group="methods")
        add("rtn", 4, 4, sym=False, group="asym")
        add("qdrop", 4, 4, sym=False, group="asym")
        add("qdrop", 2, 4, sym=False, group="asym")
        if m == "resnet20":
            for src in ("real-256", "inversion-mixup", "inversion-single", "noise"):
                add("qdrop", 4, 4, source=src, group="sources")
    if only != "all":
        out = [r for r in out if r["group"] in only.split(",")]
    return out


def row_id(r: dict) -> str:
    return (f"{r['model']}-{r['method']}-w{r['wbits']}a{r['abits']}-{'sym' if r['symmetric'] else 'asym'}"
            f"-{r['source']}")


def run(cmd: list[str], env: dict) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout.strip().splitlines()[-1]


def calib_cmd(model: str, source: str) -> list[str]:
    spec, ck, _ = MODELS[model]
    # the source comparison uses 256 images each (inversion on this CPU costs minutes per 100 images)
    num = "1024" if source == "real" else "256"
    base = ["mixq-onnx", "calib", "--num", num, "--cache-root", str(CACHE_ROOT), "-q"]
    if source in ("real", "real-256"):
        return base + ["--generator", "real", "--source", str(SHARED / "data/cifar10_train_calib.npz")]
    if source == "noise":
        return base + ["--generator", "noise", "--model", spec, "--checkpoint", str(SHARED / ck)]
    strategy = "mixup" if source == "inversion-mixup" else "single"
    return base + ["--generator", "inversion", "--prompts", strategy, "--model", spec, "--checkpoint",
                   str(SHARED / ck), "--shard-size", "128"]


ITERS: int | None = None


def run_row(r: dict, caches: dict, env: dict) -> dict:
    spec, ck, fp = MODELS[r["model"]]
    out = WORK / row_id(r)
    cmd = ["mixq-onnx", "quantize", "--model", spec, "--checkpoint", str(SHARED / ck), "--calib",
           caches[(r["model"], r["source"])], "--method", r["method"], "--wbits", str(r["wbits"]), "--abits",
           str(r["abits"]), "--out", str(out), "-q"]
    if not r["symmetric"]:
        cmd.append("--asymmetric")
    if ITERS and r["method"] != "rtn":
        cmd += ["--iters", str(ITERS)]
    t = time.perf_counter()
    run(cmd, env)
    wall = time.perf_counter() - t
    ev = json.loads(run(["mixq-onnx", "eval", "--quantized", str(out), "--data",
                         str(SHARED / "data/cifar10_test_dev.npz"), "--json"], env))
    rep = json.loads((out / "quant.json").read_text())["report"]
    ips = [u["iters_per_s"] for u in rep["units"]]
    return {**r, "id": row_id(r), "top1": ev["top1"], "top5": ev["top5"], "agreement": ev.get("agreement"),
            "fp_top1": fp, "quantize_s": round(wall, 1), "iters": rep["units"][0]["iters"] if ips else 0,
            "iters_per_s": round(sum(ips) / len(ips), 1) if ips else None, "cmd": " ".join(cmd[:2] + cmd[2:])}


def render(results: dict) -> str:
    lines = [
        "## PTQ accuracy on CIFAR-10 (issue 3)",
        "",
        f"`python tools/bench_quant.py` · {stamp()}",
        "",
        "Top-1 on all 5,000 images of `cifar10_test_dev.npz` (JPEG-75 CIFAR-10: compare rows, not with papers).",
        "Calibration: 1,024 images (`real` = `cifar10_train_calib.npz`); the calibration-source rows use 256",
        "images each (`real-256`, `inversion-mixup` = BN inversion with k=2 mixup soft targets, `inversion-single`,",
        "`noise`). `--preset fast` (400 iterations per unit, batch 32; ResNet-56 learned rows: `--iters 200`),",
        "symmetric TensorRT-deployable mode unless marked asym; first and last layer 8-bit.",
        "Time: whole `quantize` command, one thread (`OMP_NUM_THREADS=1`), 2 jobs side by side.",
        "",
        "| model | method | W/A | mode | calib | top-1 % | Δ FP | agree % | iters/unit | quantize s | it/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(results.values(), key=lambda r: (order[r["model"]], ["main", "methods", "asym", "sources"].index(
            r["group"]), r["method"] != "rtn", -r["abits"], -r["wbits"])):
        lines.append(
            f"| {r['model']} (FP {r['fp_top1']:.2f}) | {r['method']} | W{r['wbits']}A{r['abits']} | "
            f"{'sym' if r['symmetric'] else 'asym'} | {r['source']} | {r['top1']:.2f} | {r['top1'] - r['fp_top1']:+.2f} | "
            f"{r['agreement']:.2f} | {r['iters'] or '-'} | {r['quantize_s']:.0f} | {r['iters_per_s'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet8,resnet56")
    ap.add_argument("--only", default="all", help="comma list of groups: main, methods, asym, sources")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="re-run rows already in the results file")
    ap.add_argument("--iters", type=int, default=None, help="iterations per unit (default: the fast preset's 400)")
    a = ap.parse_args()
    global ITERS
    ITERS = a.iters
    if not (SHARED / "models").is_dir():
        sys.exit(f"../shared not found at {SHARED}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    todo = [r for r in rows(a.models.split(","), a.only) if a.redo or row_id(r) not in results]
    caches = {}
    for key in sorted({(r["model"], r["source"]) for r in todo}):
        print(f"calib {key} ...", flush=True)
        caches[key] = run(calib_cmd(*key), env)
    print(f"{len(todo)} rows to run", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        futs = {pool.submit(run_row, r, caches, env): r for r in todo}
        for f in as_completed(futs):
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {row_id(futs[f])}: {e}", flush=True)
                continue
            if RESULTS.exists():  # another bench process may have added rows meanwhile
                results = {**json.loads(RESULTS.read_text()), **results}
            results[res["id"]] = res
            tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
            os.replace(tmp, RESULTS)
            update_section("quant", render(results))
            print(f"{res['id']}: top1 {res['top1']:.2f} ({res['quantize_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
