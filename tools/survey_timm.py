"""How far `quantize -> export -> check -> verify` gets on timm architectures beyond the ones the tests cover:
random weights (`pretrained=False`), W8A8 round to nearest on 4 random images, the exported graph's `check`
verdict (errors and warnings by rule), the layers `quantize` left float (`unquantized_layers`), and `verify` on 2
random images (max |diff| against PyTorch). A survey, not a bar: it lists what to fix next.

    python tools/survey_timm.py --jobs 2        # writes docs/benchmarks.md, section "timm-survey"

Each model runs in its own process (`--one NAME`), so a crash or a hang is that row's, not the survey's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import ROOT, stamp, update_section  # noqa: E402

sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed

#: (timm name, input size): CNN families and vision transformers the test suite does not build
MODELS = (("regnety_002", 64), ("mobilenetv3_small_050", 64), ("ghostnet_050", 64), ("rexnet_100", 64),
          ("mixnet_s", 64), ("densenet121", 64), ("dla34", 64), ("dpn68", 64), ("vgg11_bn", 64),
          ("cspresnet50", 64), ("darknet53", 64), ("repvgg_a0", 64), ("tf_efficientnetv2_b0", 64),
          ("nf_regnet_b0", 64), ("regnetx_002", 64), ("ese_vovnet19b_dw", 64), ("selecsls42b", 64),
          ("gernet_s", 64), ("hardcorenas_a", 64), ("lcnet_050", 64), ("tinynet_e", 64), ("mnasnet_small", 64),
          ("fbnetc_100", 64), ("repghostnet_050", 64), ("hgnetv2_b0", 64), ("mobilenetv4_conv_small", 64),
          ("poolformer_s12", 224), ("pit_ti_224", 224), ("coat_lite_tiny", 224), ("convit_tiny", 224),
          ("efficientformer_l1", 224), ("mobilevit_xxs", 224), ("efficientvit_b0", 224), ("fastvit_t8", 224),
          ("edgenext_xx_small", 224), ("tiny_vit_5m_224", 224), ("vit_tiny_patch16_224", 224),
          ("xcit_nano_12_p16_224", 224), ("gcvit_xxtiny", 224), ("inception_next_tiny", 224),
          ("resmlp_12_224", 224), ("levit_128s", 224),
          # added 2026-12-02 (after placement revision 4)
          ("convnextv2_atto", 64), ("mobileone_s0", 64), ("repvit_m0_9", 64), ("ghostnetv2_100", 64),
          ("mobilenetv4_hybrid_medium", 64), ("starnet_s1", 64), ("vovnet39a", 64), ("res2net50_14w_8s", 64),
          ("resnest14d", 64), ("cs3darknet_s", 64), ("tinynet_a", 64), ("xception41", 64), ("inception_v3", 96),
          ("efficientformerv2_s0", 224), ("efficientvit_m0", 224), ("shvit_s1", 224), ("pvt_v2_b0", 224),
          ("twins_svt_small", 224), ("davit_tiny", 224), ("caformer_s18", 224))


def one(spec: str, size: int) -> dict:
    """One row, in this process."""
    import tempfile

    import torch

    from mixq_onnx.errors import MixqError
    from mixq_onnx.models import load_model
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.onnx.check import check_model
    from mixq_onnx.onnx.verify import verify_onnx
    from mixq_onnx.quant import QuantConfig, quantize

    torch.set_num_threads(1)
    row: dict = {"model": spec, "size": size}
    t0 = time.perf_counter()
    try:
        model = load_model(spec, random_init=True, input_size=size)
        calib = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
        row["unquantized"] = len(q.mixq_report.get("unquantized_layers", []))
        with tempfile.TemporaryDirectory() as tmp:
            g = export_qdq(q, Path(tmp) / "m.onnx")
            vs = check_model(g)
            row["errors"] = dict(Counter(v.rule for v in vs if v.severity == "error"))
            row["warnings"] = dict(Counter(v.rule for v in vs if v.severity != "error"))
            images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
            row["verify_max_abs_diff"] = verify_onnx(g, q, images).max_abs_diff
        row["status"] = "ok"
    except MixqError as e:
        row["status"], row["message"] = "refused", str(e)[:200]
    except Exception as e:  # noqa: BLE001 - a survey row: a traceback is what it reports
        row["status"], row["message"] = "crash", f"{type(e).__name__}: {str(e)[:200]}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run(spec: str, size: int) -> dict:
    try:
        r = subprocess.run([sys.executable, __file__, "--one", f"{spec}:{size}"], capture_output=True, text=True,
                           timeout=900)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError) as e:
        return {"model": spec, "size": size, "status": "crash", "message": f"no result ({type(e).__name__})"}


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((d or {}).items())) or "–"


def render(rows: list[dict]) -> str:
    lines = ["## timm-survey: quantize, export, check and verify on further timm architectures", "",
             f"`python tools/survey_timm.py --jobs 2` · {stamp()}", "", (__doc__ or "").split("\n\n")[0].replace("\n", " "),
             "", "| model | input | status | layers left float | check errors | check warnings | verify max abs diff | s |",
             "|---|---:|---|---:|---|---|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['size']} | {r['status']}: {r.get('message', '')} | | | | | "
                         f"{r.get('seconds', '')} |")
            continue
        lines.append(f"| {r['model']} | {r['size']} | ok | {r['unquantized']} | {_counts(r['errors'])} | "
                     f"{_counts(r['warnings'])} | {r['verify_max_abs_diff']:.2g} | {r['seconds']} |")
    ok = [r for r in rows if r["status"] == "ok"]
    clean = [r["model"] for r in ok if not r["errors"]]
    lines += ["", f"{len(clean)} of {len(rows)} pass `check` with no error; "
              f"{sum(1 for r in ok if r['verify_max_abs_diff'] == 0)} verify with max |diff| 0 (random images; a float "
              "op such as softmax or LayerNorm rounds differently in onnxruntime, and a code it flips propagates)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="models surveyed side by side (one thread each)")
    ap.add_argument("--no-doc", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # NAME:SIZE, in a child process
    args = ap.parse_args()
    if args.one:
        spec, size = args.one.rsplit(":", 1)
        print(json.dumps(one(spec, int(size))))
        return
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda m: run(*m), MODELS))
    text = render(rows)
    print(text)
    if not args.no_doc:
        update_section("timm-survey", text)


if __name__ == "__main__":
    main()
