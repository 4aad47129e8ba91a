"""Issue 15: mixq-onnx against other INT8 PTQ tools, on the same models, images and engine builder.

Every tool gets the same 1,024 calibration images (the project's `calib --generator real --num 1024` cache of
cifar10_train_calib.npz, exported as an npz for the peers) and is judged on the ONNX graph it exports:
top-1 on all 5,000 images of cifar10_test_dev.npz through onnxruntime with graph optimisations off, agreement
with the float graph, Q/DQ node count, file size, and the TensorRT-RTX engine built from it on this CPU (engine
layers, int8 MAC fraction, reformat / requantize / float hand-off layers from the builder's layer information).

Peers run as subprocesses in their own virtual environments (created here, under runs/peers/venvs/), each
through a small driver in tools/peers/:
  ort-{minmax,entropy,percentile}  onnxruntime quantize_static (QDQ, symmetric per-channel weights)
  modelopt-onnx                    python -m modelopt.onnx.quantization --quantize_mode int8 (default calibrator)
  modelopt-torch                   modelopt.torch.quantization mtq.quantize(INT8_DEFAULT_CFG) -> ONNX
The reference QDrop code (wimh966/QDrop, a checkout under runs/peers/QDrop) runs on ResNet-20 W4A4/W2A4 with
the same images and iterations per block as mixq-onnx's qdrop fast preset, interleaved with mixq-onnx.

Resumable: each row's result is a json under runs/peers/results/; finished rows are skipped (--redo reruns).

    python tools/bench_peers.py --quick --threads 1            # ResNet-20: every peer, mixq rtn W8A8 + qdrop W4A4
    python tools/bench_peers.py --models resnet20 --only ref   # the QDrop reference comparison
    python tools/bench_peers.py --threads 1                    # everything (hours on 2 cores)
    python tools/bench_peers.py --render                       # rewrite docs/benchmarks.md + docs/peers.png only
    python tools/bench_peers.py --engines --threads 1          # engine structure of the W8A8 graphs only
                                                               # (section "peers-engines"; the table untouched)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import DOC, ROOT, stamp, update_section  # noqa: E402

SHARED = Path(os.environ.get("MIXQ_SHARED", ROOT.parent / "shared"))
WORK = ROOT / "runs" / "peers"
RESULTS = WORK / "results"
DRAWS = RESULTS / "draws"  # the calibration draws' rows (not the table's)
VENVS = WORK / "venvs"
QDROP_SRC = WORK / "QDrop"
QDROP_URL = "https://github.com/wimh966/QDrop"
DRIVERS = Path(__file__).resolve().parent / "peers"
CALIB_NPZ = SHARED / "data" / "cifar10_train_calib.npz"
TEST_NPZ = SHARED / "data" / "cifar10_test_dev.npz"
CACHE_ROOT = ROOT / "calib_cache"
N_CALIB = 1024
FAST_ITERS = 400  # mixq-onnx's qdrop fast preset: iterations per unit (block)

# name: (model spec, checkpoint under ../shared or None = random weights, real accuracy?)
MODELS: dict[str, tuple[str, str | None, bool]] = {
    "resnet20": ("cifar_resnet20", "models/resnet20-12fca82f.th", True),
    "resnet56": ("cifar_resnet56", "models/resnet56-4bfd9763.th", True),
    "resnet8": ("mlperf_tiny_resnet8", "models/mlperf-tiny-resnet8_cifar10_state_dict.pt", True),
    "resnet18": ("resnet18", None, False),  # timm, random weights: engine structure only
    "mobilenetv2_100": ("mobilenetv2_100", None, False),
}
# virtual environments: packages, and whether they see the system's site-packages (torch is 2+ GB: reused)
ENVS: dict[str, tuple[list[str], bool]] = {
    "ort": (["onnxruntime", "onnx", "numpy", "sympy"], False),
    "modelopt": (["nvidia-modelopt[onnx]"], True),
    "qdrop": (["easydict", "pyyaml"], True),
}
GROUPS = ("mixq", "ort", "modelopt", "ref")
# each model's classifier: the layer ModelOpt's ONNX PTQ leaves float, which `quantize --float-layers` can leave
# float too (rows "...-float-classifier": the same trade, measured; not counted in the goals)
CLASSIFIER = {"resnet20": "linear", "resnet56": "linear", "resnet8": "fc", "resnet18": "fc",
              "mobilenetv2_100": "classifier"}
THREADS = 1


# --------------------------------------------------------------------------- rows
def rows(models: list[str], only: str = "all", quick: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in models:
        real = MODELS[m][2]

        def add(group: str, tool: str, variant: str, w: int = 8, a: int = 8, m: str = m, **kw: Any) -> None:
            out.append({"id": f"{m}-{tool}-{variant}", "model": m, "group": group, "tool": tool, "variant": variant,
                        "wbits": w, "abits": a, **kw})
        add("mixq", "mixq", "rtn-w8a8", method="rtn")
        if not quick:
            add("mixq", "mixq", "rtn-w8a8-float-classifier", method="rtn", float_layers=CLASSIFIER[m])
            if m == "resnet20":
                add("mixq", "mixq", "qdrop-w8a8-float-classifier", method="qdrop", float_layers=CLASSIFIER[m])
        if real:
            for w, a in ((8, 8), (4, 8), (4, 4), (2, 4)):
                if quick and (w, a) != (4, 4):
                    continue
                add("mixq", "mixq", f"qdrop-w{w}a{a}", w, a, method="qdrop")
        # random-weight models (224 px) measure engine structure only, which the calibrator does not change:
        # max calibration there (ORT's histogram calibrators keep every activation of all 1,024 images in memory,
        # about 20 GB at 224 px)
        for cal in ("minmax", "entropy", "percentile") if real else ("minmax",):
            add("ort", "ort", cal, calibrator=cal)
        # the same with float biases: ORT's default INT32 bias DQ is not parsed by TensorRT(-RTX)
        add("ort", "ort", "minmax-float-bias", calibrator="minmax", float_bias=True)
        if real:
            add("modelopt", "modelopt-onnx", "int8")
        else:
            add("modelopt", "modelopt-onnx", "int8-max", calibration_method="max")
        add("modelopt", "modelopt-torch", "int8")
        if m == "resnet20" and not quick:  # the reference comparison, interleaved: ref, mixq, ref, mixq
            for w, a in ((4, 4), (2, 4)):
                add("ref", "qdrop-ref", f"w{w}a{a}", w, a)
                add("ref", "mixq", f"qdrop-w{w}a{a}-asym-pt", w, a, method="qdrop", asymmetric=True)
    if only != "all":
        keep = set(only.split(","))
        out = [r for r in out if r["group"] in keep or (r["tool"] in keep and r["tool"] not in GROUPS)]
    return out


ENGINES = RESULTS / "engines"  # --engines rows (not the table's)
# ResNet-8's engine rows as measured on the AveragePool export, kept for the before/after note (not re-run)
BEFORE_GLOBAL_MEAN = WORK / "before-global-mean"


# the table's W8A8 rows whose engines --engines re-makes
ENGINE_VARIANTS = {("mixq", "rtn-w8a8"), ("mixq", "rtn-w8a8-float-classifier"), ("ort", "minmax-float-bias"),
                   ("modelopt-onnx", "int8"), ("modelopt-onnx", "int8-max"), ("modelopt-torch", "int8")}


def engine_rows(models: list[str]) -> list[dict[str, Any]]:
    """The W8A8 graphs whose engines the goal "no more layers or hand-offs than any peer" compares (the table's
    rows of `ENGINE_VARIANTS`, under ids of their own): mixq-onnx rtn (the INT8 classifier, the default, and the
    float classifier), onnxruntime minmax with float biases (the one onnxruntime graph TensorRT parses), ModelOpt
    ONNX and ModelOpt PyTorch; the slow ModelOpt PyTorch rows after every model's others."""
    sel = [{**r, "id": f"{r['model']}-engines-{r['tool']}-{r['variant']}"} for r in rows(models)
           if (r["tool"], r["variant"]) in ENGINE_VARIANTS]
    return sorted(sel, key=lambda r: r["tool"] == "modelopt-torch")  # stable: the table's order otherwise


def render_engines(rows_: list[dict[str, Any]], command: str) -> str:
    """Section "peers-engines": each W8A8 graph's engine, hand-offs as `inspect` counts them now, and the
    engine goal per mixq-onnx layout."""
    lines = ["## peers-engines: W8A8 engines under inspect's hand-off count since 2026-11-30 (issue 15)", "",
             f"`{command}` · {stamp()}", "",
             "The engines of the peers table's W8A8 graphs, re-made and re-built with the same tools, images and "
             "builder settings (`--batch 1:8:32`, TensorRT-RTX on this CPU), and counted by `inspect` as it counts "
             "since 2026-11-30: a float hand-off is a "
             "tensor that one non-compute kernel passes to another in float; the input of a compute layer that the "
             "graph leaves float (a float classifier) is that layer's precision (counted in int8 MAC and the float "
             "compute nodes), not a conversion (until then `inspect` also counted that input: one float hand-off more "
             "in every float-classifier row and every ModelOpt ONNX row). These rows are the table's W8A8 graphs "
             "made on their own (`--engines`, minutes instead of the table's hours), so that the engine goal can be "
             "re-measured after a change to the exporter or to `inspect`; the table above was re-made with the same "
             "code on 2026-11-30 and agrees with them. Top-1: all 5,000 test images, onnxruntime, "
             "optimisations off (real checkpoints only).", "",
             "| model | tool / setting | top-1 % | engine layers | int8 MAC | reformat / requant / float hand-offs "
             "| hand-offs | float compute nodes |", "|---|---|---:|---:|---:|---|---:|---|"]
    ok = [r for r in rows_ if r.get("status") == "ok" and r.get("engine_layers")]
    for r in rows_:
        ho = r.get("handoffs") or {}
        err = r.get("error") or r.get("engine_error")
        lines.append(f"| {r['model']} | {label(r)} | {_f(r.get('top1'))} | {r.get('engine_layers', '–')} | "
                     f"{_f(r.get('int8_mac_fraction'), '.3f')} | "
                     + (f"{ho.get('reformat', 0)} / {ho.get('requantize', 0)} / {ho.get('float', 0)}" if ho else "–")
                     + f" | {total_handoffs(r) if ho else '–'} | "
                     + (", ".join(r.get("float_compute_nodes") or []) or "–") + (f" ({err})" if err else "") + " |")
    lines += ["", "The engine goal (no more engine layers and no more hand-offs than any peer), per mixq-onnx "
              "layout, against every peer row above whose engine built and runs at least 99 % of its MACs in "
              "INT8:", ""]
    for m in dict.fromkeys(r["model"] for r in rows_):
        peers = [r for r in ok if r["model"] == m and r["tool"] != "mixq" and r.get("int8_mac_fraction", 0) >= 0.99]
        for r in (r for r in ok if r["model"] == m and r["tool"] == "mixq"):
            if not peers:
                lines.append(f"- {m}, {label(r)}: no peer engine to compare with")
                continue
            worse = [f"{label(p)} ({p['engine_layers']} layers, {total_handoffs(p)} hand-offs)" for p in peers
                     if p["engine_layers"] < r["engine_layers"] or total_handoffs(p) < total_handoffs(r)]
            verdict = "met" if not worse else "missed: fewer layers or hand-offs in " + "; ".join(worse)
            lines.append(f"- {m}, {label(r)}: {r['engine_layers']} layers, {total_handoffs(r)} hand-offs; "
                         f"{verdict}")
    before = {p.stem: json.loads(p.read_text()) for p in sorted(BEFORE_GLOBAL_MEAN.glob("*.json"))}
    r8 = [r for r in ok if r["model"] == "resnet8" and r["id"] in before]
    if r8:
        lines += ["", "ResNet-8 pools with `avg_pool2d(x, 8)` over its whole 8x8 map. Exported as an AveragePool (until "
                  "commit cf3005a), TensorRT-RTX ran it as a layer of its own, which in front of a float "
                  "classifier read float (one hand-off; ModelOpt ONNX's graph too), and neither a Q/DQ in front of "
                  "the pool nor the pool between Q/DQ pairs removed it (hand-rewritten graphs: 28 layers and 1 "
                  "hand-off, 29 and 1). The exporter now writes a whole-window, unpadded AveragePool as ReduceMean "
                  "(`passes.global_average_pools`), the form `AdaptiveAvgPool2d` exports to, in the QDQ graph and in "
                  "`export --fp`'s float graph that the ONNX-level peers quantize; the builder fuses the mean into "
                  "the kernel before it. mixq-onnx's graphs compute the same integers as before (`verify`: max "
                  "|diff| 0 on the 5,000 test images); the peers calibrate a different graph, so their top-1 moves (the peers "
                  "table's ResNet-8 rows and its W8A8 goal are on the new graph). ResNet-8's rows before and after (the same tools, images and settings; `runs/peers/"
                  "before-global-mean/`):", "",
                  "| tool / setting | top-1 % before | after | engine layers before | after | hand-offs before | after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in r8:
            b = before[r["id"]]
            lines.append(f"| {label(r)} | {_f(b.get('top1'))} | {_f(r.get('top1'))} | {b.get('engine_layers')} | "
                         f"{r['engine_layers']} | {total_handoffs(b)} | {total_handoffs(r)} |")
    missing = [r["id"] for r in rows_ if r.get("status") != "ok"]
    if missing:
        lines += ["", "Not measured or failed: " + ", ".join(missing)]
    return "\n".join(lines)


# the W8A8 rows re-run on other calibration samples, on the real models whose one-sample W8A8 goal was missed:
# ResNet-20 (2026-11-30, draws 1-5) and ResNet-56 (2026-12-01, draws 1-5, the same protocol, fixed before its runs).
# Every tool whose table row is W8A8 (onnxruntime's entropy calibrator writes minmax's graph, and its float-bias
# variant minmax's values: one row stands for them)
DRAW_MODELS = ("resnet20", "resnet56")
DRAW_VARIANTS = (("mixq", "mixq", "rtn-w8a8", {"method": "rtn"}), ("mixq", "mixq", "qdrop-w8a8", {"method": "qdrop"}),
                 ("ort", "ort", "minmax", {"calibrator": "minmax"}),
                 ("ort", "ort", "percentile", {"calibrator": "percentile"}),
                 ("modelopt", "modelopt-onnx", "int8", {}), ("modelopt", "modelopt-torch", "int8", {}))


def draw_rows(draws: list[int], models: tuple[str, ...] | list[str] = ("resnet20",)) -> list[dict[str, Any]]:
    """W8A8 on calibration draws (`calib --seed s`, s >= 1): is a tool's lead at the table's one sample of 1,024
    images a property of the tool or of that sample?"""
    return [{"id": f"{m}-draw{s}-{tool}-{variant}", "model": m, "draw": s, "group": group,
             "tool": tool, "variant": variant, "wbits": 8, "abits": 8, **kw}
            for m in models for s in draws for group, tool, variant, kw in DRAW_VARIANTS]


# --------------------------------------------------------------------------- pure helpers (tested)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def count_qdq(model: Any) -> dict[str, int]:
    """Q and DQ nodes of an onnx ModelProto (any domain; subgraphs and local functions included)."""
    q = dq = 0

    def walk(nodes: Any) -> None:
        nonlocal q, dq
        for n in nodes:
            if n.op_type.endswith("QuantizeLinear") and not n.op_type.endswith("DequantizeLinear"):
                q += 1
            elif n.op_type.endswith("DequantizeLinear"):
                dq += 1
            for at in n.attribute:
                if at.HasField("g"):
                    walk(at.g.node)
                for g in at.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return {"q": q, "dq": dq, "qdq": q + dq}


_REFORMAT = re.compile(r"reformat|shuffle|copy", re.I)
_COMPUTE = re.compile(r"conv|correlation|gemm|matmul|matrixmultiply|fullyconnected|deconv", re.I)
_QUANT_TYPE = re.compile(r"quantiz|scale", re.I)
_INT = {"Int8", "UInt8", "Int4"}


def engine_handoffs(layers: list[dict[str, Any]], onnx_ops: dict[str, str]) -> dict[str, int]:
    """Count the engine's hand-off layers from its layer table (inspect's `layers`: name, type, inputs,
    outputs (datatypes), onnx_nodes) and the ONNX op of each node name:
    - reformat: layers whose type or name says reformat/shuffle/copy (a layout or type conversion kernel);
    - requantize: layers that run only Q/DQ (with Clip/Cast/Identity) ONNX nodes, or a quantize/scale layer
      type, i.e. a standalone int8<->float conversion not fused into a compute kernel;
    - float: non-compute layers that pass a float tensor to another layer which reads it as float (the
      precision report's float hand-offs are counted by the caller; this counts layers whose outputs are all
      float and that run no compute op, where the graph meant them quantized (a Q/DQ node inside))."""
    reformat = requant = 0
    for li in layers:
        typ, name = str(li.get("type", "")), str(li.get("name", ""))
        ops = [onnx_ops.get(n, "?") for n in li.get("onnx_nodes", [])]
        if _REFORMAT.search(typ) or (_REFORMAT.search(name) and not ops):
            reformat += 1
        elif (ops and all(o in QDQ_OPS or o in ("Clip", "Cast", "Identity") for o in ops)
              and any(o in QDQ_OPS for o in ops)) or (_QUANT_TYPE.search(typ) and not _COMPUTE.search(typ)):
            requant += 1
    return {"reformat": reformat, "requantize": requant}


def first_last(text: str) -> str:
    """An error's first and last non-empty lines (one if they are the same)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(no output)"
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def _f(v: Any, fmt: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def label(r: dict[str, Any]) -> str:
    t, v = r["tool"], r["variant"]
    if t == "mixq":
        return f"mixq-onnx {v.replace('-', ' ')}"
    if t == "ort":
        return f"onnxruntime {v}"
    if t == "qdrop-ref":
        return f"QDrop reference {v}"
    return f"{t} {v}"


def render_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | tool / setting | W/A | top-1 % | agree % | quantize s | Q/DQ nodes | engine layers | "
             "int8 MAC | reformat / requant / float hand-offs | ONNX KiB | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    order = {m: i for i, m in enumerate(MODELS)}
    tools = TOOL_ORDER
    for r in sorted(results, key=lambda r: (order.get(r["model"], 99), r.get("group") == "ref",
                                            tools.get(r["tool"], 9), -r["abits"], -r["wbits"],
                                            r.get("method", "") != "rtn", r["variant"])):
        if r.get("group") == "ref":
            continue  # in the reference table
        fp = r.get("fp_top1")
        model = f"{r['model']}" + (f" (FP {fp:.2f})" if fp is not None else " (random weights)")
        if r.get("status") != "ok":
            lines.append(f"| {model} | {label(r)} | W{r['wbits']}A{r['abits']} | – | – | – | – | – | – | – | – | "
                         f"failed: `{r.get('error', '?')}` |")
            continue
        ho = r.get("handoffs") or {}
        eng = r.get("engine_error")
        hand = (f"{ho.get('reformat', '–')} / {ho.get('requantize', '–')} / {ho.get('float', '–')}" if ho else "–")
        notes = [r["note"]] if r.get("note") else []
        if r["tool"] == "mixq" and r.get("quantize_in_s") is not None:
            notes.append(f"quantize() itself {r['quantize_in_s']:.1f} s; the rest is start-up and export")
        fl = r.get("float_compute_nodes")
        if fl:
            notes.append(f"{len(fl)} of {r.get('compute_nodes')} conv/GEMM left float in the graph ({', '.join(fl[:2])})")
        if r.get("fp16"):
            notes.append("FP16 casts/initializers in the graph")
        if r.get("eval_error"):
            notes.append(f"onnxruntime: `{r['eval_error']}`")
        note = "; ".join(notes)
        if eng:
            m32 = re.search(r"\((\S+): input has type (\w+) but must have type ([^.]+)\.", eng)
            eng = (f"no engine: the parser refuses `{m32.group(1)}` ({m32.group(2)} input; it takes "
                   f"{m32.group(3)})" if m32 else f"engine: `{eng}`")
            note = (note + "; " if note else "") + eng
        size = r.get("size_bytes")
        lines.append(
            f"| {model} | {label(r)} | W{r['wbits']}A{r['abits']} | {_f(r.get('top1'))} | {_f(r.get('agreement'))} | "
            f"{_f(r.get('quantize_s'), '.1f')} | {r.get('qdq', {}).get('qdq', '–')} | {r.get('engine_layers', '–')} | "
            f"{_f(r.get('int8_mac_fraction'), '.3f')} | {hand} | {_f(size / 1024 if size else None, '.0f')} | {note} |")
    return lines


def render_ref(results: list[dict[str, Any]]) -> list[str]:
    ref = {r["wbits"] * 10 + r["abits"]: r for r in results if r.get("tool") == "qdrop-ref"}
    ours = {r["wbits"] * 10 + r["abits"]: r for r in results if r.get("group") == "ref" and r["tool"] == "mixq"}
    if not ref and not ours:
        return ["(not run yet)"]
    lines = ["| model | W/A | reference top-1 % | mixq-onnx top-1 % | Δ pp | reference agree % | mixq-onnx agree % | "
             "reference quantize s | mixq-onnx quantize s | time ratio mixq/ref | reference process s | "
             "mixq-onnx process s | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in sorted(set(ref) | set(ours), reverse=True):
        a, b = ref.get(k), ours.get(k)
        ok_a, ok_b = a is not None and a.get("status") == "ok", b is not None and b.get("status") == "ok"
        t1a, t1b = (a["top1"] if ok_a else None), (b["top1"] if ok_b else None)
        qa, qb = (a.get("quantize_s") if ok_a else None), (b.get("quantize_in_s") if ok_b else None)
        wa, wb = (a["wall_s"] if ok_a else None), (b["wall_s"] if ok_b else None)
        note = "; ".join(f"{who} failed: `{x.get('error')}`" for who, x in (("reference", a), ("mixq-onnx", b))
                         if x is not None and x.get("status") != "ok")
        lines.append(f"| resnet20 | W{k // 10}A{k % 10} | {_f(t1a)} | {_f(t1b)} | "
                     f"{_f(t1b - t1a if t1a is not None and t1b is not None else None, '+.2f')} | "
                     f"{_f(a.get('agreement') if ok_a else None)} | {_f(b.get('agreement') if ok_b else None)} | "
                     f"{_f(qa, '.0f')} | {_f(qb, '.0f')} | {_f(qb / qa if qa and qb else None, '.2f')} | "
                     f"{_f(wa, '.0f')} | {_f(wb, '.0f')} | {note} |")
    return lines


def total_handoffs(r: dict[str, Any]) -> int:
    """A row's engine hand-offs, all kinds (reformat, requantize, float)."""
    return sum((r.get("handoffs") or {}).values())


def paired_se(a_hex: str | None, b_hex: str | None, n: int) -> float | None:
    """Standard error (pp) of the top-1 difference of two models judged on the same n images, from their
    per-image correctness bits (packbits hex): sqrt(discordant) / n, as in McNemar's test."""
    if not a_hex or not b_hex or n <= 0:
        return None
    a, b = bytes.fromhex(a_hex), bytes.fromhex(b_hex)
    if len(a) != len(b):
        return None
    disc = sum(bin(x ^ y).count("1") for x, y in zip(a, b))
    return 100 * disc ** 0.5 / n


def goals(results: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, measured (not tuned for)."""
    out = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") == "ok" and r.get("group") != "ref":
            by_model.setdefault(r["model"], []).append(r)
    for m, rs in sorted(by_model.items(), key=lambda kv: list(MODELS).index(kv[0]) if kv[0] in MODELS else 99):
        peers = [r for r in rs if r["tool"] != "mixq"]
        ours = [r for r in rs if r["tool"] == "mixq" and r["wbits"] == 8 and r["abits"] == 8 and not r.get("float_layers")]
        ours_float = [r for r in rs if r["tool"] == "mixq" and r.get("float_layers") and r.get("engine_layers") is not None]
        if not peers or not ours:
            continue
        # a peer that left convolutions float is no W8A8 result: judged only where it quantized >= 99 % of MACs
        acc_peers = [r for r in peers if r.get("top1") is not None
                     and (r.get("int8_mac_fraction") is None or r["int8_mac_fraction"] >= 0.99)]
        if acc_peers and any(r.get("top1") is not None for r in ours):
            best = max(acc_peers, key=lambda r: r["top1"])
            mine = max((r for r in ours if r.get("top1") is not None), key=lambda r: r["top1"])
            d = mine["top1"] - best["top1"]
            verdict = "met" if d >= -0.1 else f"missed by {-d - 0.1:.2f} pp beyond the 0.1 pp allowance"
            se = paired_se(mine.get("correct_hex"), best.get("correct_hex"), 5000)
            if se:
                verdict += f" (paired standard error of the difference {se:.2f} pp on these 5,000 images)"
            out.append(f"- {m} W8A8 top-1: {label(mine)} {mine['top1']:.2f} % (agreement {_f(mine.get('agreement'))} %) "
                       f"vs best peer {label(best)} {best['top1']:.2f} % (agreement {_f(best.get('agreement'))} %), "
                       f"Δ {d:+.2f} pp: {verdict}.")
        # layer counts compare only engines that run (nearly) every MAC in INT8: a float engine fuses more
        eng_peers = [r for r in peers if r.get("engine_layers") is not None and (r.get("int8_mac_fraction") or 0) >= 0.99]
        skipped = [label(r) for r in peers if r.get("engine_layers") is not None and r not in eng_peers]
        eng_ours = [r for r in ours if r.get("engine_layers") is not None]
        if eng_peers and eng_ours:
            mine = min(eng_ours, key=lambda r: (r["engine_layers"], total_handoffs(r)))
            fewest = min(eng_peers, key=lambda r: r["engine_layers"])
            hmine = total_handoffs(mine)
            hbest = min(total_handoffs(r) for r in eng_peers)
            ok = mine["engine_layers"] <= fewest["engine_layers"] and hmine <= hbest
            full = [r for r in eng_peers if not r.get("float_compute_nodes") and not r.get("fp16")]
            extra = ""
            if full and len(full) < len(eng_peers):
                f_l = min(r["engine_layers"] for r in full)
                f_h = min(total_handoffs(r) for r in full)
                extra = (f"; against the peers whose every conv/GEMM runs INT8 (no FP16, no float layer): fewest "
                         f"{f_l} layers, {f_h} hand-offs, "
                         f"{'met' if mine['engine_layers'] <= f_l and hmine <= f_h else 'missed'}")
            out.append(f"- {m} W8A8 engine: mixq-onnx {mine['engine_layers']} layers, {hmine} hand-offs; fewest among "
                       f"peers {fewest['engine_layers']} layers ({label(fewest)}), {hbest} hand-offs: "
                       f"{'met' if ok else 'missed (why: see What the graphs show)'}" + extra
                       + (f" (not compared: {', '.join(skipped)}, whose engines run less than 99 % of MACs in INT8)"
                          if skipped else "") + ".")
        if ours_float and eng_peers:
            f = ours_float[0]
            hf = total_handoffs(f)
            over = []  # each peer this layout has more layers or hand-offs than, and by how much
            for r in eng_peers:
                more = [f"{f['engine_layers'] - r['engine_layers']} layer(s)"] if f["engine_layers"] > r["engine_layers"] else []
                more += [f"{hf - total_handoffs(r)} hand-off(s)"] if hf > total_handoffs(r) else []
                if more:
                    over.append(f"{' and '.join(more)} more than {label(r)} ({r['engine_layers']} layers, "
                                f"{total_handoffs(r)} hand-offs)")
            verdict = "; ".join(over) or "no more layers and hand-offs than any peer: met with this layout"
            out.append(f"- {m} W8A8 engine with the classifier float, as ModelOpt ONNX leaves it (`--float-layers "
                       f"{f['float_layers']}`, {label(f)}; not counted above): {f['engine_layers']} layers, {hf} "
                       f"hand-offs; {verdict}.")
    ref = {r["wbits"] * 10 + r["abits"]: r for r in results if r.get("tool") == "qdrop-ref" and r.get("status") == "ok"}
    ours = {r["wbits"] * 10 + r["abits"]: r for r in results
            if r.get("group") == "ref" and r["tool"] == "mixq" and r.get("status") == "ok"}
    for k in sorted(set(ref) & set(ours), reverse=True):
        a, b = ref[k], ours[k]
        d = b["top1"] - a["top1"]
        acc = "met" if d >= -0.3 else f"missed by {-d - 0.3:.2f} pp beyond the 0.3 pp allowance"
        ta, tb = a.get("quantize_s"), b.get("quantize_in_s")
        if ta and tb:
            tim = "met" if tb <= ta else f"missed: {tb / ta:.2f}x the reference's time"
            tim = f"quantize {tb:.0f} s vs {ta:.0f} s ({tim})"
        else:
            tim = "time not recorded"
        out.append(f"- resnet20 W{k // 10}A{k % 10} qdrop vs reference at {FAST_ITERS} iterations/block: top-1 Δ {d:+.2f} "
                   f"pp ({acc}); {tim}.")
    return out or ["- not enough rows measured yet to judge the goals."]


# --------------------------------------------------------------------------- environment
def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def base_env() -> dict[str, str]:
    t = str(THREADS)
    return {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}


def ensure_venv(name: str) -> Path:
    """The python of runs/peers/venvs/<name>, created and installed on first use."""
    pkgs, system_site = ENVS[name]
    d = VENVS / name
    py = d / "bin" / "python"
    stamp_file = d / ".installed"
    if stamp_file.is_file() and stamp_file.read_text().strip() == " ".join(pkgs):
        return py
    d.parent.mkdir(parents=True, exist_ok=True)
    print(f"venv {name}: creating {d} and installing {' '.join(pkgs)} ...", flush=True)
    args = [sys.executable, "-m", "venv"] + (["--system-site-packages"] if system_site else []) + [str(d)]
    res = run(args)
    if res.returncode != 0:
        raise RuntimeError(f"venv {name}: {first_last(res.stderr)}")
    res = run([str(py), "-m", "pip", "install", "-q", *pkgs])
    if res.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(pkgs)}: {first_last(res.stderr)}")
    stamp_file.write_text(" ".join(pkgs) + "\n")
    return py


def ensure_qdrop_src() -> Path:
    if (QDROP_SRC / "qdrop" / "solver" / "recon.py").is_file():
        return QDROP_SRC
    res = run(["git", "clone", "--depth", "1", QDROP_URL, str(QDROP_SRC)])
    if res.returncode != 0:
        raise RuntimeError(f"reference checkout missing at {QDROP_SRC} and git clone failed: {first_last(res.stderr)}")
    return QDROP_SRC


def cli(*args: str) -> str:
    """`python -m mixq_onnx.cli ...` from the work tree; the last stdout line."""
    res = run([sys.executable, "-m", "mixq_onnx.cli", *args], env=base_env(), cwd=ROOT)
    if res.returncode != 0:
        text = (res.stderr or res.stdout).strip()
        raise RuntimeError(first_last(text) if text else f"exit status {res.returncode} and no output"
                           + (" (killed by a signal)" if res.returncode < 0 else ""))
    return res.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- shared inputs
def calib_cache(size: int | None = None, seed: int = 0) -> str:
    """The real-image cache: the 1,024 images at their own 32 px, or (`size`) the same images resized by the real
    generator to a larger model's input (mixq-onnx refuses to upscale a cache more than 4x on the fly). `seed`:
    another seeded sample of 1,024 of the 5,000 train images (the calibration draws; 0 is the table's)."""
    return cli("calib", "--generator", "real", "--num", str(N_CALIB), "--source", str(CALIB_NPZ), "--cache-root",
               str(CACHE_ROOT), "-q", "--threads", str(THREADS), *(["--size", str(size)] if size else []),
               *(["--seed", str(seed)] if seed else []))


def model_dir(model_name: str, draw: int = 0) -> Path:
    """A model's prepared inputs and rows: runs/peers/<model>/, or runs/peers/<model>-draw<seed>/ for a draw."""
    return WORK / (model_name if not draw else f"{model_name}-draw{draw}")


def prepare(model_name: str, draw: int = 0) -> dict[str, Any]:
    """Per model: data.npz (calib_x, test_x float32 NCHW normalised, test_y), calib_x.npy, fp.onnx and the FP
    graph's test predictions (ORT, optimisations off). Cached under `model_dir` (a draw: its own calibration
    sample, no float engine)."""
    import numpy as np
    import torch

    d = model_dir(model_name, draw)
    info_path = d / "prepared.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    from mixq_onnx.calib.cache import load_images
    from mixq_onnx.data import read_labelled
    from mixq_onnx.models import get_preprocessing, load_model
    from mixq_onnx.onnx.export import export_fp

    torch.set_num_threads(THREADS)
    spec, ck, real = MODELS[model_name]
    model = load_model(spec, str(SHARED / ck) if ck else None, random_init=ck is None).eval()
    pre = get_preprocessing(model)
    size = pre.input_size[1]
    cache = calib_cache(None if size <= 32 else size, draw)
    images, records = load_images(Path(cache))
    common = WORK / ("calib1024.npz" if size <= 32 else f"calib1024-{size}px.npz")  # the identical images for anyone
    if draw:
        common = d / "calib1024.npz"
    if not common.is_file():
        np.savez(common, x=images.numpy(), y=np.array([r.get("label", -1) for r in records], dtype=np.int64),
                 source_index=np.array([r.get("source_index", -1) for r in records], dtype=np.int64))
    calib_x = pre(images).numpy().astype(np.float32)
    arrays = {"calib_x": calib_x}
    if real:
        test = read_labelled(TEST_NPZ, pre.input_size[1])
        arrays["test_x"] = pre(test.images).numpy().astype(np.float32)
        arrays["test_y"] = test.labels.numpy()
    np.savez(d / "data.npz", **arrays)
    np.save(d / "calib_x.npy", calib_x)
    fp = export_fp(model, d / "fp.onnx")
    info: dict[str, Any] = {"model": model_name, "spec": spec, "checkpoint": str(SHARED / ck) if ck else None,
                            "cache": cache, "data": str(d / "data.npz"), "calib_npy": str(d / "calib_x.npy"),
                            "fp_onnx": str(fp), "calib_common": str(common), "input_size": list(pre.input_size)}
    if real:
        logits = ort_predict(fp, arrays["test_x"])
        np.save(d / "fp_pred.npy", logits.argmax(1))
        info["fp_top1"] = float((logits.argmax(1) == arrays["test_y"]).mean() * 100)
        if not draw:
            info["fp_engine"] = measure_engine(fp, d / "fp.plan")
    info["draw"] = draw
    info_path.write_text(json.dumps(info, indent=1))
    return info


def ort_predict(onnx_path: Path | str, x: Any, batch: int = 250) -> Any:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    return np.concatenate([s.run(None, {inp.name: x[i:i + batch].astype(dtype)})[0].astype(np.float32)
                           for i in range(0, len(x), batch)])


def measure_engine(onnx_path: Path, plan: Path) -> dict[str, Any]:
    import onnx

    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    t = time.perf_counter()
    build_engine(onnx_path, plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 32)))
    build_s = time.perf_counter() - t
    rep = inspect_plan(plan, onnx_path)
    ops = {n.name: n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    ho = engine_handoffs(rep.layers, ops)
    ho["float"] = len(rep.float_handoffs)
    float_nodes = [c.node for c in rep.compute if not c.quantized]
    return {"engine_layers": len(rep.layers), "int8_mac_fraction": round(rep.int8_mac_fraction, 4),
            "float_compute_nodes": float_nodes, "compute_nodes": len(rep.compute),
            "handoffs": ho, "fallbacks": len(rep.fallbacks), "build_s": round(build_s, 1),
            "layer_types": sorted({li["type"] for li in rep.layers})}


# --------------------------------------------------------------------------- one row
def quantize_row(r: dict[str, Any], info: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the tool; returns {onnx, wall_s, ...}. Raises RuntimeError(first/last line) on failure."""
    env = base_env()
    q = out / "q.onnx"
    side = out / "driver.json"
    t = time.perf_counter()
    extra: dict[str, Any] = {}
    if r["tool"] == "mixq":
        spec, ck = info["spec"], info["checkpoint"]
        qdir = out / "quant"
        cmd = ["quantize", "--model", spec, *(["--checkpoint", ck] if ck else ["--random-weights"]), "--calib",
               info["cache"], "--method", r["method"], "--wbits", str(r["wbits"]), "--abits", str(r["abits"]),
               "--preset", "fast", "--out", str(qdir), "--overwrite", "-q", "--threads", str(THREADS)]
        if r.get("asymmetric"):
            cmd.append("--asymmetric")
        if r.get("float_layers"):
            cmd += ["--float-layers", r["float_layers"]]
        cli(*cmd)
        extra["cmd"] = "mixq-onnx " + shlex.join(cmd)
        rep = json.loads((qdir / "quant.json").read_text()).get("report", {})
        extra["quantize_in_s"] = rep.get("seconds")  # quantize() in-process: calibration + reconstruction
        extra["holdout"] = rep.get("holdout")
        if r.get("asymmetric"):  # the papers' setting: not exportable for TensorRT; judged in PyTorch
            wall = time.perf_counter() - t
            ev = json.loads(cli("eval", "--quantized", str(qdir), "--data", str(TEST_NPZ), "--json", "-q",
                                "--threads", str(THREADS)))
            return {"wall_s": round(wall, 1), "top1": ev["top1"], "agreement": ev.get("agreement"),
                    "fp_top1": ev.get("fp_top1"), **extra, "note": "asymmetric (not deployable): PyTorch fake-quant"}
        cli("export", "--quantized", str(qdir), "--out", str(q))
        wall = time.perf_counter() - t
        return {"onnx": str(q), "wall_s": round(wall, 1), **extra, "tool_version": cli("--version")}
    elif r["tool"] == "ort":
        py = ensure_venv("ort")
        cmd = [str(py), str(DRIVERS / "ort_quant.py"), "--fp", info["fp_onnx"], "--data", info["data"],
               "--calibrator", r["calibrator"], "--out", str(q), "--json", str(side)]
        if r.get("float_bias"):
            cmd.append("--float-bias")
    elif r["tool"] == "modelopt-onnx":
        py = ensure_venv("modelopt")
        cmd = [str(py), str(DRIVERS / "modelopt_onnx.py"), "--fp", info["fp_onnx"], "--calib", info["calib_npy"],
               "--out", str(q), "--json", str(side)]
        if r.get("calibration_method"):
            cmd += ["--calibration-method", r["calibration_method"]]
    elif r["tool"] == "modelopt-torch":
        py = ensure_venv("modelopt")
        cmd = [str(py), str(DRIVERS / "modelopt_torch.py"), "--model", info["spec"], "--data", info["data"],
               "--out", str(q), "--json", str(side)] + (["--checkpoint", info["checkpoint"]] if info["checkpoint"]
                                                        else [])
    elif r["tool"] == "qdrop-ref":
        py = ensure_venv("qdrop")
        src = ensure_qdrop_src()
        head = run(["git", "-C", str(src), "rev-parse", "HEAD"])
        extra["reference_commit"] = (head.stdout.strip() if head.returncode == 0 else
                                     (src / "COMMIT").read_text().strip() if (src / "COMMIT").is_file() else "?")
        cmd = [str(py), str(DRIVERS / "qdrop_ref.py"), "--qdrop", str(src), "--checkpoint", info["checkpoint"],
               "--data", info["data"], "--wbits", str(r["wbits"]), "--abits", str(r["abits"]), "--iters",
               str(FAST_ITERS), "--threads", str(THREADS), "--json", str(side)]
    else:
        raise ValueError(r["tool"])
    if r["tool"] != "mixq":
        env = {**env, "PYTHONPATH": str(ROOT)}  # drivers that load the zoo model import it from the work tree
        res = run(cmd, env=env, cwd=out)
        (out / "driver.log").write_text(res.stdout + "\n--- stderr\n" + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(first_last(res.stderr or res.stdout))
        extra["cmd"] = shlex.join([Path(cmd[0]).parent.parent.name + "/python", *[
            str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:]]])
        extra["driver"] = json.loads(side.read_text())
        extra["tool_version"] = extra["driver"].get("tool")
    wall = time.perf_counter() - t
    if r["tool"] == "qdrop-ref":
        d = extra["driver"]
        return {"wall_s": round(wall, 1), "top1": d["top1"], "agreement": d["agreement"], "fp_top1": d["fp_top1"],
                "quantize_s": d["quantize_s"], **extra}
    return {"onnx": str(q), "wall_s": round(wall, 1), **extra}


def run_row(r: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    out = model_dir(r["model"], r.get("draw", 0)) / r["id"]
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {**r, "fp_top1": info.get("fp_top1"), "threads": THREADS}
    try:
        res.update(quantize_row(r, info, out))
    except (RuntimeError, subprocess.SubprocessError, OSError, json.JSONDecodeError, KeyError) as e:
        res.update(status="failed", error=short_error(str(e), 300))
        return res
    res["status"] = "ok"
    res.setdefault("quantize_s", res["wall_s"])
    return measure(res, info)


def measure(res: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Everything judged on the tool's output (ONNX graph, onnxruntime accuracy, engine); `--remeasure` reruns
    this alone on finished rows."""
    import numpy as np
    import onnx

    r, out = res, model_dir(res["model"], res.get("draw", 0)) / res["id"]
    qj = out / "quant" / "quant.json"
    if r["tool"] == "mixq" and qj.is_file():
        rep = json.loads(qj.read_text()).get("report", {})
        res.setdefault("quantize_in_s", rep.get("seconds"))
        res.setdefault("holdout", rep.get("holdout"))
    if "onnx" not in res:
        return res
    q = Path(res["onnx"])
    res["size_bytes"] = q.stat().st_size
    try:
        m = onnx.load(str(q))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        res.update(status="failed", error=f"the tool's output is not an ONNX model: {first_last(str(e))}"[:400])
        return res
    res["sha256"] = hashlib.sha256(q.read_bytes()).hexdigest()
    res["qdq"] = count_qdq(m)
    res["opset"] = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if MODELS[r["model"]][2]:
        try:
            d = np.load(info["data"])
            logits = ort_predict(q, d["test_x"])
            pred = logits.argmax(1)
            res["top1"] = float((pred == d["test_y"]).mean() * 100)
            res["agreement"] = float((pred == np.load(out.parent / "fp_pred.npy")).mean() * 100)
            res["correct_hex"] = np.packbits(pred == d["test_y"]).tobytes().hex()  # paired comparisons
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            res["eval_error"] = first_last(str(e))[:300]
    res["fp16"] = any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in m.graph.node)
    if r.get("draw"):
        return res  # a calibration draw measures accuracy only: the engine's structure is the table's row
    try:
        res.update(measure_engine(q, out / "q.plan"))
    except Exception as e:  # noqa: BLE001 - TensorRT and the parser raise many types
        res["engine_error"] = short_error(str(e))
    return res


def short_error(text: str, limit: int = 320) -> str:
    """first_last, with the work tree's paths made relative and cut to `limit` characters."""
    # TensorRT-RTX without a GPU appends a CUDA-runtime line to every parser error: the cause is the line before
    text = "\n".join(ln for ln in text.replace(str(ROOT) + "/", "").splitlines() if "catchCudaError" not in ln)
    text = re.sub(r"rejected \S+\.onnx: ", "rejected the graph: ", text)
    t = first_last(text)
    return t if len(t) <= limit else t[: limit - 1] + "…"


def claim(row_id: str) -> bool:
    """Mark a row as being run by this process (two bench processes may share the results folder); a claim
    whose process is gone is taken over."""
    f = RESULTS / f"{row_id}.running"
    for _ in range(2):
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(f.read_text().strip() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                f.unlink(missing_ok=True)
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


# --------------------------------------------------------------------------- report
def load_results() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def unbacked_models(results: list[dict[str, Any]], doc: Path = DOC,
                    draws: list[dict[str, Any]] | None = None) -> list[str]:
    """Models whose rows section "peers" shows now but which have no result file on disk (a new machine, a
    cleaned runs/), and its calibration-draws table when no draw has a result: re-rendering from the results
    would drop those measured rows."""
    text = doc.read_text() if doc.exists() else ""
    m = re.search(r"<!-- begin:peers -->(.*?)<!-- end:peers -->", text, re.S)
    have = {r["model"] for r in results}
    lost = [name for name in MODELS if m and name not in have
            and re.search(rf"^\| {re.escape(name)} \(", m.group(1), re.M)]
    for name in DRAW_MODELS:
        if m and f"### {name} W8A8 over calibration draws" in m.group(1) \
                and not any(r.get("model", "resnet20") == name for r in draws or []):
            lost.append(f"{name}'s calibration draws")
    return lost


def write_table(command: str, anyway: bool = False) -> None:
    """Section "peers" and its plot from the results on disk, unless that would drop rows the section shows."""
    results = load_results()
    lost = unbacked_models(results, DOC, load_draws())
    if lost and not anyway:
        print(f"kept section peers as it is: it shows rows of {', '.join(lost)}, which have no results under "
              f"{RESULTS} (re-run them, or --render-anyway to drop them)", flush=True)
        return
    plot(results, ROOT / "docs" / "peers.png")
    update_section("peers", render(results, command))


DIAG = RESULTS / "diagnose"  # --diagnose-residuals: one json per model


def diagnose_residuals(model_name: str) -> dict[str, Any]:
    """Why ModelOpt PyTorch agrees more with the float model at W8A8: it leaves every residual add's identity
    input float (its engines' float hand-offs). mixq-onnx rtn W8A8 in PyTorch on the table's cache, top-1 and
    agreement on all 5,000 test images: the shared layout (the table's row), one quantizer per consumer, and the
    per-consumer layout with its residual-identity quantizers switched off, which is ModelOpt PyTorch's placement.
    A diagnostic: nothing is chosen on it."""
    import numpy as np
    import torch

    from mixq_onnx.calib import load_calibration
    from mixq_onnx.models import load_model
    from mixq_onnx.quant import QuantConfig, evaluate, quantize, quantizers
    from mixq_onnx.quant.quantizer import ActQuantizer

    torch.set_num_threads(THREADS)
    info = prepare(model_name)
    spec, ck, _ = MODELS[model_name]
    model = load_model(spec, str(SHARED / ck))
    d = np.load(TEST_NPZ)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    calib = load_calibration(info["cache"], model)
    out: dict[str, Any] = {"model": model_name, "cache": info["cache"]}
    for key, share in (("shared", True), ("per_consumer", False)):
        q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", share_quantizers=share), calib, progress=False)
        r = evaluate(q, x, y, fp_model=model)
        out[key] = {"top1": round(r.top1, 2), "agreement": round(r.agreement, 2)}
        res = [a for a in quantizers(q).values() if isinstance(a, ActQuantizer) and a.placement == "residual"]
        if not share:
            for a in res:
                a.enabled = False
            r = evaluate(q, x, y, fp_model=model)
            out["float_identities"] = {"top1": round(r.top1, 2), "agreement": round(r.agreement, 2),
                                       "quantizers_off": len(res)}
    return out


def render_diagnosis(model: str) -> list[str]:
    p = DIAG / f"{model}-residuals.json"
    if not p.is_file():
        return []
    d = json.loads(p.read_text())
    s, pc, fi = d["shared"], d["per_consumer"], d["float_identities"]
    return ["", f"Why ModelOpt PyTorch agrees more with the float model ({d['bench_cmd']}, a diagnostic: nothing "
            "was chosen on it): its `INT8_DEFAULT_CFG` quantizes the inputs of convolutions, linear layers and "
            "pools, not the identity inputs of the residual adds, which stay float (the float hand-offs of its "
            "engines above). mixq-onnx rtn W8A8 in PyTorch on the table's cache, all 5,000 test images: shared "
            f"layout (the table's row) {s['top1']:.2f} % (agreement {s['agreement']:.2f} %); one quantizer per "
            f"consumer {pc['top1']:.2f} % ({pc['agreement']:.2f} %); the same with its {fi['quantizers_off']} "
            f"residual-identity quantizers off, ModelOpt PyTorch's placement, {fi['top1']:.2f} % "
            f"({fi['agreement']:.2f} %). Leaving the identities float raises agreement by "
            f"{fi['agreement'] - pc['agreement']:+.2f} pp and moves top-1 by {fi['top1'] - pc['top1']:+.2f} pp: the "
            "placement explains the agreement gap, not the top-1 one, which stays within the test set's noise "
            "(a paired standard error of about 0.2 pp on these 5,000 images, shared by every draw)."]


def load_draws() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(DRAWS.glob("*.json"))]


def render_draws(results: list[dict[str, Any]], draws: list[dict[str, Any]], model: str = "resnet20") -> list[str]:
    """One model's top-1 per calibration draw (draw 0: the table's row), the means of top-1 and of agreement, each
    tool's mean difference from mixq-onnx qdrop W8A8 with the standard error over the draws (the spread of the
    paired differences, which holds the test set's noise and the sample's), and the W8A8 goal read on the means:
    mixq-onnx's better W8A8 setting against the best peer, as the one-sample goal takes mixq-onnx's best row."""
    base = {(r["tool"], r["variant"]): r for r in results if r.get("status") == "ok" and r["model"] == model}
    ok = [r for r in draws if r.get("status") == "ok" and r.get("top1") is not None
          and r.get("model", "resnet20") == model]
    seeds = sorted({r["draw"] for r in ok})
    if not seeds:
        return []
    cols = [0] + seeds
    top: dict[tuple[str, str], dict[int, float]] = {}
    agree: dict[tuple[str, str], list[float]] = {}
    for _, tool, variant, _ in DRAW_VARIANTS:
        b = base.get((tool, variant))
        top[(tool, variant)] = {0: b["top1"]} if b and b.get("top1") is not None else {}
        agree[(tool, variant)] = [b["agreement"]] if b and b.get("agreement") is not None else []
    for r in ok:
        top.setdefault((r["tool"], r["variant"]), {})[r["draw"]] = r["top1"]
        if r.get("agreement") is not None:
            agree.setdefault((r["tool"], r["variant"]), []).append(r["agreement"])
    mine_key = ("mixq", "qdrop-w8a8")
    ref = top.get(mine_key, {})
    lines = ["| tool / setting | " + " | ".join(f"draw {c}" for c in cols)
             + " | mean top-1 | mean agree % | Δ mean vs mixq qdrop w8a8 |", "|---|" + "---:|" * (len(cols) + 3)]
    means: dict[tuple[str, str], float] = {}
    for key, v in top.items():
        have = [c for c in cols if c in v]
        if not have:
            continue
        means[key] = mean = sum(v[c] for c in have) / len(have)
        both = [c for c in have if c in ref]
        delta = "–"
        if key != mine_key and len(both) >= 2:
            d = [v[c] - ref[c] for c in both]
            md = sum(d) / len(d)
            sd = (sum((x - md) ** 2 for x in d) / (len(d) - 1)) ** 0.5
            delta = f"{md:+.2f} ± {sd / len(d) ** 0.5:.2f} ({len(d)} draws)"
        ag = agree.get(key) or []
        lines.append(f"| {label({'tool': key[0], 'variant': key[1]})} | "
                     + " | ".join(f"{v[c]:.2f}" if c in v else "–" for c in cols)
                     + f" | {mean:.2f} | {_f(sum(ag) / len(ag) if ag else None)} | {delta} |")
    full = {k: m for k, m in means.items() if len(top[k]) == len(cols)}
    peers = {k: m for k, m in full.items() if k[0] != "mixq"}
    mine = {k: m for k, m in full.items() if k[0] == "mixq"}
    if mine and peers:
        best, ours = max(peers, key=lambda k: peers[k]), max(mine, key=lambda k: mine[k])
        d = mine[ours] - peers[best]
        verdict = "met" if d >= -0.1 else f"missed by {-d - 0.1:.2f} pp beyond the 0.1 pp allowance"
        lines += ["", f"Read on the means over the {len(cols)} draws, the W8A8 goal: "
                  f"{label({'tool': ours[0], 'variant': ours[1]})} {mine[ours]:.2f} % vs best peer "
                  f"{label({'tool': best[0], 'variant': best[1]})} {peers[best]:.2f} %, Δ {d:+.2f} pp: {verdict}."]
    return lines


TOOL_ORDER = {"mixq": 0, "ort": 1, "modelopt-onnx": 2, "modelopt-torch": 3, "qdrop-ref": 4}


def plot_key(r: dict[str, Any]) -> str:
    """One colour per tool setting; ModelOpt ONNX's max-calibrated timm rows share its default's."""
    if r["tool"] == "mixq":
        return f"mixq-onnx {r.get('method', 'rtn')} W{r['wbits']}A{r['abits']}"
    if r["tool"] == "modelopt-onnx":
        return "ModelOpt ONNX int8"
    if r["tool"] == "modelopt-torch":
        return "ModelOpt PyTorch int8"
    return f"onnxruntime {r['variant']}"


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """docs/peers.png, W8A8 rows, one group of bars per model: top-1 change from the float model (real
    models), engine layers relative to mixq-onnx rtn's engine, and hand-off layers; in the shared style."""
    from mixq_onnx.plotting import MINUS, SPARE_COLOURS, method_colour, save_figure, style

    ok = [r for r in results if r.get("status") == "ok" and r.get("group") != "ref"]
    w8 = sorted([r for r in ok if r["wbits"] == 8 and r["abits"] == 8],
                key=lambda r: (TOOL_ORDER.get(r["tool"], 9), r.get("method") != "rtn", r["variant"]))
    if not w8:
        return None
    keys = list(dict.fromkeys(plot_key(r) for r in w8))
    peers = [k for k in keys if not k.startswith("mixq")]
    colours = {k: method_colour("rtn" if " rtn " in k else "qdrop") if k.startswith("mixq")
               else SPARE_COLOURS[peers.index(k) % len(SPARE_COLOURS)] for k in keys}
    models = [m for m in MODELS if any(r["model"] == m for r in w8)]
    base = {r["model"]: r for r in w8 if r["tool"] == "mixq" and r["variant"] == "rtn-w8a8"}

    def value(panel: str, r: dict[str, Any]) -> float | None:
        if panel == "top1":
            return None if r.get("top1") is None or r.get("fp_top1") is None else r["top1"] - r["fp_top1"]
        if r.get("engine_layers") is None:
            return None
        if panel == "layers":
            b = base.get(r["model"])
            return None if b is None or b.get("engine_layers") is None else r["engine_layers"] - b["engine_layers"]
        return float(total_handoffs(r))

    panels = (("top1", "W8A8 top-1 change from float (pp)"),
              ("layers", "engine layers − mixq-onnx rtn W8A8's (label: count)"),
              ("handoffs", "hand-offs (reformat + requantize + float)"))
    with style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(4.2 + 2.6 * len(models), 3.8))
        width = 0.84 / max(len(keys), 1)
        for ax, (panel, title) in zip(axes, panels):
            ms = [m for m in models if panel != "top1" or MODELS[m][2]]
            for i, k in enumerate(keys):
                for j, m in enumerate(ms):
                    r = next((r for r in w8 if r["model"] == m and plot_key(r) == k), None)
                    if r is None:
                        continue
                    x = j + (i - (len(keys) - 1) / 2) * width
                    v = value(panel, r)
                    if v is None:
                        if panel != "top1":
                            ax.annotate("no engine", (x, 0), xytext=(0, 2), textcoords="offset points", rotation=90,
                                        ha="center", va="bottom", fontsize=5, color=colours[k])
                        continue
                    low = (r.get("int8_mac_fraction") if r.get("int8_mac_fraction") is not None else 1.0) < 0.99
                    ax.bar([x], [v], width * 0.9, color=colours[k], hatch="////" if low else None,
                           edgecolor="white" if low else None, linewidth=0)
                    if panel == "top1":
                        t = f"{'+' if v > 0 else MINUS if v < 0 else ''}{abs(v):.2f}"
                    elif panel == "layers":
                        t = f"{r['engine_layers']}"
                    else:
                        t = f"{v:.0f}"
                    ax.annotate(t, (x, v), xytext=(0, 2 if v >= 0 else -2), textcoords="offset points",
                                rotation=90, ha="center", va="bottom" if v >= 0 else "top", fontsize=5.5)
            ax.axhline(0, color="#333333", linewidth=0.6)
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels([m.replace("_100", "") for m in ms])
            ax.set_title(title)
            ax.margins(y=0.25)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in keys]
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="#999999", hatch="////", edgecolor="white"))
        fig.legend(handles, keys + ["hatched: engine runs < 99 % of its MACs in INT8"], loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(len(keys) + 1, 5))
        return save_figure(fig, path)


def mixq_layout(r: dict[str, Any]) -> str:
    """"shared" when the row's result folder quantizes each tensor once (quant.json config
    `share_quantizers`), else "per consumer" (the layout before sharing, or `--no-share-quantizers`)."""
    qj = WORK / r["model"] / r["id"] / "quant" / "quant.json"
    try:
        return "shared" if json.loads(qj.read_text())["config"].get("share_quantizers") else "per consumer"
    except (OSError, ValueError, KeyError):
        return "unknown"


def mixq_pools(r: dict[str, Any]) -> bool | None:
    """Whether the row's result folder averages integer codes in its global pool (quant.json config
    `integer_pools`, and a pool quantizer: a pool that feeds a float classifier has none); None when the
    folder cannot be read."""
    qj = WORK / r["model"] / r["id"] / "quant" / "quant.json"
    try:
        meta = json.loads(qj.read_text())
        return bool(meta["config"].get("integer_pools")) and any(q.get("placement") == "pool"
                                                                  for q in meta["quantizers"])
    except (OSError, ValueError, KeyError):
        return None


def findings(results: list[dict[str, Any]]) -> list[str]:
    """What the rows show about the tools' graphs, stated only where the measured rows show it."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("group") != "ref"]
    out = []
    int32 = sorted({r["model"] for r in ok if r["tool"] == "ort" and "Int32" in (r.get("engine_error") or "")})
    if int32:
        err = next(r["engine_error"] for r in ok if "Int32" in (r.get("engine_error") or ""))
        out.append(f"- onnxruntime's default `QuantizeBias` writes each bias as an INT32 initializer behind a "
                   f"DequantizeLinear; TensorRT-RTX's parser accepts only 8-bit/4-bit/FP8/FP4 DQ inputs, so those "
                   f"graphs build no engine ({', '.join(int32)}; the error's first and last lines: `{err}`). With "
                   f"`QuantizeBias=False` (the *minmax-float-bias* rows) the same quantization builds.")
    same = []
    for m in dict.fromkeys(r["model"] for r in ok):
        by = {r["variant"]: r for r in ok if r["model"] == m and r["tool"] == "ort"}
        if "minmax" in by and "entropy" in by and by["minmax"].get("sha256") == by["entropy"].get("sha256"):
            same.append(m)
    if same:
        out.append(f"- onnxruntime's Entropy calibrator wrote the very graph MinMax wrote (same sha256; "
                   f"{', '.join(same)}). Its defaults (`num_bins` = `num_quantized_bins` = 128) leave the KL search a "
                   f"single candidate threshold, the histogram's whole range, unless later batches widen it.")
    mo = [r for r in ok if r["tool"] == "modelopt-onnx" and (r.get("fp16") or r.get("float_compute_nodes"))]
    if mo:
        r = mo[0]
        out.append(f"- ModelOpt ONNX (`--quantize_mode int8`, defaults) converts the rest of the graph to FP16 "
                   f"and leaves {', '.join(r.get('float_compute_nodes') or []) or 'no'} unquantized "
                   f"({r['model']}): the classifier runs as one FP16 layer, one layer fewer than an INT8 GEMM "
                   f"followed by its float rescale epilogue.")
    for r in ok:
        if r["tool"] == "modelopt-torch" and r.get("float_compute_nodes") and r["model"] == "resnet8":
            out.append(f"- ModelOpt PyTorch left {len(r['float_compute_nodes'])} of {r.get('compute_nodes')} conv/GEMM "
                       "of MLPerf ResNet-8 float (int8 MAC fraction "
                       f"{r.get('int8_mac_fraction', 0):.3f}): the zoo's `SamePadConv` is an nn.Conv2d subclass with its own "
                       "forward (explicit TensorFlow 'same' padding), and `mtq.quantize` did not convert it. Its "
                       "top-1 and layer count are a float engine's; the goals below leave it out.")
    fewer_classifier = False
    for r in ok:
        if (r["tool"] == "mixq" and r["model"] == "resnet8" and r["variant"] == "rtn-w8a8"
                and (r.get("handoffs") or {}).get("requantize")):
            peer = next((p for p in ok if p["model"] == "resnet8" and p["variant"] == "minmax-float-bias"), None)
            out.append("- mixq-onnx on MLPerf ResNet-8 quantizes the classifier's input after the AveragePool, not "
                       "the pool's input: the last block's epilogue writes float, the pool runs in float and the "
                       f"QuantizeLinear is a kernel of its own ({r['handoffs']['requantize']} requantize layer, "
                       f"{r['handoffs'].get('float', 0)} float hand-offs, {r.get('engine_layers')} layers)"
                       + (f"; onnxruntime puts Q/DQ on both sides of the pool, which TensorRT-RTX runs in INT8 "
                          f"({peer.get('engine_layers')} layers)" if peer and peer.get("engine_layers") else "")
                       + ". ResNet-20's pooling is a ReduceMean that fuses into the last block's epilogue.")
        if r["tool"] == "mixq" and r["variant"] == "rtn-w8a8" and r.get("engine_layers"):
            mo = next((p for p in ok if p["model"] == r["model"] and p["tool"] == "modelopt-onnx"
                       and p.get("engine_layers") and p["engine_layers"] < r["engine_layers"]), None)
            if mo is not None:
                out.append(f"- {r['model']}: ModelOpt ONNX's engine has {r['engine_layers'] - mo['engine_layers']} "
                           f"layer(s) fewer than mixq-onnx's ({mo['engine_layers']} vs {r['engine_layers']}) because it "
                           "runs the classifier (and what feeds it after the last block) in FP16: one fused GEMM+bias layer, "
                           "where an INT8 GEMM (mixq-onnx, onnxruntime) needs its float rescale epilogue as a second "
                           "layer.")
                fewer_classifier = True
    if fewer_classifier:
        out.append("- Tried against that layer (2026-11-29, ResNet-20 qdrop W8A8's graph rewritten by hand): the INT8 "
                   "classifier as a 1×1 Conv on the pool's [N, 64, 1, 1] codes, so that TensorRT might fuse its "
                   "rescale and bias as it does a conv's. onnxruntime gave the same logits bit for bit, but the engine "
                   "had 43 layers instead of 42: the rescale stayed a kernel of its own and the pool's requantize "
                   "split off into another (1 float hand-off). The Gemm form stays.")
        out.append("- Tried again (2026-12-01, ResNet-20 rtn W8A8's graph rewritten by hand, TensorRT-RTX on this CPU): "
                   "the rescale as one scalar, the rescale and bias as Gemm's alpha and C, and the per-channel rescale "
                   "folded into the weights' DequantizeLinear with the bias as C. Every variant built 42 layers: the "
                   "INT8 GEMM, then a float epilogue kernel of its own. No form of an INT8 classifier found here "
                   "reaches ModelOpt ONNX's single FP16 layer.")
    rtn = {r["model"]: (r.get("handoffs") or {}).get("float", 0) for r in ok
           if r["tool"] == "mixq" and r["variant"] == "rtn-w8a8"}
    qd = [r for r in ok if r["tool"] == "mixq" and r.get("method") == "qdrop"
          and (r.get("handoffs") or {}).get("float", 0) > rtn.get(r["model"], 0)]
    if qd:
        out.append("- mixq-onnx qdrop rows with more float hand-offs than rtn's: a per-consumer layout "
                   "(`--no-share-quantizers`, or a result folder written before quantizer sharing) learns one step "
                   "for the next convolution's input and another for the residual identity, so the engine writes "
                   "the tensor twice, as INT8 and as float (" + ", ".join(
                       f"{r['model']} {r['variant']} {r['handoffs']['float']}" for r in qd) + "; rtn: "
                   + ", ".join(f"{m} {v}" for m, v in rtn.items()) + ").")
    layouts = {r["id"]: mixq_layout(r) for r in ok if r["tool"] == "mixq"}
    shared = sorted(k for k, v in layouts.items() if v == "shared")
    if shared:
        out.append(f"- mixq-onnx rows in the shared layout (one quantizer per tensor and grid, the default): "
                   f"{len(shared)} of {len(layouts)}"
                   + (f"; per consumer (measured before sharing): {', '.join(sorted(k for k, v in layouts.items() if v != 'shared'))}"
                      if len(shared) < len(layouts) else "") + ".")
    pools = {r["id"]: mixq_pools(r) for r in ok if r["tool"] == "mixq" and r.get("group") != "ref"}
    if any(v is not None for v in pools.values()):
        ints = sorted(k for k, v in pools.items() if v)
        out.append(f"- mixq-onnx rows whose global pool averages INT8 codes (integer pools, the default): {len(ints)} "
                   f"of {len(pools)}" + (f"; float pool (measured before integer pools, or feeding a float "
                                         f"classifier): {', '.join(sorted(k for k, v in pools.items() if not v))}"
                                         if len(ints) < len(pools) else "") + ".")
    for m in dict.fromkeys(r["model"] for r in ok):
        rq = {label(r): r["handoffs"]["requantize"] for r in ok if r["model"] == m and r.get("handoffs")
              and r["wbits"] == 8 and r["abits"] == 8}
        peers_rq = {k: v for k, v in rq.items() if not k.startswith("mixq")}
        mine_rq = {k: v for k, v in rq.items() if k.startswith("mixq")}
        if peers_rq and mine_rq and max(peers_rq.values()) >= 10 and max(peers_rq.values()) > max(mine_rq.values()):
            out.append(f"- {m}: standalone requantize kernels (layers running only Q/DQ): "
                       + ", ".join(f"{k} {v}" for k, v in rq.items())
                       + ". onnxruntime and ModelOpt ONNX quantize both the BatchNorm output and the ReLU6 (Clip) "
                         "output, and the engine runs those Q→DQ→Clip→Q chains (and lone QuantizeLinears) as kernels "
                         "of their own; mixq-onnx's are lone QuantizeLinear kernels at block boundaries (a residual's "
                         "identity, a block's first input).")
    ho = [r for r in ok if r["tool"] == "modelopt-torch" and (r.get("handoffs") or {}).get("float")]
    if ho:
        out.append("- ModelOpt PyTorch (`INT8_DEFAULT_CFG`) quantizes the inputs of its quantized modules (Conv, Linear, "
                   "pooling) but not the residual Adds' identity inputs: those read float tensors, which the engine passes between kernels in float "
                   "(" + ", ".join(f"{r['model']} {r['handoffs']['float']}" for r in ho) + " float hand-offs).")
    return out


def render(results: list[dict[str, Any]], command: str) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    fp_eng = {}
    for m in MODELS:
        p = WORK / m / "prepared.json"
        if p.is_file():
            fp_eng[m] = json.loads(p.read_text()).get("fp_engine")
    versions = sorted({r.get("tool_version") for r in ok if r.get("tool_version") and r["tool"] != "qdrop-ref"})
    if any(r["tool"] == "qdrop-ref" for r in ok):
        commit = next((r.get("reference_commit") for r in ok if r.get("reference_commit")), None)
        if commit is None and (QDROP_SRC / "COMMIT").is_file():
            commit = (QDROP_SRC / "COMMIT").read_text().strip()
        versions.append(f"wimh966/QDrop at {commit[:12] if commit else '?'}")
    lines = [
        "## peers: mixq-onnx against other INT8 PTQ tools (issue 15)",
        "",
        "Rows measured by " + ", ".join(f"`{c}`" for c in dict.fromkeys(
            [r["bench_cmd"] for r in results if r.get("bench_cmd")] or [command])) + f" · rendered {stamp()}",
        "",
        "Same inputs for every tool: 1,024 calibration images (the `calib --generator real --num 1024` cache of "
        "`cifar10_train_calib.npz`, exported as `runs/peers/calib1024.npz` and, preprocessed, as the peers' "
        "calibration array) and the float ONNX graph of `mixq-onnx export --fp` (for the ONNX-level peers). "
        "*top-1*: all 5,000 images of `cifar10_test_dev.npz` through onnxruntime with `ORT_DISABLE_ALL`, on the "
        "graph each tool exported; *agree*: top-1 agreement with the float graph. *quantize s*: wall time of the "
        "tool's subprocess from the float model to its quantized ONNX file (interpreter start and imports "
        "included), one thread (`--threads 1`), on 2 cores shared with other jobs. *Engine*: TensorRT-RTX "
        "build on this CPU, `--batch 1:8:32`, strongly typed; *reformat / requant / float hand-offs*: layers "
        "whose type is a reformat/shuffle/copy; layers running only Q/DQ nodes (standalone int8↔float "
        "conversions); tensors passed in float between two non-compute kernels (inspect's float hand-offs). "
        "Peers run in their own virtual environments (`runs/peers/venvs/`), through the drivers in "
        "`tools/peers/`; onnxruntime: `quant_pre_process`, then `quantize_static` QDQ, per-channel symmetric "
        "INT8 weights, symmetric INT8 activations (TensorRT takes zero point 0 only).",
        "",
        "Versions: " + ("; ".join(versions) if versions else "–"),
        "",
    ]
    if fp_eng:
        lines.append("Float engines (same build): " + "; ".join(
            f"{m} {e['engine_layers']} layers" for m, e in fp_eng.items() if e) + ".")
        lines.append("")
    lines += render_table(results)
    f = findings(results)
    if f:
        lines += ["", "What the graphs show:", ""] + f
    lines += ["", "### QDrop: mixq-onnx against the reference code (wimh966/QDrop)", "",
              f"ResNet-20, the same 1,024 images, {FAST_ITERS} iterations per block (mixq-onnx's `--preset fast`); the "
              "reference keeps its own W2A4 config otherwise (asymmetric MSE-observed quantizers, AdaRound weights, "
              "LSQ activations, lr 4e-5, drop 0.5, batch 32, first/last layer 8-bit); mixq-onnx runs `--method qdrop "
              "--asymmetric --preset fast` (the same setting). Both judged in PyTorch fake-quant (the reference "
              "exports no ONNX), measured in one run, interleaved (reference, mixq-onnx, reference, mixq-onnx), "
              "one thread each. *quantize s*: calibration + reconstruction in-process (the reference adapter's clock "
              "around its `main` steps; mixq-onnx's `quant.json` report), the like-for-like time; *process s*: the "
              "whole subprocess (the reference adapter also evaluates the float and quantized models on 5,000 "
              "images; mixq-onnx's `quantize` command alone, model load and result writing included). mixq-onnx "
              "holds out 10 % of the 1,024 images for its holdout diagnostics and reconstructs on the rest; the "
              "reference uses all 1,024. The reference keeps the learning rates of its 20,000-iteration config "
              "(activation steps 4e-5 with a cosine decay, AdaRound's Adam at its default 1e-3); mixq-onnx's fast "
              "preset was set for 400 iterations (4e-4 and 3e-3): at equal iterations this measures the two recipes "
              "at 400 iterations, not the algorithms at convergence (20,000 iterations per block is about 50x these "
              "times on this CPU, not run).", ""]
    lines += render_ref(results)
    ref_mixq = [r for r in ok if r.get("group") == "ref" and r["tool"] == "mixq"]
    if ref_mixq:
        lines += ["", "mixq-onnx's quantizer layout in these rows: " + ", ".join(
            f"{r['variant']} {mixq_layout(r)}" for r in ref_mixq) + " (per consumer: measured before quantizer "
            "sharing; the reference, like the shared layout, quantizes each block's output once, and that one tensor "
            "feeds both the next block's first convolution and its shortcut)."]
    lines += ["", "### Goals (measured, not tuned for)", ""] + goals(results)
    draws = load_draws()
    for name in DRAW_MODELS:
        table = render_draws(results, draws, name)
        if not table:
            continue
        mine = [r for r in draws if r.get("model", "resnet20") == name]
        cmds = ", ".join(f"`{c}`" for c in dict.fromkeys(r["bench_cmd"] for r in mine if r.get("bench_cmd")))
        lines += ["", f"### {name} W8A8 over calibration draws", "",
                  f"The W8A8 goal is read on one sample of 1,024 calibration images. The same W8A8 rows on other "
                  f"samples (`calib --generator real --num {N_CALIB} --seed s`: another seeded 1,024 of the 5,000 "
                  f"train images), judged as above on all 5,000 test images, accuracy only (the engines' structure "
                  f"does not depend on the sample). Draw 0 is the table's row. Measured by {cmds}; the draws were "
                  "chosen before any ran, and no setting was picked on them. *Δ mean*: the mean of the per-draw "
                  "differences from mixq-onnx qdrop w8a8, ± their standard error over the draws.", ""] + table
        lines += render_diagnosis(name)
    missing = [r for r in results if r.get("status") != "ok"]
    lines += ["", "### Not measured yet / failed", ""]
    have = {r["id"] for r in results}
    todo = [r for r in rows(list(MODELS)) if r["id"] not in have]
    if missing:
        lines += [f"- {r['id']}: failed: `{r.get('error')}`" for r in missing]
    if todo:
        by: dict[str, list[str]] = {}
        for r in todo:
            by.setdefault(r["model"], []).append(r["id"].removeprefix(r["model"] + "-"))
        lines += [f"- not run yet, {m}: {', '.join(v)} (`python tools/bench_peers.py --models {m} --threads 1` "
                  f"runs what is missing)" for m, v in by.items()]
    if not missing and not todo:
        lines.append("- nothing: every row has a result")
    lines += ["", "![peers](peers.png)"]
    return "\n".join(lines)


def run_rows(todo: list[dict[str, Any]], result_path: Any, command: str, redo: bool,
             after: Any = None) -> None:
    """Run each row not yet done (or all, `redo`) that no other bench process has claimed, preparing each
    (model, draw) once; write its result json, then call `after()` (a re-render)."""
    infos: dict[tuple[str, int], dict[str, Any]] = {}
    for r in todo:
        if not redo and result_path(r).is_file():
            continue  # done, or another bench process finished it meanwhile
        if not claim(r["id"]):
            print(f"{r['id']}: another bench process is running it", flush=True)
            continue
        key = (r["model"], r.get("draw", 0))
        if key not in infos:
            print(f"prepare {r['model']}{f' draw {key[1]}' if key[1] else ''} ...", flush=True)
            infos[key] = prepare(*key)
        t = time.perf_counter()
        res = run_row(r, infos[key])
        res["date"] = time.strftime("%Y-%m-%d %H:%M")
        res["bench_cmd"] = command
        result_path(r).write_text(json.dumps(res, indent=1))
        print(f"{r['id']}: {res['status']} top1 {res.get('top1')} agree {res.get('agreement')} "
              f"quantize {res.get('quantize_s')} s, engine {res.get('engine_layers')} layers "
              f"{res.get('handoffs')} ({time.perf_counter() - t:.0f} s) {res.get('error') or res.get('engine_error') or ''}",
              flush=True)
        (RESULTS / f"{r['id']}.running").unlink(missing_ok=True)
        if after is not None:
            after()


def run_engines(models: list[str], command: str, redo: bool) -> None:
    """--engines: the engine rows, resumable like the table's, rendered into their own section."""
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"unknown model(s): {', '.join(bad)}; choose from {', '.join(MODELS)}")
    ENGINES.mkdir(parents=True, exist_ok=True)
    run_rows(engine_rows(models), lambda r: ENGINES / f"{r['id']}.json", command, redo)
    done = {p.stem: json.loads(p.read_text()) for p in ENGINES.glob("*.json")}
    everything = engine_rows([m for m in MODELS if any(k.startswith(f"{m}-") for k in done)])
    update_section("peers-engines", render_engines([done.get(r["id"], r) for r in everything], command))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--only", default="all", help=f"comma list of groups ({', '.join(GROUPS)}) or tools")
    ap.add_argument("--quick", action="store_true", help="ResNet-20 only: every peer, mixq rtn W8A8 and qdrop W4A4")
    ap.add_argument("--threads", type=int, default=1, help="threads of every tool (OMP_NUM_THREADS) [1]")
    ap.add_argument("--redo", action="store_true", help="re-run rows that have a result")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs section and plot from the results")
    ap.add_argument("--render-anyway", action="store_true",
                    help="rewrite section peers even where it would drop rows of models with no results on disk")
    ap.add_argument("--draws", default="",
                    help=f"comma list of calibration seeds >= 1: run the W8A8 rows of --models (of "
                         f"{', '.join(DRAW_MODELS)}) on those samples of {N_CALIB} images instead of the table's rows "
                         "(accuracy only)")
    ap.add_argument("--diagnose-residuals", action="store_true",
                    help=f"for --models (of {', '.join(DRAW_MODELS)}): mixq-onnx rtn W8A8 with the residual-identity "
                         "quantizers off, ModelOpt PyTorch's placement (top-1 and agreement in PyTorch)")
    ap.add_argument("--engines", action="store_true",
                    help="only the W8A8 graphs' engines (mixq rtn, its float classifier, onnxruntime minmax float "
                         "bias, ModelOpt ONNX and PyTorch) of --models, into section peers-engines")
    ap.add_argument("--remeasure", action="store_true",
                    help="re-judge finished rows (graph, onnxruntime accuracy, engine) without re-quantizing")
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    command = "python tools/bench_peers.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.engines:
        run_engines([m for m in a.models.split(",") if m], command, a.redo)
        return
    if a.diagnose_residuals:
        DIAG.mkdir(parents=True, exist_ok=True)
        for m in [m for m in a.models.split(",") if m in DRAW_MODELS]:
            res = {**diagnose_residuals(m), "bench_cmd": f"`{command}`"}
            (DIAG / f"{m}-residuals.json").write_text(json.dumps(res, indent=1))
            print(json.dumps(res), flush=True)
        write_table(command, a.render_anyway)
        return
    if a.remeasure:
        for p in sorted(RESULTS.glob("*.json")):
            res = json.loads(p.read_text())
            if res.get("status") != "ok" or res["model"] not in a.models.split(","):
                continue
            for k in ("engine_error", "eval_error"):
                res.pop(k, None)
            res = measure(res, prepare(res["model"]))
            p.write_text(json.dumps(res, indent=1))
            print(f"remeasured {res['id']}", flush=True)
    elif not a.render:
        if not (SHARED / "models").is_dir():
            sys.exit(f"../shared not found at {SHARED}")
        models = ["resnet20"] if a.quick else [m for m in a.models.split(",") if m]
        bad = [m for m in models if m not in MODELS]
        if bad:
            sys.exit(f"unknown model(s): {', '.join(bad)}; choose from {', '.join(MODELS)}")
        draws = sorted({int(x) for x in a.draws.split(",") if x.strip()})
        if any(d < 1 for d in draws):
            sys.exit("--draws: seeds >= 1 (seed 0 is the table's sample)")
        if draws and not set(models) & set(DRAW_MODELS):
            sys.exit(f"--draws: --models must name one of {', '.join(DRAW_MODELS)}")

        def result_path(r: dict[str, Any]) -> Path:
            return (DRAWS if r.get("draw") else RESULTS) / f"{r['id']}.json"
        DRAWS.mkdir(parents=True, exist_ok=True)
        todo = draw_rows(draws, [m for m in DRAW_MODELS if m in models]) if draws else rows(models, a.only, a.quick)
        todo = [r for r in todo if a.redo or not result_path(r).is_file()]
        print(f"{len(todo)} rows to run", flush=True)
        run_rows(todo, result_path, command, a.redo, after=lambda: write_table(command, a.render_anyway))
    write_table(command, a.render_anyway)


if __name__ == "__main__":
    main()
