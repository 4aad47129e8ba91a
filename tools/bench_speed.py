"""Wall time of quantize, eval and verify before and after the 2026-11-30 speed-ups, side by side.

    python tools/bench_speed.py                       # against --before-ref fc29eea, 2 rounds
    python tools/bench_speed.py --rounds 3 --before-ref HEAD~5

"before" runs an older commit (`--before-ref`, checked out into an ignored git worktree under runs/), "after"
this checkout. The speed-ups: quantize resumes each unit's input capture where the previous one stopped
instead of re-running the network's prefix (`quant.reconstruct._ResumedCapture`), the CLI keeps freed tensors
in the process (`cli_common.tune_malloc`), verify's onnxruntime sessions take torch's thread count. Every cell
is the wall time of the whole command at `--threads 1` on the same inputs (a real 1,024-image cache of
`cifar10_train_calib.npz`, ResNet-20); cells run interleaved round by round, so both see the same machine.
The outputs must be the same bytes: the weights' sha256 and the eval/verify JSON are compared. Writes
docs/benchmarks.md, section quantize-speed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads import worktree  # noqa: E402
from benchmd import ROOT, stamp, update_section  # noqa: E402

from mixq_onnx.utils import shared_root  # noqa: E402

OUT = ROOT / "runs" / "bench_speed"


def cli(src: Path, *args: str, threads: bool = True) -> tuple[float, str]:
    """One command of the checkout `src`, at one thread (`--threads 1`, or OMP_NUM_THREADS=1 for a command that
    had no --threads then)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MIXQ_MALLOC_TUNE")}
    env["PYTHONPATH"] = str(src)
    if not threads:
        env["OMP_NUM_THREADS"] = "1"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", *args, *(["--threads", "1"] if threads else [])],
                       cwd=src, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed in {src}:\n{r.stderr[-2000:]}")
    return dt, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-ref", default="fc29eea")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=100, help="qdrop iterations per unit")
    ap.add_argument("--note", default="", help="A sentence for the section (e.g. what else ran on the machine).")
    a = ap.parse_args()
    shared = shared_root()
    ck = str(shared / "models" / "resnet20-12fca82f.th")
    test = str(shared / "data" / "cifar10_test_dev.npz")
    before = worktree(a.before_ref)
    OUT.mkdir(parents=True, exist_ok=True)
    _, out = cli(ROOT, "calib", "--generator", "real", "--source", str(shared / "data" / "cifar10_train_calib.npz"),
                 "--num", "1024", "--cache-root", str(OUT / "cache"), "-q")
    cache = out.strip().splitlines()[-1]
    sides = {"before": before, "after": ROOT}
    cells: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], str] = {}
    for _ in range(a.rounds):
        for side, src in sides.items():
            q = OUT / f"q-{side}"
            dt, _ = cli(src, "quantize", "--model", "cifar_resnet20", "--checkpoint", ck, "--calib", cache, "--method",
                        "qdrop", "--preset", "fast", "--iters", str(a.iters), "--wbits", "4", "--abits", "4",
                        "--out", str(q), "--overwrite", "-q")
            cells.setdefault((side, "quantize"), []).append(dt)
            outputs[(side, "quantize")] = hashlib.sha256((q / "weights.safetensors").read_bytes()).hexdigest()
            dt, out = cli(src, "eval", "--quantized", str(q), "--data", test, "--json", "-q")
            cells.setdefault((side, "eval"), []).append(dt)
            outputs[(side, "eval")] = out.strip().splitlines()[-1]
            g = OUT / f"q-{side}.onnx"
            cli(src, "export", "--quantized", str(q), "--out", str(g), threads=False)
            dt, out = cli(src, "verify", str(g), "--quantized", str(q), "--data", test, "--limit", "1000", "--json",
                          "-q")
            cells.setdefault((side, "verify"), []).append(dt)
            rep = json.loads(out.strip().splitlines()[-1])
            outputs[(side, "verify")] = json.dumps({k: rep.get(k) for k in ("top1_agreement", "max_abs_diff",
                                                                              "code_mismatch_fraction")})
    rows = []
    for cmd, what in (("quantize", f"`quantize --method qdrop --preset fast --iters {a.iters}` W4A4, 1,024 images"),
                      ("eval", "`eval --quantized` on the 5,000 test images"),
                      ("verify", "`verify --limit 1000`")):
        b, f = statistics.median(cells[("before", cmd)]), statistics.median(cells[("after", cmd)])
        same = outputs[("before", cmd)] == outputs[("after", cmd)]
        rows.append(f"| {what} | {', '.join(f'{x:.1f}' for x in cells[('before', cmd)])} | "
                    f"{', '.join(f'{x:.1f}' for x in cells[('after', cmd)])} | {f / b:.2f} | {'yes' if same else 'NO'} |")
    body = "\n".join([
        "## quantize-speed: quantize, eval and verify before and after the 2026-11-30 speed-ups",
        "",
        f"`python tools/bench_speed.py --before-ref {a.before_ref} --rounds {a.rounds}` · {stamp()}",
        "",
        f"Wall time in seconds of each whole command at `--threads 1`, ResNet-20 (`../shared`), the two columns "
        f"interleaved round by round: *before* is commit {a.before_ref}, *after* this checkout, which resumes each "
        "reconstruction unit's input capture where the previous unit's stopped (instead of re-running the "
        "network's prefix twice per unit), keeps freed tensors in the process (glibc `mallopt`; "
        "`MIXQ_MALLOC_TUNE=0` turns it off) and gives verify's onnxruntime sessions torch's thread count. "
        "*same output*: the weights' sha256 (quantize) and the JSON report (eval; verify's agreement, max |diff| "
        "and code mismatch) are equal on both sides." + (f" {a.note}" if a.note else ""),
        "",
        "| command | before s | after s | ratio after/before (medians) | same output |",
        "|---|---|---|---:|---|",
        *rows,
    ])
    update_section("quantize-speed", body)
    print(body)


if __name__ == "__main__":
    main()
