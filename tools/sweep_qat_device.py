"""Issue 14's NIPQ candidates on a GPU: many `qat` runs side by side, chosen on the 500 held-out images.

A CPU here trains one ResNet-20 row in about 215 s; a lent GPU machine trains several at once, so a wider set
of NIPQ settings, each over three seeds, fits in one device call. Every candidate trains on the same 4,500
images with the same schedule as `tools/bench_qat.py` (its SCHEDULE) and is evaluated on the 500 held-out
train images (for choosing) and on the 5,000 test images (reported for the choice only: the rule below picks
by held-out mean and is fixed before the run). Results go to OUT/sweep.jsonl as they finish (one JSON object
per run); a deadline stops new runs so the call ends inside its limit.

    MIXQ_SHARED=.gpu/shared python tools/sweep_qat_device.py --device cuda --jobs 8 --deadline 420 --out DIR
    python tools/sweep_qat_device.py --report DIR/sweep.jsonl     # the table, held-out choice per target
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qat import LP, SCHEDULE, TEST  # noqa: E402
from bench_robust import ROOT, model_args, split_data  # noqa: E402

LSQ3 = ["--method", "lsq", "--wbits", 3, "--abits", 3]
LSQ4 = ["--method", "lsq", "--wbits", 4, "--abits", 4]
N3, N4 = ["--method", "nipq", "--target-bits", 3], ["--method", "nipq", "--target-bits", 4]
KD = ["--loss", "kd", "--kd-weight", 1]
#: (tag, target it competes at, qat args); the order is the priority when the deadline cuts the sweep short
CANDIDATES = [
    ("lsq-w3a3", 3, LSQ3), ("lsq-w4a4", 4, LSQ4),
    ("nipq-3", 3, N3), ("nipq-3-lp", 3, [*N3, *LP]), ("nipq-4", 4, N4), ("nipq-4-lp", 4, [*N4, *LP]),
    ("nipq-3-lp-rate0.05", 3, [*N3, "--range-init", "lp", "--budget-rate", 0.05]),
    ("nipq-3-lp-rate0.2", 3, [*N3, "--range-init", "lp", "--budget-rate", 0.2]),
    ("nipq-3-lp-qlr0.01", 3, [*N3, *LP, "--qlr", 0.01]),
    ("nipq-3-lp-qlr0.05", 3, [*N3, *LP, "--qlr", 0.05]),
    ("nipq-3-lp-uniform", 3, [*N3, *LP, "--noise", "uniform"]),
    ("nipq-4-qlr0.01", 4, [*N4, "--qlr", 0.01]),
    ("nipq-4-uniform", 4, [*N4, "--noise", "uniform"]),
    ("nipq-4-budget0.3", 4, [*N4, "--budget-weight", 0.3]),
    ("nipq-4-lp-rate0.03", 4, [*N4, "--range-init", "lp", "--budget-rate", 0.03]),
    ("lsq-w3a3-kd", 3, [*LSQ3, *KD]), ("nipq-3-lp-kd", 3, [*N3, *LP, *KD]),
    ("lsq-w4a4-kd", 4, [*LSQ4, *KD]), ("nipq-4-kd", 4, [*N4, *KD]),
]
SEEDS = (0, 1, 2)
THREADS = 2  # CPU threads per run (--threads)


def cli(*args: object, threads: int | None = None) -> str:
    threads = threads or THREADS
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mixq_onnx.cli", *map(str, args), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def sweep(out: Path, device: str, jobs: int, deadline: float, only: list[str] | None = None,
          extra: list[str] | None = None, log: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tr, ho = split_data()
    sched = [x for k, v in SCHEDULE.items() for x in (f"--{k}", v)]
    t_end = time.time() + deadline
    lock = threading.Lock()
    log = log or out / "sweep.jsonl"

    def one(tag: str, target: int, args: list, seed: int) -> None:
        if time.time() > t_end:
            return
        folder = out / "runs" / f"{tag}-s{seed}"
        rec: dict = {"tag": tag, "target": target, "seed": seed, "args": list(map(str, args)), "device": device}
        t0 = time.time()
        try:
            cli("qat", *model_args("resnet20"), "--data", tr, *sched, *args, "--seed", seed, "--device", device,
                *(extra or []), "--out", folder, "-q")
            rec["train_s"] = round(time.time() - t0, 1)
            rec["holdout"] = json.loads(cli("eval", "--quantized", folder, "--data", ho, "--json"))["top1"]
            rec["test"] = json.loads(cli("eval", "--quantized", folder, "--data", TEST, "--json"))["top1"]
            rec["achieved"] = json.loads((folder / "qat.json").read_text())["achieved"]
        except RuntimeError as e:
            rec["error"] = str(e)[-600:]
        with lock, log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec)[:300], flush=True)

    work = [(t, g, a, s) for s in SEEDS for t, g, a in CANDIDATES if only is None or t in only]
    with ThreadPoolExecutor(jobs) as ex:
        for f in [ex.submit(one, *w) for w in work]:
            f.result()


def report(path: Path) -> str:
    """Per candidate: seeds done, held-out and test means; per target the held-out choice among the NIPQ
    candidates with all seeds done, against the LSQ row of the same loss."""
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    by: dict[str, list[dict]] = {}
    for r in recs:
        if "error" not in r:
            by.setdefault(r["tag"], []).append(r)
    order = [t for t, _, _ in CANDIDATES if t in by]

    def mean(tag: str, key: str) -> float:
        return sum(r[key] for r in by[tag]) / len(by[tag])

    lines = ["| candidate | seeds | held-out top-1 (per seed) | held-out mean | test mean | W / A bits | train s |",
             "|---|---:|---|---:|---:|---|---:|"]
    for t in order:
        rs = sorted(by[t], key=lambda r: r["seed"])
        ach = rs[0]["achieved"]
        lines.append(f"| {t} | {len(rs)} | {' / '.join(format(r['holdout'], '.1f') for r in rs)} | {mean(t, 'holdout'):.2f} | "
                     f"{mean(t, 'test'):.2f} | {ach['weight_bits']:.3f} / {ach['act_bits']:.3f} | "
                     f"{sum(r['train_s'] for r in rs) / len(rs):.0f} |")
    errors = [f"- {r['tag']} seed {r['seed']}: {r['error'].splitlines()[-1]}" for r in recs if "error" in r]
    picks = []
    for target in (3, 4):
        full = [t for t in order if t.startswith("nipq") and len(by[t]) == len(SEEDS) and f"-{target}" in t[4:6]]
        if not full:
            continue
        best = max(full, key=lambda t: mean(t, "holdout"))
        base = f"lsq-w{target}a{target}" + ("-kd" if best.endswith("-kd") else "")
        if base in by and len(by[base]) == len(SEEDS):
            picks.append(f"- {target} bits: held-out choice `{best}` {mean(best, 'holdout'):.2f} vs `{base}` "
                         f"{mean(base, 'holdout'):.2f} held-out; on the test set {mean(best, 'test'):.2f} vs "
                         f"{mean(base, 'test'):.2f} ({mean(best, 'test') - mean(base, 'test'):+.2f} pp)")
    return "\n".join(lines + ([""] + picks if picks else []) + ([""] + errors if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which no new run starts")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_qat_device")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of a sweep.jsonl")
    ap.add_argument("--log", type=Path, default=None, help="where sweep.jsonl goes [default: OUT/sweep.jsonl]")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each run [2]")
    ap.add_argument("--only", default=None, help="comma-separated candidate tags (default: all)")
    ap.add_argument("--extra", default="", help="qat arguments added to every run (a smoke test: '--limit 256')")
    a = ap.parse_args()
    if a.report is None:
        global THREADS
        THREADS = a.threads
        sweep(a.out, a.device, a.jobs, a.deadline, a.only.split(",") if a.only else None, a.extra.split(), a.log)
    print(report(a.report or a.log or a.out / "sweep.jsonl"))


if __name__ == "__main__":
    main()
