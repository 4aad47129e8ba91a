"""Measure the `inversion` generator on the real CIFAR-10 ResNet-20.

Generates --num images (default 256) with mixup k=2 soft targets over the CIFAR-10 classes, in
shards of --shard images (default 128: one optimisation batch per shard), by calling the
generator directly (no cache), and prints wall time, the BN loss before/after (mean over shards),
and which classes the full-precision model predicts on the images.

    python tools/measure_inversion.py --checkpoint ../shared/models/resnet20-12fca82f.th
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixq_onnx.calib.classes import load_classes  # noqa: E402
from mixq_onnx.calib.generators.base import GenContext  # noqa: E402
from mixq_onnx.calib.generators.inversion import DEFAULTS, InversionGenerator  # noqa: E402
from mixq_onnx.calib.prompts import PromptConfig, plan_images  # noqa: E402
from mixq_onnx.models import load_model  # noqa: E402
from mixq_onnx.utils import shared_root  # noqa: E402


def write_docs(args, wall, cpu, start, end, n_cls, in_plan, hist, vocab) -> None:
    import sys as _sys
    from pathlib import Path as _P

    _sys.path.insert(0, str(_P(__file__).resolve().parent))
    from benchmd import stamp, update_section

    cmd = "python tools/measure_inversion.py " + " ".join(_sys.argv[1:])
    body = "\n".join([
        "## Data-free calibration: BN-statistics inversion on ResNet-20 (issue 2)",
        "",
        f"`{cmd}` · {stamp()}",
        "",
        "| images | shard | threads | wall s | CPU s | BN loss start | BN loss end | classes predicted | pred in target pair |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.num} | {args.shard} | {torch.get_num_threads()} | {wall:.1f} | {cpu:.1f} | {start:.2f} | {end:.2f} | "
        f"{n_cls} / {len(vocab)} | {in_plan} / {args.num} |",
        "",
        "Prediction histogram: " + ", ".join(f"{vocab.names[c]} {hist.get(c, 0)}" for c in range(len(vocab))),
    ])
    update_section("calib", body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--checkpoint", default=str(shared_root() / "models" / "resnet20-12fca82f.th"))
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--shard", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="mixup", choices=("mixup", "single", "mixup-embed", "none"))
    ap.add_argument("--k", type=int, default=2)
    for key, val in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None,
                        type=(str if isinstance(val, bool) else type(val)), help=f"default {val}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--save", default=None, help="write the images and plans to this .npz")
    ap.add_argument("--json", action="store_true", help="also print the per-shard stats as JSON")
    ap.add_argument("--write-docs", action="store_true", help="write the result into docs/benchmarks.md")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.checkpoint)
    vocab = load_classes("cifar10")
    cfg = PromptConfig(args.strategy, k=args.k)
    options = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    ctx = GenContext(num=args.num, seed=args.seed, size=32, prompts=cfg, vocab=vocab, model=model,
                     device=torch.device("cpu"), options=options, log=print)
    gen = InversionGenerator(ctx)
    gen.validate()
    print("recipe:", json.dumps(gen.recipe(), sort_keys=True))
    print(f"threads: {torch.get_num_threads()}  images: {args.num}  shard size: {args.shard}")

    images, extras, stats, plans_all = [], [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for si, start in enumerate(range(0, args.num, args.shard)):
        plans = plan_images(cfg, vocab, args.seed, start, min(args.num, start + args.shard))
        out = gen.generate(si, plans)
        images.append(out.images)
        extras.extend(out.extra)
        stats.append(out.stats)
        plans_all.extend(plans)
        print(f"shard {si}: {len(plans)} images, BN loss {out.stats['bn_loss_start']:.3f} -> "
              f"{out.stats['bn_loss_end']:.3f}, CE end {out.stats.get('ce_end')}, {out.stats['seconds']:.1f} s")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    imgs = torch.cat(images)
    assert imgs.dtype == torch.uint8 and tuple(imgs.shape) == (args.num, 32, 32, 3)

    preds = [e["fp_pred"] for e in extras]
    hist = Counter(preds)
    in_plan = sum(1 for e, p in zip(extras, plans_all) if e["fp_pred"] in p.classes)
    mean_start = sum(s["bn_loss_start"] for s in stats) / len(stats)
    mean_end = sum(s["bn_loss_end"] for s in stats) / len(stats)
    print(f"\nwall time: {wall:.1f} s for {args.num} images ({wall / args.num * 1000:.0f} ms/image); "
          f"process CPU time {cpu:.1f} s on {torch.get_num_threads()} thread(s)")
    print(f"BN loss (mean over {len(stats)} shards, on the stored uint8 images): "
          f"{mean_start:.3f} -> {mean_end:.3f} ({mean_end / mean_start:.1%} of start)")
    print(f"FP model predicts {len(hist)} of {len(vocab)} classes; "
          f"prediction is one of the image's target classes for {in_plan}/{args.num}")
    print(f"mean FP max-probability: {sum(e['fp_prob'] for e in extras) / len(extras):.3f}")
    print("prediction histogram:")
    for c in range(len(vocab)):
        print(f"  {c} {vocab.names[c]:<11} {hist.get(c, 0):4d} {'#' * hist.get(c, 0)}")
    if args.json:
        print(json.dumps(stats, indent=1))
    if args.write_docs:
        write_docs(args, wall, cpu, mean_start, mean_end, len(hist), in_plan, hist, vocab)
    if args.save:
        import numpy as np

        np.savez_compressed(args.save, x=imgs.numpy(), y=np.array(preds),
                            classes=np.array([list(p.classes) for p in plans_all]))
        print(f"saved {args.save}")
    return 0 if len(hist) >= 8 else 1


if __name__ == "__main__":
    sys.exit(main())
