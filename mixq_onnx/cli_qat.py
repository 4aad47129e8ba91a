"""`qat`: quantization-aware training (NIPQ mixed precision, LSQ baseline), registered onto the main group.

Light at module level like the rest of the CLI (click and the standard library): torch and the training code
load inside the command body."""
from __future__ import annotations

from typing import Any

import click

from .cli_common import (
    BITS,
    CONTEXT,
    FINITE,
    POSITIVE,
    Range,
    augment_option,
    compute_command,
    read_paths,
    warn_unquantized,
)
from .registry import LOSSES

#: The model flags, taken from `robustify` so both commands spell and document them the same way.
MODEL_PARAMS = ("model", "checkpoint", "random_weights", "mean", "std", "input_size")


def register(cli: click.Group) -> None:
    """Add `qat` to `cli` (after `robustify`, whose model flags it shares)."""

    @cli.command(context_settings=CONTEXT)
    @click.option("--data", "data_src", required=True, metavar="SRC",
                  help="A calibration cache (data-free: KD from the original model) or labelled images (npz or "
                       "folder: cross-entropy, plus KD with --kd-weight).")
    @click.option("--method", type=click.Choice(["nipq", "lsq"]), default="nipq", show_default=True,
                  help="nipq: learned bits and ranges under --target-bits/--target-gbops; lsq: fixed --wbits/"
                       "--abits with LSQ steps (the baseline), on the same schedule.")
    @click.option("--out", required=True, type=click.Path(), help="Output directory (quant.json, weights.safetensors, "
                                                                  "qat.json, bits.png).")
    @click.option("--target-bits", type=FINITE, default=None, metavar="B",
                  help="nipq budget: average bits of the weights (by parameter count) and of the activations (by "
                       "tensor size), each, in [2, 8]; the frozen bits land within 0.05 when the layers allow it.")
    @click.option("--budget-over", type=click.Choice(["all", "learned"]), default="all", show_default=True,
                  help="nipq: what --target-bits averages over. all: every quantizer, the fixed first/last layers' "
                       "too (the network's real average); learned: only those whose bits are learned, so that the "
                       "budget means what W4A4 means with 8-bit first/last layers (a pool feeding a fixed layer "
                       "then takes that layer's bits, as quantize gives it).")
    @click.option("--target-gbops", type=FINITE, default=None, metavar="G",
                  help="nipq budget instead: sum over Conv/Linear of k*k*Cin*Cout/groups*H*W*b_w*b_a per image, "
                       "in 1e9 (within 5 %).")
    @click.option("--wbits", type=BITS, default=None, help="lsq: weight bits [default: 4].")
    @click.option("--abits", type=BITS, default=None, help="lsq: activation bits [default: 4].")
    @click.option("--max-bits", type=Range(2, 8, also=(16,), why="a layer that learns more than 8 bits stays float"),
                  default=8, show_default=True,
                  help="Cap of a learned bit-width at deployment (2-8), or 16: a layer whose weights or input "
                       "learn more than 8 bits (up to NIPQ's 14) stays float, with no Q/DQ, and is listed as such.")
    @click.option("--first-last-bits", type=Range(2, 8, also=(0,), why="learned"), default=8, show_default=True,
                  help="Fixed bits of the first and last layer (0: learned like the rest).")
    @click.option("--noise", type=click.Choice(["hist", "uniform"]), default="hist", show_default=True,
                  help="nipq noise: the histogram of the real normalised rounding error, or U(-0.5, 0.5).")
    @click.option("--epochs", type=Range(1), default=10, show_default=True,
                  help="nipq: noise epochs; lsq: first-phase epochs.")
    @click.option("--final-epochs", type=Range(0), default=2, show_default=True,
                  help="Hard-quantization fine-tuning with frozen bits (STE) at the end (0: none).")
    @click.option("--lr", type=FINITE, default=1e-3, show_default=True, help="Weights: SGD, cosine to 0 per phase.")
    @click.option("--qlr", type=FINITE, default=2e-2, show_default=True,
                  help="nipq: learned bits and ranges in the noise phase.")
    @click.option("--step-lr", type=FINITE, default=2e-3, show_default=True,
                  help="LSQ step sizes in the hard-quantization phases (lsq, and nipq's final phase).")
    @click.option("--final-lr", type=FINITE, default=None, help="Weights in the final phase [default: --lr].")
    @click.option("--schedule", type=click.Choice(["restart", "continuous"]), default="restart", show_default=True,
                  help="restart: each phase anneals its own cosine to 0; continuous: the phases are consecutive "
                       "slices of one cosine over --epochs + --final-epochs (the official NIPQ code's scheduler).")
    @click.option("--train-biases/--no-train-biases", default=False, show_default=True,
                  help="Also learn each quantized layer's float bias (the folded BatchNorm shift, which quantization "
                       "moves), with the weights' learning rate; stored in weights.safetensors.")
    @click.option("--max-update", type=FINITE, default=0.01, show_default=True,
                  help="Trust region: each weight or step tensor's gradient is scaled down so that lr x |grad| is at "
                       "most this fraction of the tensor's norm (momentum can add up over steps). Lower it (e.g. 0.001) for a network whose gradients "
                       "dwarf its weights, such as a BN-folded one fed raw 0..255 pixels.")
    @click.option("--budget-weight", type=FINITE, default=1.0, show_default=True, help="nipq: weight of the budget penalty.")
    @click.option("--budget-rate", type=FINITE, default=0.0, show_default=True,
                  help="nipq: dual ascent on the budget: each average's (or the GBOPs') Lagrange multiplier grows by "
                       "this rate x its gap (clipped at 0.1 bit) every step, so a tight target is reached while the "
                       "noise phase still trains (0: the fixed penalty alone, as the official code). 0.1 with "
                       "--range-init lp made ResNet-20's labelled 3-bit NIPQ stable (docs/benchmarks.md, qat).")
    @click.option("--range-init", type=click.Choice(["official", "lp"]), default="official", show_default=True,
                  help="nipq: initial ranges. official: max|w| per channel, 6 (non-negative activations) or 3 "
                       "(signed), or the observed 99.9th percentile of |x| where larger; lp: quantize's Lp-optimal "
                       "range at the budget's bits (per channel for weights).")
    @click.option("--init-bits", type=FINITE, default=8.0, show_default=True,
                  help="nipq: the bit-width every learned quantizer starts the noise phase at, in [2, 14).")
    @click.option("--loss", type=click.Choice(LOSSES), default="auto", show_default=True,
                  help="auto: KD on a cache, CE on labelled data; ce needs labels; kd on labelled data adds KD "
                       "(--kd-weight 1 unless given).")
    @click.option("--kd-weight", type=FINITE, default=None, help="KD weight next to CE on labelled data [default: 0].")
    @augment_option()
    @click.option("--batch-size", type=POSITIVE, default=128, show_default=True, help="Training images per SGD step.")
    @click.option("--seed", type=Range(0), default=0, show_default=True,
                  help="Seed of the training image order and of the noise.")
    @click.option("--limit", type=POSITIVE, default=None, metavar="N",
                  help="Train on a seeded, class-stratified sample of N images (a random one for unlabelled data or "
                       "a synthetic cache), never the first N.")
    @click.option("--cache-root", type=click.Path(file_okay=False), default=None,
                  help="Cache root [default: $MIXQ_CACHE_ROOT or ./calib_cache].")
    @click.option("--overwrite", is_flag=True,
                  help="Replace quant.json, weights.safetensors, qat.json and bits.png in a non-empty --out.")
    @click.option("--device", default=None,
                  help="torch device to train on (cpu, cuda, cuda:1) [default: cuda if this torch sees a GPU, else "
                       "cpu]. The images stay in host memory; a GPU run differs from a CPU run only by float rounding "
                       "(full float32, no TF32), which training carries on: almost all integer codes agree.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
    @compute_command("qat")
    def qat(**o: Any) -> None:
        """Quantization-aware training into a result folder like `quantize`'s: NIPQ mixed precision (each
        layer's weights and activations learn their own bits under a budget) or LSQ at fixed bits.

        \b
        NIPQ: b = 2 + 12 sigmoid(theta_b) from --init-bits (8), range softplus(theta_alpha) from max|w| per channel
        (weights), 6 (non-negative activations) or 3 (signed), or the observed 99.9th percentile of |x| where
        larger (--range-init lp: the Lp-optimal range at the budget's bits); pseudo-quantization noise while
        training, the budget a penalty (plus a Lagrange multiplier with --budget-rate); then the bits are
        rounded, moved onto the budget and frozen, and --final-epochs quantize for real.
        \b
        Deployment mapping: learned bits are capped by --max-bits. Weights use the narrow signed grid
        [-(2^(b-1)-1), 2^(b-1)-1] (per channel; the step is searched at the frozen bits and trained as LSQ's,
        not alpha/qmax) in INT8. Activations keep quantize's
        rules: non-negative ones on an unsigned b-bit grid up to 7 bits, on signed INT8 at 8 bits; every grid
        narrower than INT8 gets a Clip before its QuantizeLinear. Mixed precision needs no flag downstream:
        eval, export, check, verify, build and inspect read each quantizer's bits from quant.json.
        With --max-bits 16, a Conv/Linear whose weights or input learned more than 8 bits can stay float
        (quantize's --float-layers, recorded in quant.json; FP16 or FP32 as TensorRT picks) with the
        checkpoint's weights. The freezing counts it at 16 bits: it stays float only while the other layers, at
        their learned widths, leave that room in the budget. Float layers are listed in the summary and
        qat.json ("float_layers"; "deployed": the shipped averages); a shortcut quantizer above 8 gets 8.
        Only the weights (as integers) and the quantizers train; biases keep the checkpoint's values unless
        --train-biases (then the result folder stores them).
        """
        import torch

        from .models import ModelOptions, load_model
        from .qat import QATConfig, save_qat, summary
        from .qat import train as run_qat
        from .qat.report import BITS_PNG, QAT_JSON
        from .quant.io import check_output_dir
        from .training import load_training_data
        from .utils import resolve_device

        cfg = QATConfig(method=o["method"], target_bits=o["target_bits"], target_gbops=o["target_gbops"],
                        wbits=o["wbits"], abits=o["abits"], max_bits=o["max_bits"],
                        first_last_bits=o["first_last_bits"], noise=o["noise"], epochs=o["epochs"],
                        final_epochs=o["final_epochs"], lr=o["lr"], qlr=o["qlr"], step_lr=o["step_lr"], final_lr=o["final_lr"],
                        max_update=o["max_update"], batch_size=o["batch_size"], seed=o["seed"],
                        kd_weight=o["kd_weight"] if o["kd_weight"] is not None else 0.0, loss=o["loss"],
                        budget_weight=o["budget_weight"],
                        budget_rate=o["budget_rate"], budget_over=o["budget_over"], range_init=o["range_init"],
                        augment=o["augment"],
                        init_bits=o["init_bits"], schedule=o["schedule"],
                        train_biases=o["train_biases"])
        cfg = cfg.validate()  # bad options fail before the model loads
        dev = resolve_device(o["device"])
        out = check_output_dir(o["out"], o["overwrite"], extra=(QAT_JSON, BITS_PNG), inputs=read_paths(o, "data_src"))
        model = load_model(ModelOptions(o["model"], o["checkpoint"], o["random_weights"], o["mean"], o["std"],
                                        o["input_size"]))
        notes: list[str] = []  # data:/preprocessing: lines (report_data)
        data = load_training_data(o["data_src"], model, cache_root=o["cache_root"], limit=o["limit"],
                                  log=notes.append)
        for line in notes:  # resize warnings before the long run; the rest after it, as training's budget
            if line.startswith("warning:"):  # checks can still refuse the run with a one-line error
                click.echo(line, err=True)
        torch.manual_seed(cfg.seed)
        qmodel = run_qat(model, cfg, data, progress=not o["quiet"], device=dev).cpu()
        warn_unquantized(qmodel.mixq_report.get("unquantized_layers", ()))
        for line in notes:
            if not o["quiet"] and not line.startswith("warning:"):
                click.echo(line, err=True)
        save_qat(qmodel, out, overwrite=o["overwrite"])
        if not o["quiet"]:
            click.echo(summary(qmodel.mixq_qat_report), err=True)
        click.echo(str(out))

    donor = cli.commands.get("robustify")
    if donor is not None:
        qat.params[:0] = [p for p in donor.params if p.name in MODEL_PARAMS]
