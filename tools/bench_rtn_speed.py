"""`quantize --method rtn` on large layers and large feature maps, before and after the 2026-12-02 speed-ups.

    python tools/bench_rtn_speed.py                   # against --before-ref ab90953, 2 rounds
    python tools/bench_rtn_speed.py --rounds 3

The speed-ups: the Lp clipping search of weight scales (`quant.quantizer.search_weight_scale`) walks a layer's
channels a cache-sized chunk at a time in reused buffers instead of allocating full-size temporaries for each
of its 80 candidates, and the activation observation draws its 65,536-value sample from a tensor of more than
4 M values (`quantizer.PERMUTE_LIMIT`) with `randint` instead of a permutation of the whole tensor
(`ActQuantizer.observe`; smaller tensors are sampled as before). "before" runs an older commit (`--before-ref`, checked
out into an ignored git worktree under runs/), "after" this checkout; cells run interleaved round by round at one
thread, in a process each, so both see the same machine. Cases: timm `vgg11_bn` at 64 px on 4 images (its 7x7
pre-logits conv holds 102 M weights; the timm survey's slowest row) and timm `resnet50` at 224 px on 128 images
(early feature maps of 128x256x56x56 values), random weights. The weight scales must be the same bytes; the
activation scales of tensors above the limit come from another sample of the same values, so the table gives
their largest relative change.
Writes docs/benchmarks.md, section rtn-speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads import worktree  # noqa: E402
from benchmd import ROOT, stamp, update_section  # noqa: E402

CASES = (("vgg11_bn", 64, 4), ("resnet50", 224, 128))

CHILD = """
import hashlib, json, sys, time, torch
from mixq_onnx.models import load_model
from mixq_onnx.quant import QuantConfig, quantize
torch.set_num_threads(1)
spec, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_model(spec, random_init=True, input_size=size)
calib = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", num_samples=n), calib, progress=False)
dt = time.perf_counter() - t
w = hashlib.sha256()
acts = {}
for name, m in q.named_modules():
    wq = getattr(m, "weight_quantizer", None)
    if wq is not None:
        w.update(name.encode()); w.update(wq.scale.detach().numpy().tobytes())
    iq = getattr(m, "input_quantizer", None)
    if iq is not None:
        acts[iq.name] = float(iq.scale)
print(json.dumps({"seconds": dt, "weights": w.hexdigest(), "acts": acts}))
"""


def one(src: Path, spec: str, size: int, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    r = subprocess.run([sys.executable, "-c", CHILD, spec, str(size), str(n)], cwd=src, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{spec} failed in {src}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-ref", default="ab90953")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    ap.add_argument("--note", default="", help="A sentence for the section (e.g. what else ran on the machine).")
    a = ap.parse_args()
    before = worktree(a.before_ref)
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for spec, size, n in CASES:
            for tag, src in (("before", before), ("after", ROOT)) if r % 2 == 0 else (("after", ROOT), ("before", before)):
                res = one(src, spec, size, n)
                runs.setdefault((spec, tag), []).append(res)
                print(f"round {r} {spec} {tag}: {res['seconds']:.1f} s", flush=True)
    lines = [
        "## rtn-speed: round to nearest on large layers and feature maps (2026-12-02 speed-ups)", "",
        f"`python tools/bench_rtn_speed.py --before-ref {a.before_ref} --rounds {a.rounds}` · {stamp()}", "",
        "`quantize(..., QuantConfig(wbits=8, abits=8, method=\"rtn\"))` timed inside one process per cell, one thread, "
        "before (commit " + a.before_ref + ") and after, cells interleaved round by round. The chunked Lp search "
        "of the weight scales, and the activation sample of a tensor above 4 M values drawn with randint instead "
        "of a whole-tensor permutation (see the script's docstring)." + (f" {a.note}" if a.note else ""), "",
        "| model | input | images | before s (median) | after s (median) | after / before | weight scales | "
        "act scales: largest relative change |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for spec, size, n in CASES:
        b, f = runs[(spec, "before")], runs[(spec, "after")]
        tb, tf = statistics.median(x["seconds"] for x in b), statistics.median(x["seconds"] for x in f)
        same = "same bytes" if {x["weights"] for x in b} == {x["weights"] for x in f} and len({x["weights"] for x in b}) == 1 \
            else "DIFFER"
        rel = max(abs(f[0]["acts"][k] - v) / v for k, v in b[0]["acts"].items())
        lines.append(f"| {spec} | {size} | {n} | {tb:.1f} | {tf:.1f} | {tf / tb:.2f} | {same} | {rel:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_doc:
        update_section("rtn-speed", text)


if __name__ == "__main__":
    main()
