"""Thread collapse under load: `quantize` on ResNet-20 alone and beside a competing CPU-bound process.

    python tools/bench_threads.py                    # rtn and qdrop (--iters 100), before and after
    python tools/bench_threads.py --rounds 2 --qdrop-iters 100 --before-ref HEAD~3

"before" runs the thread policy of an older commit (`--before-ref`, checked out into an ignored git
worktree under runs/): torch's default, one intra-op thread per core with libgomp's default wait
policy. "after" is this checkout's default (auto threads that follow the idle cores, passive wait).
Every cell is the wall time of the whole `mixq-onnx quantize` command; cells run interleaved round
by round, so both policies see the same machine. The competing process is one pure-Python busy loop
(one core), started before the command and stopped after it. Writes docs/benchmarks.md, section threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

from mixq_onnx.utils import shared_root  # noqa: E402

BUSY = "import time\nt = time.time() + 3600\nwhile time.time() < t:\n    pass\n"


def worktree(ref: str) -> Path:
    """An older checkout of the package, for the 'before' column (never the user's working tree)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = ROOT / "runs" / "bench_threads" / f"before-{sha}"
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run_quantize(src: Path, calib: Path, method: str, iters: int, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    args = [sys.executable, "-m", "mixq_onnx.cli", "quantize", "--model", "cifar_resnet20", "--checkpoint",
            str(shared_root() / "models" / "resnet20-12fca82f.th"), "--calib", str(calib), "--method", method,
            "--wbits", "4", "--abits", "4", "--num-samples", "256", "--out", str(out), "-q"]
    if method != "rtn":
        args += ["--iters", str(iters)]
    if (src / "mixq_onnx" / "threads.py").is_file():
        args.append("--overwrite")
    elif out.exists():
        import shutil

        shutil.rmtree(out)
    t = time.perf_counter()
    r = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"quantize failed ({src}): {r.stderr[-800:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--qdrop-iters", type=int, default=100)
    ap.add_argument("--before-ref", default="96c37a0", help="commit with the old thread policy")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    work = ROOT / "runs" / "bench_threads"
    work.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", "calib", "--generator", "real", "--source",
                        str(shared_root() / "data" / "cifar10_train_calib.npz"), "--num", "256", "--cache-root",
                        str(work / "cache"), "-q"], cwd=ROOT, capture_output=True, text=True, check=True)
    calib = Path(r.stdout.strip().splitlines()[-1])
    if not calib.is_absolute():
        calib = ROOT / calib
    srcs = {"before": worktree(a.before_ref), "after": ROOT}
    times: dict[tuple[str, str, str], list[float]] = {}
    for rnd in range(a.rounds):
        for method in ("rtn", "qdrop"):
            for load in ("alone", "busy"):
                for policy, src in srcs.items():
                    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
                    try:
                        if hog:
                            time.sleep(1.0)  # let the hog take its core
                        dt = run_quantize(src, calib, method, a.qdrop_iters, work / f"q-{policy}-{method}")
                    finally:
                        if hog:
                            hog.kill()
                            hog.wait()
                    times.setdefault((policy, method, load), []).append(dt)
                    print(f"round {rnd} {method:5s} {load:5s} {policy:6s} {dt:7.1f} s", flush=True)
    rows = []
    for method in ("rtn", "qdrop"):
        for policy in srcs:
            alone = statistics.median(times[(policy, method, "alone")])
            busy = statistics.median(times[(policy, method, "busy")])
            rows.append({"method": method, "policy": policy, "alone_s": round(alone, 1), "busy_s": round(busy, 1),
                         "slowdown": round(busy / alone, 2)})
    print(json.dumps(rows, indent=1))
    if a.no_write:
        return
    lines = [
        "## threads: `quantize` alone and beside a competing CPU-bound process (issue 11)",
        "",
        f"`python tools/bench_threads.py --rounds {a.rounds} --qdrop-iters {a.qdrop_iters} --before-ref {a.before_ref}` · "
        f"{stamp()}",
        "",
        "ResNet-20 (`../shared`), W4A4, 256 real calibration images; wall time of the whole `mixq-onnx quantize` "
        f"command (torch import and model load included), median of {a.rounds} interleaved rounds. qdrop runs "
        f"`--iters {a.qdrop_iters}` per unit to bound the time of the collapsed cells. *busy*: one pure-Python busy "
        "loop holds one core for the whole command. *before*: commit "
        f"`{a.before_ref}` (torch's default of one thread per core, libgomp's default wait policy); *after*: "
        "this commit's default (threads follow the idle cores, re-measured every 2 s; libgomp's default wait policy, since PASSIVE made qdrop 1.7x slower alone).",
        "",
        "| method | policy | alone s | busy s | slowdown |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['method']} | {r['policy']} | {r['alone_s']} | {r['busy_s']} | {r['slowdown']}x |" for r in rows]
    update_section("threads", "\n".join(lines))


if __name__ == "__main__":
    main()
