"""`train(model, QATConfig(...), data)`: quantization-aware training on the shared loop
(`mixq_onnx.training.train`), returning the same kind of fake-quant model `quantize` returns.

1. `prepare` (BN folding, quantize's placements and first/last-layer policy) and the costs of every
   quantizer (sizes, MACs).
2. nipq: bits 2 + 12 * sigmoid(theta_b) from `init_bits` (8), ranges softplus(theta_alpha) from max|w| per
   channel (weights), 6 (non-negative activations) or 3 (signed ones), raised to the observed 99.9th
   percentile of |x| where that is larger (an input that is not normalised); pseudo-quantization noise; the
   task loss plus the budget penalty. lsq: Lp-searched steps (quantize's initialisation) at fixed bits.
3. nipq: freeze: bits rounded, capped at `max_bits` and moved onto the budget (`budget.round_to_budget`);
   each hard-phase step comes from quantize's Lp search at the frozen bits on the deployed grid `spec.grid()`.
4. both: `final_epochs` of hard quantization (LSQ steps, STE) on the deployed grids.
5. plain quantizers again: weights frozen as integers, bits in each spec (`quantizers.to_plain`).

Only the weights (stored as integers), the quantizers and, with `train_biases`, the quantized layers' biases
learn (the result folder then stores those biases); every other float parameter keeps the checkpoint's value,
because a result folder rebuilds it from the recorded checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from ..data import pick_subset
from ..quant.config import QuantConfig
from ..quant.graph import prepare, quantizers
from ..quant.modules import QUANT_LAYERS, QuantPool
from ..quant.quantizer import ActQuantizer, WeightQuantizer, search_act_scale, search_weight_scale
from ..quant.reconstruct import init_scales
from ..training import TrainConfig, TrainData, check_training_data, default_teacher, kd_weight_for
from ..training import train as run_loop
from ..utils import full_fp32, model_device, resolve_device
from .budget import (
    BudgetMultipliers,
    Costs,
    achieved,
    budget_loss,
    check_reachable,
    measure_costs,
    range_bits,
    round_to_budget,
    round_with_float_layers,
)
from .config import FLOAT_BITS, QATConfig
from .quantizers import QATActQuantizer, QATParams, QATWeightQuantizer, replace_quantizers, to_plain

SIGN_SAMPLES = 256  # images run to see which activations are non-negative (unsigned grids) and their ranges
FREEZE_SAMPLES = 512  # images that set the frozen grids' activation steps
RANGE_QUANTILE = 0.999  # NIPQ's initial activation range: at least this quantile of |x| (see `_observe_ranges`)


def _observe(gm: nn.Module, acts: list[ActQuantizer], x: torch.Tensor) -> None:
    """Run `x` through `gm` with `acts` recording their inputs (fresh observations; they pass through)."""
    for q in acts:
        q.clear_observations()
        q.observing = True
    try:
        with torch.no_grad():
            for s in range(0, len(x), 128):
                gm(x[s:s + 128])
    finally:
        for q in acts:
            q.observing = False


def _observe_ranges(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(smallest value, RANGE_QUANTILE of |x|) each activation quantizer sees (quantizers pass through).
    The minimum picks the grid's sign; the quantile keeps NIPQ's fixed initial range (6 / 3, which assumes
    normalised inputs) from clipping an input that is not normalised, such as raw 0..255 pixels."""
    acts = [q for q in quantizers(gm).values() if isinstance(q, ActQuantizer)]
    _observe(gm, acts, x)
    out = {}
    for q in acts:
        a = q.observed().abs()
        out[q.name] = (q.observed_min, float(a.quantile(RANGE_QUANTILE)))  # a subsample of at most 2^16 values
        q.clear_observations()
    return out


def _fixed_bits(gm: nn.Module, cfg: QATConfig) -> dict[str, int]:
    """Quantizers the first/last-layer policy fixes (their bits are not learned)."""
    out: dict[str, int] = {}
    if cfg.first_last_bits is None:
        return out
    first_last = set(getattr(gm, "mixq_first_last", ()))
    for m in gm.modules():
        if isinstance(m, QUANT_LAYERS) and m.name in first_last:
            out[m.weight_quantizer.name] = cfg.first_last_bits
            if m.input_quantizer is not None:
                out[m.input_quantizer.name] = cfg.first_last_bits
    # a pool's input quantizer is no layer's: NIPQ learns its bits like any activation's, and the budget counts
    # them, where `quantize` and LSQ give it its consumer's bits; with the budget over the learned quantizers
    # alone, a pool feeding a fixed layer takes that layer's bits as there, so that W4A4 measures 4 and 4
    if cfg.budget_over == "learned":
        layer_inputs = {id(m.input_quantizer) for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
        for m in gm.modules():  # (a pool quantizer some layer also reads keeps that layer's policy)
            if isinstance(m, QuantPool) and m.output_quantizer.name in out and id(m.input_quantizer) not in layer_inputs:
                out[m.input_quantizer.name] = out[m.output_quantizer.name]
    return out


def _lp_ranges(gm: nn.Module, sample: torch.Tensor, qcfg: QuantConfig, fixed: dict[str, int],
               bits: int) -> dict[str, torch.Tensor]:
    """NIPQ's `--range-init lp`: each quantizer's range (step x qmax, per channel for weights) from quantize's
    Lp search at `bits` (the fixed ones at their own), the grid the budget aims at. The quantizers get their
    bits back; the steps `init_scales` leaves on them are replaced by the training forms that follow."""
    qs = quantizers(gm)
    was = {n: q.bits for n, q in qs.items()}
    try:
        for n, q in qs.items():
            q.bits = fixed.get(n, bits)
        init_scales(gm, sample, qcfg)
        return {n: (q.scale.detach() * q.spec.grid()[1]).reshape(-1).clone() for n, q in qs.items()}
    finally:
        for n, q in qs.items():
            q.bits = was[n]


def _training_quantizers(gm: nn.Module, cfg: QATConfig, weights: dict[str, torch.Tensor],
                         fixed: dict[str, int], ranges: dict[str, tuple[float, float]],
                         lp: dict[str, torch.Tensor] | None = None) -> None:
    """Swap every quantizer for its training form, initialised for the method (NIPQ's ranges from `lp` where
    given, else the official max|w| / 6 / 3)."""

    def make(q: nn.Module) -> nn.Module:
        if cfg.method == "lsq":  # init_scales ran: each plain quantizer holds its Lp-searched step and sign
            lo, hi = q.spec.grid()
            p = QATParams(q.scale.detach() * hi, signed=q.spec.signed, learn_bits=False, bits=q.bits,
                          cap=cfg.bits_cap, noise=cfg.noise)
            p.start_hard(q.scale.detach())
        elif isinstance(q, WeightQuantizer):
            alpha = lp[q.name] if lp is not None else weights[q.name].detach().abs().flatten(1).amax(1)
            p = QATParams(alpha.clamp(min=1e-8), signed=True,
                          learn_bits=q.name not in fixed, bits=fixed.get(q.name, cfg.init_bits),
                          cap=cfg.bits_cap, noise=cfg.noise)
        else:
            lo, high = ranges.get(q.name, (-1.0, 0.0))
            unsigned = lo >= 0
            alpha = lp[q.name].amax().clamp(min=1e-8) if lp is not None else \
                torch.tensor(max(6.0 if unsigned else 3.0, high))
            p = QATParams(alpha, signed=not unsigned,
                          learn_bits=q.name not in fixed, bits=fixed.get(q.name, cfg.init_bits),
                          cap=cfg.bits_cap, noise=cfg.noise)
        return QATWeightQuantizer(q, p) if isinstance(q, WeightQuantizer) else QATActQuantizer(q, p)

    replace_quantizers(gm, make)


def _freeze_bits(gm: nn.Module, bits: dict[str, int], weights: dict[str, torch.Tensor], sample: torch.Tensor,
                 qcfg: QuantConfig) -> None:
    """End of the noise phase: bits as given, and each hard-phase step from quantize's Lp search at those bits
    on the float network (per channel for weights; activations observed on `sample`). The noise phase barely
    moves the activation ranges from their initial 6 (their first-order gradient through the noise has zero
    mean), so alpha / qmax would start the hard phase on far too coarse a grid. A non-negative activation
    keeps an unsigned grid up to 7 bits and goes on signed INT8 at 8 (quantize's rule, `search_act_scale`)."""
    qs = quantizers(gm)
    for name, q in qs.items():
        q.bits = int(bits[name])
        q.qat.phase = "float"
    _observe(gm, [q for q in qs.values() if isinstance(q, QATActQuantizer)], sample)
    for name, q in qs.items():
        if isinstance(q, QATWeightQuantizer):
            search_weight_scale(weights[name], q, p=qcfg.p_norm, grid=qcfg.scale_grid)
        else:
            search_act_scale(q, p=qcfg.p_norm, grid=qcfg.scale_grid)
        q.qat.start_hard(q.scale.detach())


def _float_layers(costs: Costs, bits: dict[str, int]) -> tuple[str, ...]:
    """`--max-bits 16`: the Conv/Linear layers whose weight or input quantizer froze above 8 bits (INT8 is the
    widest integer grid TensorRT runs) stay float. A shared input quantizer above 8 takes every layer it feeds."""
    return tuple(name for name, w, a, _ in costs.layers if bits[w] > 8 or (a is not None and bits[a] > 8))


def _rebuild_with_float_layers(model: nn.Module, gm: nn.Module, cfg: QATConfig, qcfg: QuantConfig,
                               floats: tuple[str, ...], bits: dict[str, int], sample: torch.Tensor
                               ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, str], dict[str, int]]:
    """The model `prepare` gives with `floats` left float (the placements the result folder rebuilds), carrying
    the noise phase's weights. A float layer keeps the checkpoint's weights: a result folder stores only the
    quantized layers' integers and rebuilds every float parameter from the checkpoint. Returns the model, its
    layers' weights, each quantizer's source in the trained model (a quantizer that served a float layer too
    is renamed after the consumers it has left, e.g. a block input now quantized for the shortcut alone) and
    the bits: the source's, at most 8 (a quantizer that is no layer's input, such as a shortcut's, has no float
    form). A placement the float layers create has no source and gets 8 bits: the output of a float
    downsampling conv becomes the identity input of its block's add, quantized so that the add still fuses
    into the INT8 conv beside it."""
    gm2 = prepare(model, replace(qcfg, float_layers=floats)).to(sample.device)
    old = {m.name: m for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
    layers = [m for m in gm2.modules() if isinstance(m, QUANT_LAYERS)]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(old[m.name].weight)
            if m.bias is not None:  # the noise phase's, with `train_biases` (else the checkpoint's either way)
                m.bias.copy_(old[m.name].bias)
    src: dict[str, str] = {}
    for n, q in quantizers(gm).items():
        src.setdefault(n, n)
        for other in getattr(q, "shared_with", ()):
            src.setdefault(other, n)
    names = list(quantizers(gm2))
    src = {n: src[n] for n in names if n in src}
    bits2 = {n: min(int(bits[src[n]]), 8) if n in src else 8 for n in names}
    weights = {m.weight_quantizer.name: m.weight for m in layers}
    _training_quantizers(gm2, cfg, weights, bits2, _observe_ranges(gm2, sample))
    gm2.to(sample.device)
    return gm2, weights, src, bits2


def _trained(weights: dict[str, torch.Tensor], gm: nn.Module, cfg: QATConfig) -> list[torch.Tensor]:
    """What trains beside the quantizers: the quantized layers' weights, and their biases with `train_biases`."""
    biases = [m.bias for m in gm.modules() if isinstance(m, QUANT_LAYERS) and m.bias is not None] \
        if cfg.train_biases else []
    return [*weights.values(), *biases]


def _clamp_steps(steps: list[nn.Parameter]):
    def on_step(step: int, total: int) -> None:
        with torch.no_grad():
            for s in steps:
                s.clamp_(min=1e-8)

    return on_step


def _report(gm: nn.Module, cfg: QATConfig, costs: Costs, cont: dict[str, float], fixed: dict[str, int],
            moves: list[dict[str, Any]], history: list[dict[str, Any]], data: TrainData, seconds: float,
            alpha0: dict[str, float], frozen: dict[str, int], src: dict[str, str] | None = None,
            floats: tuple[str, ...] = ()) -> dict[str, Any]:
    """`costs`, `cont`, `fixed`, `alpha0` and `frozen` (the bits the budget froze) are keyed by the training
    model's quantizers; `src` maps each of `gm`'s to its training quantizer (identity without float layers)."""
    deployed = measure_costs(gm) if floats else costs  # the quantizers of the model as it ships
    # under `--budget-over learned`, the shipped quantizers (and float layers' widths) the budget counted
    counted = None if costs.counted is None or not floats else \
        {n for n in deployed.kinds if (src or {}).get(n) in costs.counted}
    rows = []
    for name, q in quantizers(gm).items():
        s = name if not floats else (src or {}).get(name)  # None: a placement the float layers created
        _, hi = q.spec.grid()
        alpha = (q.scale.detach().reshape(-1).double() * hi).tolist()
        rows.append({"name": name, "kind": q.kind, "placement": q.spec.placement, "bits": q.bits,
                     "learned_bits": round(cont[s], 4) if s else None, "fixed": s in fixed,
                     "signed": q.spec.signed, "grid": list(q.spec.grid()), "size": deployed.sizes[name],
                     "alpha": round(sum(alpha) / len(alpha), 6), "alpha_init": alpha0[s] if s else None,
                     **({"alpha_per_channel": [round(a, 6) for a in alpha]} if q.kind == "weight" else {})})
    target = ({"bits": cfg.target_bits} if cfg.target_bits is not None else
              {"gbops": cfg.target_gbops} if cfg.target_gbops is not None else None)
    inputs = {m.name: (m.input_quantizer.name if m.input_quantizer is not None else None)
              for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
    layers, float_rows = [], []
    for n, w, a, m in costs.layers:
        if n in floats:
            layers.append({"name": n, "weight": None, "input": None, "macs": m, "float": True})
            float_rows.append({"name": n, "weight_bits": frozen[w], "input_bits": frozen[a] if a else None,
                               "learned_weight_bits": round(cont[w], 4),
                               "learned_input_bits": round(cont[a], 4) if a else None, "macs": m})
        else:
            layers.append({"name": n, "weight": w, "input": inputs.get(n), "macs": m})
    rep = {"method": cfg.method, "config": cfg.to_dict(), "data": data.source,
           "mode": "labelled" if data.labelled else "data-free (KD)", "target": target,
           "achieved": achieved(frozen, costs), "moves": moves, "train": history, "quantizers": rows,
           "layers": layers, "seconds": round(seconds, 2),
           **({"data_provenance": data.provenance} if data.provenance else {})}
    if getattr(gm, "mixq_unquantized", ()):  # only then, as quantize's report: layers left float unasked
        rep["unquantized_layers"] = list(gm.mixq_unquantized)  # type: ignore[attr-defined]
    if getattr(gm, "mixq_traced_leaves", ()):
        rep["traced_leaves"] = list(gm.mixq_traced_leaves)  # type: ignore[attr-defined]
    if floats:  # only then: reports without float layers keep their keys
        # the shipped model's quantizers at their bits, and each float layer's weights and input at 16
        bits = {r["name"]: r["bits"] for r in rows}
        for n, w, a, m in costs.layers:
            if n in floats:
                kw, ka = f"{n}.weight (float)", (f"{n}.input (float)" if a else None)
                deployed.kinds[kw], deployed.sizes[kw], bits[kw] = "weight", costs.sizes[w], FLOAT_BITS
                if ka:
                    deployed.kinds[ka], deployed.sizes[ka], bits[ka] = "act", costs.sizes[a], FLOAT_BITS
                deployed.layers.append((n, kw, ka, m))
                if counted is not None:
                    counted |= {k for k, t in ((kw, w), (ka, a)) if k and t in costs.counted}
        # a shipped quantizer whose source was a float layer's input (the block input now quantized for the
        # shortcut's pool or add alone) reads a tensor counted just above at 16 bits: it counts once, as in training
        float_inputs = {a for n, _w, a, _m in costs.layers if n in floats and a}
        for name in [k for k in deployed.kinds if (src or {}).get(k) in float_inputs]:
            deployed.sizes[name] = 0
        if counted is not None:
            deployed.counted = frozenset(counted)
        rep["float_layers"] = float_rows
        rep["deployed"] = achieved(bits, deployed)
    return rep


def _spread(data: TrainData, n: int, seed: int) -> torch.Tensor:
    """`n` of the training images chosen as `--limit` chooses them (seeded, class-stratified with labels), never
    the first `n`: in a class-sorted file those are one class, and every step and range would fit it alone."""
    labels = data.labels.numpy() if data.labels is not None else None
    idx, _ = pick_subset(labels, len(data.inputs), n, seed=seed)
    # in shuffled order too: an observation keeps a bounded sample of values, most of it from the first batch
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
    return data.inputs[torch.from_numpy(idx)[order]]


@full_fp32()
def train(model: nn.Module, cfg: QATConfig, data: TrainData, *, teacher: nn.Module | None = None,
          progress: bool = True, device: str | torch.device | None = None) -> nn.Module:
    """Quantization-aware training of `model` (left unchanged); returns the fake-quant model with its
    report in `mixq_qat_report` (per quantizer bits, learned bits and alpha, achieved budget, losses).
    The KD teacher defaults to a frozen copy of `model` (needed on a cache, and with `kd_weight` > 0).
    Training runs on `device` (default: `model`'s), and the returned model stays there; the images stay in
    host memory and go over a batch at a time."""
    cfg = cfg.validate()
    check_training_data(data, model)
    cfg = replace(cfg, kd_weight=kd_weight_for(data, cfg.loss, cfg.kd_weight))
    dev = resolve_device(device) if device is not None else model_device(model)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    if teacher is None:
        teacher = default_teacher(model, data, cfg.kd_weight, dev)
    lsq = cfg.method == "lsq"
    floats: tuple[str, ...] = ()
    src: dict[str, str] = {}
    qcfg = QuantConfig(wbits=cfg.wbits if lsq else 8, abits=cfg.abits if lsq else 8, method="rtn",
                       first_last_bits=cfg.first_last_bits, batch_size=cfg.batch_size, seed=cfg.seed)
    gm = prepare(model, qcfg).to(dev)
    costs = measure_costs(gm)
    fixed = _fixed_bits(gm, cfg) if not lsq else {n: q.bits for n, q in quantizers(gm).items()}
    learnable = [n for n in costs.kinds if n not in fixed]
    if cfg.budget_over == "learned":
        costs.counted = frozenset(learnable)
    if not lsq:
        check_reachable(costs, learnable, fixed, cfg)  # before any training
    layers = [m for m in gm.modules() if isinstance(m, QUANT_LAYERS)]
    weights = {m.weight_quantizer.name: m.weight for m in layers}
    sample = _spread(data, SIGN_SAMPLES, cfg.seed).to(dev)
    if lsq:
        init_scales(gm, sample, qcfg)
        ranges: dict[str, tuple[float, float]] = {}
    else:
        ranges = _observe_ranges(gm, sample)
    lp = _lp_ranges(gm, sample, qcfg, fixed, range_bits(costs, learnable, fixed, cfg)) \
        if not lsq and cfg.range_init == "lp" else None
    _training_quantizers(gm, cfg, weights, fixed, ranges, lp)
    gm.to(dev)  # the new learned parameters (in place: `weights` still holds the layers' own)
    qps: dict[str, QATParams] = {n: q.qat for n, q in quantizers(gm).items()}
    alpha0 = {n: round(float(p.alpha().detach().mean()), 6) for n, p in qps.items()}  # reported: where ranges began
    trained = _trained(weights, gm, cfg)
    for w in trained:
        w.requires_grad_(True)

    first_window, final_window = cfg.lr_windows()
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                       kd_weight=cfg.kd_weight, temperature=cfg.temperature, augment=cfg.augment,
                       lr_window=first_window)
    history: list[dict[str, Any]] = []
    try:
        if not lsq:
            mult = BudgetMultipliers.for_config(cfg)

            def extra(_m: nn.Module) -> dict[str, torch.Tensor]:
                return {"budget": budget_loss({n: p.budget_bits() for n, p in qps.items()}, costs, cfg, mult)}

            theta = [t for p in qps.values() for t in (p.theta_a, p.theta_b) if t is not None]
            h = run_loop(gm, data, tcfg, teacher=teacher, extra_loss=extra, progress=progress, desc="nipq",
                         params=[{"params": trained, "lr": cfg.lr, "max_update": cfg.max_update}, {"params": theta, "lr": cfg.qlr}])
            history.append({"phase": "noise", **h, **({"multipliers": mult.trace} if mult is not None else {})})
            cont = {n: p.continuous_bits() for n, p in qps.items()}
            freeze = round_with_float_layers if cfg.max_bits > 8 else round_to_budget
            bits, moves = freeze(cont, learnable, fixed, costs, cfg)
            frozen = dict(bits)
            floats = _float_layers(costs, bits) if cfg.max_bits > 8 else ()
            if floats:
                gm, weights, src, bits = _rebuild_with_float_layers(model, gm, cfg, qcfg, floats, bits, sample)
                qps = {n: q.qat for n, q in quantizers(gm).items()}
                trained = _trained(weights, gm, cfg)
                for w in trained:
                    w.requires_grad_(True)
            _freeze_bits(gm, bits, weights, _spread(data, FREEZE_SAMPLES, cfg.seed).to(dev), qcfg)
        else:
            cont = {n: float(b) for n, b in fixed.items()}
            moves = []
            frozen = dict(fixed)
        phases = [("hard", cfg.epochs, cfg.lr, first_window)] if lsq else []
        if cfg.final_epochs > 0:
            phases.append(("final", cfg.final_epochs, cfg.final_lr or cfg.lr, final_window))
        steps = [p.step for p in qps.values()]
        for i, (phase, epochs, lr, window) in enumerate(phases):
            pcfg = TrainConfig(epochs=epochs, lr=lr, batch_size=cfg.batch_size, seed=cfg.seed + 1 + i,
                               kd_weight=cfg.kd_weight, temperature=cfg.temperature, augment=cfg.augment,
                               lr_window=window)
            h = run_loop(gm, data, pcfg, teacher=teacher, progress=progress, desc=f"{cfg.method} {phase}",
                         params=[{"params": trained, "lr": lr, "max_update": cfg.max_update}, {"params": steps, "lr": cfg.step_lr, "max_update": cfg.max_update}],
                         on_step=_clamp_steps(steps))
            history.append({"phase": phase, **h})
    finally:
        for w in trained:
            w.requires_grad_(False)
    replace_quantizers(gm, lambda q: to_plain(q, weights.get(q.name)))
    gm.eval()
    qs = quantizers(gm)
    gm.mixq_config = QuantConfig(  # type: ignore[attr-defined]  # placements to rebuild; bits come per record
        wbits=max(q.bits for q in qs.values() if q.kind == "weight"),
        abits=max((q.bits for q in qs.values() if q.kind == "act"), default=8), method="rtn",
        first_last_bits=cfg.first_last_bits, batch_size=cfg.batch_size, seed=cfg.seed, float_layers=floats)
    gm.mixq_calibration = None  # type: ignore[attr-defined]
    if cfg.train_biases:  # the result folder stores these (`save_quantized`); the rest comes from the checkpoint
        gm.mixq_trained_biases = tuple(m.name for m in gm.modules()  # type: ignore[attr-defined]
                                       if isinstance(m, QUANT_LAYERS) and m.bias is not None)
    rep = _report(gm, cfg, costs, cont, fixed, moves, history, data, time.perf_counter() - t0, alpha0, frozen, src,
                  floats)
    gm.mixq_qat_report = rep  # type: ignore[attr-defined]
    gm.mixq_report = {k: rep[k] for k in ("method", "target", "achieved", "mode", "data", "seconds",  # type: ignore[attr-defined]
                                          "unquantized_layers", "traced_leaves") if k in rep}
    return gm
