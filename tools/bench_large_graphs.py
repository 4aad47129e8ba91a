"""Graphs above protobuf's 2 GiB: `export`, `check`, onnxruntime, `verify`, `build` and `inspect` on timm
`vit_huge_patch14_224` (631 M parameters, random weights: structure and sizes only), through the CLI.

    python tools/bench_large_graphs.py                        # float and W8A8 rows, before-ref b8c1c2a
    python tools/bench_large_graphs.py --skip-build           # without the TensorRT-RTX build (minutes, ~GBs)
    python tools/bench_large_graphs.py --build-reads --before-ref cc31926   # section large-graphs-build

`--build-reads`: what `build` reads of an external-data graph before and after it stopped loading the weights
into memory to check their location (the W8A8 graph below; builds alternate before, after, before, after).
Each build runs in its own process: peak resident memory from the kernel's rusage, bytes read through read()
calls (`rchar` of /proc/self/io, page-cache hits included) at the process's exit.

Rows:
- *float, before*: `export --fp` at --before-ref (one file only: stops at "Failed to serialize proto").
- *float*: `export --fp` here (2.5 GB of weights: a data file beside the graph, chosen automatically), `check`
  (the float graph has no Q/DQ, so its errors are the unquantized-* rules; what matters is that onnx.checker
  and shape inference pass), and onnxruntime (ORT_DISABLE_ALL) against PyTorch on 2 random images.
- *W8A8*: `calib --generator noise` (4 images), `quantize --method rtn --wbits 8 --abits 8`, `export
  --external-data` (its INT8 weights, 0.6 GB, would fit one file; the flag puts them in a data file), `check`,
  `verify` on 4 random images, `build --backend tensorrt-rtx --batch 1:1:1`, `inspect`.
Work files go to runs/large_graphs/ (ignored, several GB; removed with --clean). Writes docs/benchmarks.md,
section large-graphs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads import worktree  # noqa: E402
from benchmd import ROOT, stamp, update_section  # noqa: E402

from mixq_onnx.onnx.graph import external_data_files  # noqa: E402

MODEL = "vit_huge_patch14_224"
WORK = ROOT / "runs" / "large_graphs"

ORT_VS_TORCH = """
import json, sys, numpy as np, torch
from mixq_onnx.models import load_model
from mixq_onnx.onnx.verify import ort_session
torch.manual_seed(0)
m = load_model(sys.argv[1], random_init=True).eval()
x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = m(x).numpy()
y = ort_session(sys.argv[2], optimized=False).run(None, {"input": x.numpy()})[0]
print(json.dumps({"max_abs_diff": float(np.abs(y - ref).max()), "max_abs": float(np.abs(ref).max())}))
"""


def cli(src: Path, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", *map(str, args)], cwd=src, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    print(f"{dt:7.1f} s  rc {r.returncode}  {' '.join(map(str, args[:3]))}", flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, r


READS_SHIM = """
import atexit, sys
def _io():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print("MIXQ_IO", io["rchar"], file=sys.stderr)
atexit.register(_io)
sys.argv = ["mixq-onnx", *sys.argv[1:]]
from mixq_onnx.cli import main
main()
"""


def measured_cli(src: Path, *args: str) -> dict:
    """One CLI process: wall s, peak RSS (GB) from wait4's rusage, bytes read() (GB), exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", READS_SHIM, *map(str, args)], cwd=src, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t
    io = [ln.split()[1] for ln in err.splitlines() if ln.startswith("MIXQ_IO ")]
    out = {"s": dt, "rss_gb": ru.ru_maxrss * 1024 / 1e9, "read_gb": int(io[-1]) / 1e9 if io else float("nan"),
           "rc": p.returncode, "err": err}
    print(f"{dt:7.1f} s  rc {p.returncode}  rss {out['rss_gb']:.2f} GB  read {out['read_gb']:.2f} GB  "
          f"{' '.join(map(str, args[:2]))}", flush=True)
    return out


def build_reads(a: argparse.Namespace) -> None:
    """Section large-graphs-build: `build` of the W8A8 external-data graph at --before-ref and here."""
    work = WORK / "build_reads"
    q = work / "q" / "vith_w8a8.onnx"
    if not (a.reuse and q.is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _, r = cli(ROOT, "calib", "--generator", "noise", "--num", "4", "--size", "224", "--cache-root",
                   work / "caches", "-q")
        cli(ROOT, "quantize", "--model", MODEL, "--random-weights", "--calib", r.stdout.strip().splitlines()[-1],
            "--method", "rtn", "--wbits", "8", "--abits", "8", "--num-samples", "4", "--out", work / "w8a8", "-q")
        cli(ROOT, "export", "--quantized", work / "w8a8", "--out", q, "--external-data")
    before = worktree(a.before_ref)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(2):
        for side, src in (("before", before), ("after", ROOT)):
            plan = work / f"{side}{i}.plan"
            res = measured_cli(src, "build", q, "--out", plan, "--backend", "tensorrt-rtx", "--batch", "1:1:1")
            if res["rc"]:
                raise SystemExit(f"build ({side}) failed:\n{res['err'][-2000:]}")
            res["plan_gb"] = plan.stat().st_size / 1e9
            runs[side].append(res)
            plan.unlink()
            Path(str(plan) + ".json").unlink()
    data_gb = sum((q.parent / d).stat().st_size for d in external_data_files(q)) / 1e9
    rows = []
    for side, ref in (("before", a.before_ref), ("after", head)):
        for i, res in enumerate(runs[side]):
            rows.append(f"| {side} ({ref}) | {i + 1} | {res['s']:.1f} | {res['rss_gb']:.2f} | {res['read_gb']:.2f} | "
                        f"{res['read_gb'] / data_gb:.1f} | {res['plan_gb']:.2f} |")
    ratio = sum(r["s"] for r in runs["after"]) / sum(r["s"] for r in runs["before"])
    text = "\n".join([
        "## large-graphs-build: what `build` reads of an external-data graph", "",
        f"`python tools/bench_large_graphs.py --build-reads --before-ref {a.before_ref}` · {stamp()}", "",
        f"timm `{MODEL}`, random weights, W8A8 rtn, `export --external-data`: {sizes(q)}. `build --backend "
        "tensorrt-rtx --batch 1:1:1`, each in its own process, alternating before and after. *peak RSS*: the "
        "kernel's maximum resident set of the process; *read*: bytes through read() calls (/proc/self/io rchar at "
        "exit: page-cache hits included, the library's own files and the interpreter's too); *reads of the data*: "
        "read / data file size. Before, six reads: `require_onnx` loaded every weight into Python memory (onnx's "
        "`load_external_data_for_model`) only to check the data's location, `graph_sha256` hashed the file for the "
        "plan's record, the parser read it, and the report after the build hashed it again (inspect's comparison "
        "with the record), loaded it whole into its graph index and hashed it a third time (the loader's digest "
        "check); after, the location, link, file-type and bounds checks look at the file's metadata "
        "(`graph.checked_external_data`, d84f16a), one hash serves the plan's record, inspect's comparison and the "
        "loader's digest check (`utils.sha256_file` remembers a file by identity and times), the report's index reads "
        "only the constants it asks for (`GraphIndex` without external data), and the parser reads the file.", "",
        "| code | run | s | peak RSS GB | read GB | reads of the data | plan GB |", "|---|---:|---:|---:|---:|---:|---:|",
        *rows, "", f"Wall time after / before (sums over the two runs each, measured interleaved): {ratio:.2f}.", ""])
    print(text)
    if not a.no_doc:
        update_section("large-graphs-build", text)


def sizes(graph: Path) -> str:
    data = external_data_files(graph)
    gb = sum((graph.parent / d).stat().st_size for d in data) / 1e9
    return (f"graph {graph.stat().st_size / 1e6:.2f} MB + {data[0].split('.')[-2][:8]}….data {gb:.2f} GB"
            if data else f"one file, {graph.stat().st_size / 1e9:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-ref", default="b8c1c2a")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--clean", action="store_true", help="remove runs/large_graphs/ afterwards")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--build-reads", action="store_true", help="only section large-graphs-build (see above)")
    ap.add_argument("--reuse", action="store_true", help="--build-reads: keep the W8A8 graph of an earlier run")
    a = ap.parse_args()
    if a.build_reads:
        build_reads(a)
        if a.clean:
            shutil.rmtree(WORK, ignore_errors=True)
        return
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    rows: list[str] = []

    before = worktree(a.before_ref)
    dt, r = cli(before, "export", "--model", MODEL, "--random-weights", "--fp", "--out", WORK / "before" / "fp.onnx",
                check=False)
    err = (r.stderr.strip().splitlines() or ["(none)"])[-1]
    rows.append(f"| float, before ({a.before_ref}) | `export --fp` | {dt:.1f} | exit {r.returncode}: `{err[:120]}` |")

    fp = WORK / "fp" / "vith.onnx"
    dt, _ = cli(ROOT, "export", "--model", MODEL, "--random-weights", "--fp", "--out", fp)
    rows.append(f"| float | `export --fp` | {dt:.1f} | {sizes(fp)} (automatic) |")
    dt, r = cli(ROOT, "check", fp, "--json", check=False)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rules = sorted({v["rule"] for v in rep["violations"] if v["severity"] == "error"})
    rows.append(f"| float | `check` | {dt:.1f} | exit {r.returncode}; error rules: {', '.join(rules)} "
                f"({'no onnx-checker or shape-inference error' if not {'onnx-checker', 'shape-inference'} & set(rules) else 'CHECKER FAILED'}) |")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", ORT_VS_TORCH, MODEL, str(fp)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows.append(f"| float | onnxruntime vs PyTorch, 2 images | {time.perf_counter() - t:.1f} | max abs diff "
                f"{res['max_abs_diff']:.2g} (largest logit {res['max_abs']:.3g}) |")
    shutil.rmtree(fp.parent)

    _, r = cli(ROOT, "calib", "--generator", "noise", "--num", "4", "--size", "224", "--cache-root", WORK / "caches",
               "-q")
    cache = r.stdout.strip().splitlines()[-1]
    dt, _ = cli(ROOT, "quantize", "--model", MODEL, "--random-weights", "--calib", cache, "--method", "rtn",
                "--wbits", "8", "--abits", "8", "--num-samples", "4", "--out", WORK / "w8a8", "-q")
    rows.append(f"| W8A8 rtn | `quantize` (4 noise images) | {dt:.1f} | |")
    q = WORK / "q" / "vith_w8a8.onnx"
    dt, _ = cli(ROOT, "export", "--quantized", WORK / "w8a8", "--out", q, "--external-data")
    rows.append(f"| W8A8 rtn | `export --external-data` | {dt:.1f} | {sizes(q)} |")
    dt, r = cli(ROOT, "check", q, "--json", check=False)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rows.append(f"| W8A8 rtn | `check` | {dt:.1f} | exit {r.returncode}, {rep['errors']} error(s), "
                f"{len(rep['violations']) - rep['errors']} warning(s) |")
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(WORK / "x4.npz", x=rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8), y=np.arange(4))
    dt, r = cli(ROOT, "verify", q, "--quantized", WORK / "w8a8", "--data", WORK / "x4.npz", "--json", check=False)
    v = json.loads(r.stdout.strip().splitlines()[-1])
    rows.append(f"| W8A8 rtn | `verify` (4 images) | {dt:.1f} | exit {r.returncode}: agreement {v['top1_agreement']} %, "
                f"max abs diff {v['max_abs_diff']:.3g}, code mismatch {v['code_mismatch_fraction']:.3g} |")
    if not a.skip_build:
        plan = q.with_suffix(".plan")
        dt, r = cli(ROOT, "build", q, "--out", plan, "--backend", "tensorrt-rtx", "--batch", "1:1:1", check=False)
        if r.returncode:
            rows.append(f"| W8A8 rtn | `build --backend tensorrt-rtx` | {dt:.1f} | exit {r.returncode}: "
                        f"`{(r.stderr.strip().splitlines() or [''])[-1][:160]}` |")
        else:
            rows.append(f"| W8A8 rtn | `build --backend tensorrt-rtx --batch 1:1:1` | {dt:.1f} | plan "
                        f"{plan.stat().st_size / 1e9:.2f} GB |")
            dt, r = cli(ROOT, "inspect", plan, "--json")
            ins = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(f"| W8A8 rtn | `inspect` | {dt:.1f} | int8_mac_fraction {ins['int8_mac_fraction']:.3f}, "
                        f"{ins['handoffs']} hand-offs, {len(ins['layers'])} engine layers |")
    text = "\n".join([
        "## large-graphs: graphs above protobuf's 2 GiB (external data)", "",
        f"`python tools/bench_large_graphs.py{' --skip-build' if a.skip_build else ''}` · {stamp()}", "",
        f"timm `{MODEL}` with random weights (631 M parameters; structure and sizes only), every step through the "
        "CLI in its own process, on this machine's 2 cores. *s*: wall time of the command, start-up included. "
        "`verify`'s max abs diff is end to end: a ViT's softmax, GELU and LayerNorm stay float and round differently "
        "in onnxruntime and PyTorch (README, `verify`); on the same input every integer code matches (code mismatch 0).",
        "",
        "| graph | step | s | result |", "|---|---|---:|---|", *rows, ""])
    print(text)
    if not a.no_doc:
        update_section("large-graphs", text)
    if a.clean:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
