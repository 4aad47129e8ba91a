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
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qat import LP, SCHEDULE, TEST  # noqa: E402
from bench_robust import ROOT, model_args, split_data  # noqa: E402
from bench_robust import cli as run_cli  # noqa: E402
from benchmd import stamp, update_section  # noqa: E402

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


def cli(*args: object) -> str:
    return run_cli(*args, threads=THREADS)


def sweep(out: Path, device: str, jobs: int, deadline: float, only: list[str] | None = None,
          extra: list[str] | None = None, log: Path | None = None, seeds: tuple[int, ...] | None = None) -> None:
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

    work = [(t, g, a, s) for s in (seeds or SEEDS) for t, g, a in CANDIDATES if only is None or t in only]
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


#: What the lent GPU ran on 2026-11-29 (five calls; the first three's logs are in runs/sweep_qat_device/h200-*.log)
DEVICE_RUNS = """Machine: one NVIDIA H200 lent for this session (16 CPU cores; torch 2.11.0+cu130, timm 1.0.29, onnx
1.23.1, onnxruntime 1.30.0, Python 3.12), 15 minutes of device time in all (775 s used). Its CUDA checks
(`tests/test_device.py`, `tests/test_qat.py`, `tests/test_robust.py`, `tests/test_quantize.py` there, where
`--device` defaults to cuda):

| call | what ran | result | what it found, what changed |
|---|---|---|---|
| 1 | tests/test_device.py | 9 passed, 5 failed | `quantize`'s weight-scale search built its running minimum on the CPU (every CUDA path through `init_scales` failed: `quantize --device cuda` had never run on a GPU); a robustify fine-tune on CUDA differed from the CPU's by 35 % of a tensor's largest value: cuDNN's TF32 convolutions. Fixed: the search on the weight's device; `utils.full_fp32` around training, `qat.train` and `quantize` |
| 2 | the CUDA qat tests | 4 passed, 1 failed | NIPQ (official and `-lp` ranges) trains on CUDA, meets its budget and saves; LSQ on CUDA against the CPU: 99.78 % of the integer codes agree and the largest learned step differs by 3.4 % (the test had asked 0.1 %; it now asks 10 % and keeps the codes at 99 %) |
| 3 | the sweep below, then the other tests | sweep 24 runs; 8 of 9 device tests and 56 of 57 qat / robust / quantize tests passed | a robustify fine-tune (SatNL, ASAM) now matches the CPU within 0.1 %; `qat` end to end on CUDA (export, check, verify exact) passes; QDrop's drop mask took quantize's CPU generator for a CUDA tensor. Fixed: a CPU generator draws the mask on the CPU and copies it over (the same drops on either device) |
| 4, 5 | after the fixes: the two tests that had failed, then all of tests/test_device.py and tests/test_quantize.py | 2 of 2, then 30 of 30 passed (every CUDA case of test_device; test_quantize's CLI runs `quantize` on cuda, its default there) | `quantize --device cuda` (QDrop) against the CPU and LSQ `qat` at the 10 % step bar both pass |

With `--device cpu` (and on any machine without a GPU) every result is bit for bit what it was before
`--device` existed: `qat` (NIPQ `-lp`, LSQ) and `quantize` (QDrop W4A4) weights hashed identical before and
after the change."""


MAIN_ROWS = ("lsq-w3a3", "nipq-3", "nipq-3-lp", "lsq-w4a4", "nipq-4", "nipq-4-lp")


def heldout_main_rows() -> str:
    """Held-out top-1 of section qat's CPU rows (runs/bench_qat, seeds 0-2), the yardstick of the follow-up."""
    _, ho = split_data()
    cache = ROOT / "runs" / "sweep_qat_device" / "heldout_main.json"
    got = json.loads(cache.read_text()) if cache.exists() else {}
    lines = ["| section qat row (CPU) | held-out top-1 (seeds 0 / 1 / 2) | held-out mean |", "|---|---|---:|"]
    for row in MAIN_ROWS:
        vals = []
        for sd in SEEDS:
            key = f"resnet20-{row}" + (f"-s{sd}" if sd else "")
            folder = ROOT / "runs" / "bench_qat" / key
            if key not in got and (folder / "quant.json").exists():
                got[key] = json.loads(cli("eval", "--quantized", folder, "--data", ho, "--json"))["top1"]
            if key in got:
                vals.append(got[key])
        if vals:
            lines.append(f"| {row} | {' / '.join(format(v, '.1f') for v in vals)} | {sum(vals) / len(vals):.2f} |")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(got, indent=2) + "\n")
    return "\n".join(lines)


VERDICT = """The rule chooses neither. At 3 bits `--budget-rate 0.2` has the lowest held-out mean of the three
(84.73 against LSQ W3A3's 85.80 and the `-lp` rows' 85.60); at 4 bits `--budget-rate 0.03` holds out 88.67
against LSQ W4A4's 90.67. Its test mean at 3 bits, 82.23, would be +1.26 pp over LSQ W3A3's 80.97 (seeds 0-2 of section
qat): choosing it for that would be choosing on the test set, so the bar stays unmet and section qat keeps
its rows. The 500 held-out images cannot separate rows this close: they rank the `-lp` rows 0.2 below LSQ at
3 bits, where the 5,000 test images put them 0.77 above (seeds 0-2)."""


KD_NOTE = """The KD rows (labelled data, CE plus KD from the float model at T = 4) hold out lower than CE alone on
either device, because the teacher is weaker than what the students learn: the float ResNet-20 scores
81.02 % on the test images, CE-trained QAT rows 84-85 %. Re-run on this CPU, the same rows land near the
GPU's (LSQ W4A4 84.4 held out against the GPU's 83.4; NIPQ@4 87.0 against 84.4). One GPU result stays
unexplained: LSQ W3A3 with KD collapsed there (held-out 33.6 %, seed 0), and on this CPU it does not, over
three seeds; the device time ran out before a second GPU seed could say whether it is that seed's instability
(KD's T² = 16 scales its gradient) or something the GPU does differently:"""


def write_doc(gpu: Path, cpu: Path | None, kd: Path | None = None) -> None:
    """docs/benchmarks.md, section "gpu": the device checks, the GPU sweep and its CPU follow-ups."""
    follow = report(cpu) if cpu is not None and cpu.exists() else "(not run)"
    kd_part = f"{KD_NOTE}\n\n{report(kd)}" if kd is not None and kd.exists() else ""
    update_section("gpu", f"""## gpu: CUDA paths on a lent H200, and a wider NIPQ sweep (issue 14)

`python tools/sweep_qat_device.py --device cuda --jobs 12 --threads 1 --deadline 250` on the lent GPU;
this section by `python tools/sweep_qat_device.py --report {gpu.resolve().relative_to(ROOT)} --doc --follow-up {cpu.resolve().relative_to(ROOT) if cpu else "-"}{f" --kd-check {kd.resolve().relative_to(ROOT)}" if kd else ""}` · {stamp()}

{DEVICE_RUNS}

The sweep: ResNet-20, labelled, the schedule of section qat ({", ".join(f"{k} {v}" for k, v in SCHEDULE.items())}),
12 runs side by side on the one GPU, each `qat` then two `eval`s (CPU, 1 thread). A run took about 115 s
there (train s below: wall time of each `qat` with eleven others beside it), so the 250 s deadline left
most candidates one seed. Chosen by held-out top-1 (500 images) only; the test mean is shown for the
record. KD rows add `--loss kd --kd-weight 1` to both methods.

{report(gpu)}

Reading it: no NIPQ candidate clears LSQ on the held-out images by the bars' margins (+1.0 at 3 bits,
+0.3 at 4), and with one or two seeds the differences are within one seed's spread (official NIPQ@3's two
seeds: 35.0 and 84.0). The two best-looking single seeds were re-run over three seeds on this CPU
(`--device cpu --only nipq-4-lp-rate0.03,nipq-3-lp-rate0.2`), beside the held-out top-1 of section qat's
rows (same images, same CPU):

{follow}

{heldout_main_rows()}

{VERDICT}

{kd_part}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which no new run starts")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_qat_device")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of a sweep.jsonl")
    ap.add_argument("--doc", action="store_true", help="with --report: write docs/benchmarks.md section gpu")
    ap.add_argument("--follow-up", type=Path, default=None, help="with --doc: the CPU follow-up's sweep.jsonl")
    ap.add_argument("--kd-check", type=Path, default=None, help="with --doc: the CPU re-run of the KD row")
    ap.add_argument("--log", type=Path, default=None, help="where sweep.jsonl goes [default: OUT/sweep.jsonl]")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each run [2]")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--only", default=None, help="comma-separated candidate tags (default: all)")
    ap.add_argument("--extra", default="", help="qat arguments added to every run (a smoke test: '--limit 256')")
    a = ap.parse_args()
    if a.report is None:
        global THREADS
        THREADS = a.threads
        sweep(a.out, a.device, a.jobs, a.deadline, a.only.split(",") if a.only else None, a.extra.split(), a.log,
              tuple(int(x) for x in a.seeds.split(",")) if a.seeds else None)
    if a.doc and a.report is not None:
        write_doc(a.report, a.follow_up, a.kd_check)
    print(report(a.report or a.log or a.out / "sweep.jsonl"))


if __name__ == "__main__":
    main()
