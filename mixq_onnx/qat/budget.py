"""The budget of mixed precision: average bits and GBOPs, the penalty that steers the learned bits
during training, and the rounding that lands the frozen bits on the budget.

Average bits are per kind, as NIPQ's avgbit mode: the weight average (each weight quantizer weighted by its
parameter count) and the activation average (each activation quantizer weighted by its tensor size per
image) must each reach the target. GBOPs = sum over Conv/Linear of MACs * b_w * b_a / 1e9 per image, with
b_a the bits of the layer's input quantizer: the official code's BOPs loss never sees the activation bits
(it assigns `bits_actv` but multiplies by `bits_act`); here both enter.

The averages count every quantizer, the first/last layers' fixed 8 bits too (the network's real average), or
with `--budget-over learned` only those whose bits are learned (`Costs.counted`): then a uniform W4A4 network,
first/last layers at 8 as `quantize` keeps them, measures 4.0 and 4.0, the budget "W4A4" names.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MixqError
from ..quant.graph import example_input, quantizers
from ..quant.modules import QUANT_LAYERS, QuantConv2d
from ..quant.quantizer import ActQuantizer
from .config import FLOAT_BITS, QATConfig

Bits = Mapping[str, Any]  # quantizer name -> bits (float, int or a 0-d tensor)


@dataclass
class Costs:
    """What each quantizer's bits cost: `sizes` (weights: parameters; activations: elements per image),
    `kinds` ("weight" / "act"), and per Conv/Linear layer (weight quantizer, input quantizer, MACs/image)."""

    sizes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    layers: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    counted: frozenset[str] | None = None  # the quantizers the averages count (None: all; `--budget-over`)

    def names(self, kind: str) -> list[str]:
        return [n for n, k in self.kinds.items() if k == kind]


@torch.no_grad()
def measure_costs(model: nn.Module) -> Costs:
    """Sizes and MACs from one float forward of a single image (quantizers pass through until initialised)."""
    costs = Costs()
    act_sizes: dict[str, int] = {}
    macs: dict[str, int] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out: act_sizes.__setitem__(mod.name, int(args[0][0].numel()))))
        elif isinstance(m, QUANT_LAYERS):
            def hook(mod, args, out):
                per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1] \
                    if isinstance(mod, QuantConv2d) else mod.in_features
                macs[mod.name] = int(out[0].numel()) * int(per_out)
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(example_input(model, batch=1))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    for name, q in quantizers(model).items():
        costs.kinds[name] = q.kind
        costs.sizes[name] = act_sizes.get(name, 0) if q.kind == "act" else 0
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            costs.sizes[m.weight_quantizer.name] = int(m.weight.numel())
            iq = m.input_quantizer.name if m.input_quantizer is not None else None
            costs.layers.append((m.name, m.weight_quantizer.name, iq, macs.get(m.name, 0)))
    return costs


def average_bits(bits: Bits, costs: Costs, kind: str) -> Any:
    """Size-weighted mean bits of one kind over the quantizers `costs` counts (a tensor when `bits` holds
    tensors)."""
    names = [n for n in costs.names(kind) if costs.sizes[n] > 0 and (costs.counted is None or n in costs.counted)]
    total = sum(costs.sizes[n] for n in names)
    if not total:
        return 0.0
    return sum(bits[n] * costs.sizes[n] for n in names) / total


def gbops(bits: Bits, costs: Costs) -> Any:
    """Sum over Conv/Linear of MACs * b_w * b_a per image, in 1e9 (b_a = 32 for a float input)."""
    return sum(macs * bits[w] * (bits[a] if a is not None else 32) for _, w, a, macs in costs.layers) / 1e9


def budget_gaps(bits: Bits, costs: Costs, cfg: QATConfig) -> dict[str, torch.Tensor]:
    """How far each budget metric is from its target: average bits minus the target (per kind, in bits), or
    GBOPs over the target minus 1. Positive: over budget."""
    if cfg.target_bits is not None:
        return {k: torch.as_tensor(average_bits(bits, costs, k)).reshape(()) - float(cfg.target_bits)
                for k in ("weight", "act") if costs.names(k)}
    return {"gbops": torch.as_tensor(gbops(bits, costs)).reshape(()) / float(cfg.target_gbops) - 1.0}


def _beta(cfg: QATConfig) -> float:
    """Smooth-L1 knee of the budget penalty, in the gap's unit: 0.1 bit, or 1 % of the GBOPs target."""
    return 0.1 if cfg.target_bits is not None else 0.01


def budget_loss(bits: Bits, costs: Costs, cfg: QATConfig,
                multipliers: BudgetMultipliers | None = None) -> torch.Tensor:
    """Penalty pulling the (STE-rounded) bits to the budget: smooth L1 on each gap (in bits; GBOPs relative to
    the target), nearly L1: a constant pull the task loss pushes back against. With `multipliers`, plus their
    Lagrangian term (which also advances them by one step)."""
    gaps = budget_gaps(bits, costs, cfg)
    loss = sum(F.smooth_l1_loss(g, torch.zeros_like(g), beta=_beta(cfg)) for g in gaps.values())
    if multipliers is not None:
        loss = loss + multipliers.term(gaps)
    return cfg.budget_weight * loss


class BudgetMultipliers:
    """Dual ascent on the budget as a constraint (at most the target): one multiplier per metric, lambda * gap
    added to the penalty, and after every step lambda += rate * gap, the gap clipped to the penalty's knee
    (0.1 bit) and lambda kept >= 0.

    Why: a fixed penalty stops where the task loss pushes back as hard, which for a tight target is above it
    (ResNet-20 at 3 bits ended its noise phase about 0.45 bit over in both averages, and the freeze then moved
    22 quantizers down a bit at once, untrained). The multiplier grows while a metric stays over its target,
    so the bits reach the budget while the noise phase can still adapt the weights to them; the allocation is
    still NIPQ's (each layer's bits move by the task loss's gradient against its share of the budget). The
    clip bounds how fast the pull strengthens: unclipped, the first steps' 5-bit gap built lambda ~4 within 20
    steps, the bits fell far below the target and ResNet-20 collapsed to chance. Even clipped it needs stable
    ranges: with the official ones (max|w|, 6) ResNet-20's 3-bit noise phase collapsed at every rate tried; with
    `range_init="lp"` it meets the budget by step ~150 of 216 (docs/benchmarks.md, section qat, round 4)."""

    TRACE_EVERY = 10

    def __init__(self, rate: float, metrics: list[str], knee: float):
        self.rate = rate
        self.knee = knee
        self.values = {m: 0.0 for m in metrics}
        self.steps = 0
        self.trace: list[dict[str, float]] = []  # every TRACE_EVERY steps: the multipliers and the gaps

    def term(self, gaps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = sum(self.values[m] * g for m, g in gaps.items())
        for m, g in gaps.items():
            gap = min(max(float(g.detach()), -self.knee), self.knee)
            self.values[m] = max(0.0, self.values[m] + self.rate * gap)
        self.steps += 1
        if self.steps % self.TRACE_EVERY == 1:
            self.trace.append({"step": self.steps, **{f"lambda_{m}": round(v, 4) for m, v in self.values.items()},
                               **{f"gap_{m}": round(float(g.detach()), 4) for m, g in gaps.items()}})
        return torch.as_tensor(out)

    @classmethod
    def for_config(cls, cfg: QATConfig) -> BudgetMultipliers | None:
        """The multipliers `cfg` asks for (None at budget_rate 0)."""
        return cls(cfg.budget_rate, metrics(cfg), _beta(cfg)) if cfg.budget_rate > 0 else None


def achieved(bits: Bits, costs: Costs) -> dict[str, float]:
    """The averages the budget reads and the GBOPs; with a scope (`Costs.counted`), also the averages over
    every quantizer (`*_all`), the network's real ones."""
    b = {k: float(v) for k, v in bits.items()}
    out = {"weight_bits": round(float(average_bits(b, costs, "weight")), 4),
           "act_bits": round(float(average_bits(b, costs, "act")), 4),
           "gbops": round(float(gbops(b, costs)), 6)}
    if costs.counted is not None:
        every = replace(costs, counted=None)
        out.update(weight_bits_all=round(float(average_bits(b, every, "weight")), 4),
                   act_bits_all=round(float(average_bits(b, every, "act")), 4))
    return out


def metrics(cfg: QATConfig) -> list[str]:
    """The budget's metrics: "weight" and "act" (average bits) or "gbops"."""
    return [m for m, _, _ in _metrics(cfg)]


def _metrics(cfg: QATConfig) -> list[tuple[str, float, float]]:
    """(metric, target, tolerance) pairs the rounding must satisfy."""
    if cfg.target_bits is not None:
        return [("weight", cfg.target_bits, cfg.tolerance), ("act", cfg.target_bits, cfg.tolerance)]
    return [("gbops", float(cfg.target_gbops), cfg.tolerance * float(cfg.target_gbops))]


def _value(metric: str, bits: Bits, costs: Costs) -> float:
    return float(gbops(bits, costs)) if metric == "gbops" else float(average_bits(bits, costs, metric))


def _movable(metric: str, learnable: list[str], costs: Costs) -> list[str]:
    return learnable if metric == "gbops" else [n for n in learnable if costs.kinds[n] == metric]


def range_bits(costs: Costs, learnable: list[str], fixed: Mapping[str, int], cfg: QATConfig) -> int:
    """The uniform bit-width a budget stands for: round(target_bits), or for a GBOPs target the b in
    [2, max_bits] whose uniform assignment (the learned quantizers at b, the fixed ones at theirs) comes
    nearest to it. NIPQ's `--range-init lp` searches its initial ranges at these bits."""
    if cfg.target_bits is not None:
        return int(min(max(round(cfg.target_bits), 2), cfg.bits_cap))

    def gap(b: int) -> float:
        return abs(float(gbops({n: fixed.get(n, b) for n in costs.kinds}, costs)) - float(cfg.target_gbops))

    return min(range(2, cfg.bits_cap + 1), key=gap)


def check_reachable(costs: Costs, learnable: list[str], fixed: Mapping[str, int], cfg: QATConfig) -> None:
    """Refuse a budget that no bit assignment in [2, max_bits] meets (the fixed first/last layers count, unless
    `--budget-over learned` leaves them out)."""
    for metric, target, tol in _metrics(cfg):
        moving = set(_movable(metric, learnable, costs))
        if metric != "gbops" and not costs.names(metric):
            continue  # no quantizer of this kind at all: no average to meet (as `budget_gaps`)
        if metric != "gbops" and not moving and costs.counted is not None:
            what = "weight" if metric == "weight" else "activation"
            raise MixqError(f"--budget-over learned: no {what} quantizer of this model learns its bits (the "
                            f"first/last-layer policy fixes them all), so there is no average to aim at; use "
                            f"--budget-over all")
        lo = {n: (2 if n in moving else fixed.get(n, cfg.bits_cap)) for n in costs.kinds}
        hi = {n: (cfg.bits_cap if n in moving else fixed.get(n, cfg.bits_cap)) for n in costs.kinds}
        vmin, vmax = _value(metric, lo, costs), _value(metric, hi, costs)
        if not vmin - tol <= target <= vmax + tol:
            what = {"weight": "weight average bits", "act": "activation average bits", "gbops": "GBOPs"}[metric]
            opt = "--target-gbops" if metric == "gbops" else "--target-bits"
            raise MixqError(f"{opt} {target:g} is out of reach: the {what} of this model lie in "
                            f"[{vmin:.4g}, {vmax:.4g}] with bits in [2, {cfg.bits_cap}] and the first/last layers "
                            f"fixed (see --first-last-bits, --max-bits)")


def round_to_budget(cont: Mapping[str, float], learnable: list[str], fixed: Mapping[str, int], costs: Costs,
                    cfg: QATConfig) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Freeze the bits: round each learned bit-width (capped at max_bits), then, while a budget metric is
    further than the tolerance from its target, move one quantizer by one bit, the one whose new bits stay
    closest to its learned continuous value (NIPQ's own sensitivity: a layer that learned 4.45 bits gives up
    its rounded-up bit first) among the moves that bring the metric closer. Returns the bits and the moves."""
    bits: dict[str, int] = {n: int(fixed[n]) for n in fixed}
    for n in learnable:
        bits[n] = int(min(max(round(cont[n]), 2), cfg.bits_cap))
    moves: list[dict[str, Any]] = []
    for metric, target, tol in _metrics(cfg):
        names = _movable(metric, learnable, costs)
        for _ in range(64 * max(1, len(names))):
            gap = _value(metric, bits, costs) - target
            if abs(gap) <= tol:
                break
            step = -1 if gap > 0 else 1
            best: tuple[float, float, str] | None = None
            for n in names:
                new = bits[n] + step
                if not 2 <= new <= cfg.bits_cap:
                    continue
                trial = {**bits, n: new}
                new_gap = _value(metric, trial, costs) - target
                if abs(new_gap) >= abs(gap):
                    continue
                key = (abs(new - cont[n]), abs(new_gap), n)
                if best is None or key < best:
                    best = key
            if best is None:
                break  # no single move helps: the granularity of this model's layers
            n = best[2]
            moves.append({"quantizer": n, "from": bits[n], "to": bits[n] + step, "learned": round(cont[n], 4),
                          "metric": metric})
            bits[n] += step
    return bits, moves


def round_with_float_layers(cont: Mapping[str, float], learnable: list[str], fixed: Mapping[str, int], costs: Costs,
                            cfg: QATConfig) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Freeze the bits under `--max-bits 16`, where a layer ships float (both its quantizers at 16 bits) as soon as
    its weights or input froze above 8: the budget is met on those deployed widths. Candidates are the layers
    with a rounded learned width above 8. They stay float only while the rest, at their own learned widths
    (rounded, at most 8), leave the room: the candidate that learned least above 8 (size-weighted) goes back to
    INT8 first. So a float layer is paid for by bits the budget left unused, never by pushing other layers below
    what they learned. Then `round_to_budget` lands the rest (capped at 8) on the target, the float layers'
    quantizers pinned at 16. Returns the bits (16 for a float layer's) and the moves."""
    # layers that share a quantizer (a block input read by its first conv and its downsampling conv) go float
    # together: the unit is the group
    groups: list[tuple[list[str], set[str]]] = []
    for n, w, a, _ in costs.layers:
        qs = {w} | ({a} if a else set())
        joined = [g for g in groups if g[1] & qs]
        for g in joined:
            groups.remove(g)
        groups.append(([x for g in joined for x in g[0]] + [n], set().union(qs, *(g[1] for g in joined))))
    parts = {"+".join(names): sorted(qs) for names, qs in groups}
    rounded = {n: min(max(round(cont[n]), 2), cfg.bits_cap) for n in learnable}
    floats = [n for n, qs in parts.items() if any(rounded.get(q, 0) > 8 for q in qs)]
    cap8 = replace(cfg, max_bits=8)

    def pinned(fl: list[str]) -> dict[str, int]:
        return {q: FLOAT_BITS for n in fl for q in parts[n]}

    def fits(fl: list[str]) -> bool:
        pin = pinned(fl)
        trial = {**{n: min(b, 8) for n, b in rounded.items()}, **fixed, **pin}
        return all(_value(m, trial, costs) <= t + tol for m, t, tol in _metrics(cfg))

    def excess(n: str) -> float:
        return sum(max(0.0, cont[q] - 8) * max(costs.sizes[q], 1) for q in parts[n] if q in cont)

    while floats and not fits(floats):
        floats.remove(min(floats, key=lambda n: (excess(n), n)))
    pin = pinned(floats)
    bits, moves = round_to_budget(cont, [n for n in learnable if n not in pin], {**fixed, **pin}, costs, cap8)
    return bits, moves
