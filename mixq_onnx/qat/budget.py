"""The budget of mixed precision: average bits and GBOPs, the penalty that steers the learned bits
during training, and the rounding that lands the frozen bits on the budget.

Average bits are per kind, as NIPQ's avgbit mode: the weight average (each weight quantizer weighted by its
parameter count) and the activation average (each activation quantizer weighted by its tensor size per
image) must each reach the target. GBOPs = sum over Conv/Linear of MACs * b_w * b_a / 1e9 per image, with
b_a the bits of the layer's input quantizer: the official code's BOPs loss never sees the activation bits
(it assigns `bits_actv` but multiplies by `bits_act`); here both enter.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MixqError
from ..quant.graph import example_input, quantizers
from ..quant.modules import QUANT_LAYERS, QuantConv2d
from ..quant.quantizer import ActQuantizer
from .config import QATConfig

Bits = Mapping[str, Any]  # quantizer name -> bits (float, int or a 0-d tensor)


@dataclass
class Costs:
    """What each quantizer's bits cost: `sizes` (weights: parameters; activations: elements per image),
    `kinds` ("weight" / "act"), and per Conv/Linear layer (weight quantizer, input quantizer, MACs/image)."""

    sizes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    layers: list[tuple[str, str, str | None, int]] = field(default_factory=list)

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
    """Size-weighted mean bits of one kind (a tensor when `bits` holds tensors)."""
    names = [n for n in costs.names(kind) if costs.sizes[n] > 0]
    total = sum(costs.sizes[n] for n in names)
    if not total:
        return 0.0
    return sum(bits[n] * costs.sizes[n] for n in names) / total


def gbops(bits: Bits, costs: Costs) -> Any:
    """Sum over Conv/Linear of MACs * b_w * b_a per image, in 1e9 (b_a = 32 for a float input)."""
    return sum(macs * bits[w] * (bits[a] if a is not None else 32) for _, w, a, macs in costs.layers) / 1e9


def budget_loss(bits: Bits, costs: Costs, cfg: QATConfig) -> torch.Tensor:
    """Penalty pulling the (STE-rounded) bits to the budget: smooth L1 on each average (in bits), or on the
    GBOPs relative to the target. Nearly L1 (beta 0.1): a constant pull the task loss pushes back against."""
    if cfg.target_bits is not None:
        t = torch.tensor(float(cfg.target_bits))
        loss = sum(F.smooth_l1_loss(average_bits(bits, costs, k).reshape(()), t, beta=0.1)
                   for k in ("weight", "act") if costs.names(k))
    else:
        loss = F.smooth_l1_loss((gbops(bits, costs) / cfg.target_gbops).reshape(()), torch.tensor(1.0), beta=0.01)
    return cfg.budget_weight * loss


def achieved(bits: Bits, costs: Costs) -> dict[str, float]:
    b = {k: float(v) for k, v in bits.items()}
    return {"weight_bits": round(float(average_bits(b, costs, "weight")), 4),
            "act_bits": round(float(average_bits(b, costs, "act")), 4),
            "gbops": round(float(gbops(b, costs)), 6)}


def _metrics(cfg: QATConfig) -> list[tuple[str, float, float]]:
    """(metric, target, tolerance) pairs the rounding must satisfy."""
    if cfg.target_bits is not None:
        return [("weight", cfg.target_bits, cfg.tolerance), ("act", cfg.target_bits, cfg.tolerance)]
    return [("gbops", float(cfg.target_gbops), cfg.tolerance * float(cfg.target_gbops))]


def _value(metric: str, bits: Bits, costs: Costs) -> float:
    return float(gbops(bits, costs)) if metric == "gbops" else float(average_bits(bits, costs, metric))


def _movable(metric: str, learnable: list[str], costs: Costs) -> list[str]:
    return learnable if metric == "gbops" else [n for n in learnable if costs.kinds[n] == metric]


def check_reachable(costs: Costs, learnable: list[str], fixed: Mapping[str, int], cfg: QATConfig) -> None:
    """Refuse a budget that no bit assignment in [2, max_bits] meets (the fixed first/last layers count)."""
    for metric, target, tol in _metrics(cfg):
        moving = set(_movable(metric, learnable, costs))
        if metric != "gbops" and not moving:
            continue
        lo = {n: (2 if n in moving else fixed.get(n, cfg.max_bits)) for n in costs.kinds}
        hi = {n: (cfg.max_bits if n in moving else fixed.get(n, cfg.max_bits)) for n in costs.kinds}
        vmin, vmax = _value(metric, lo, costs), _value(metric, hi, costs)
        if not vmin - tol <= target <= vmax + tol:
            what = {"weight": "weight average bits", "act": "activation average bits", "gbops": "GBOPs"}[metric]
            opt = "--target-gbops" if metric == "gbops" else "--target-bits"
            raise MixqError(f"{opt} {target:g} is out of reach: the {what} of this model lie in "
                            f"[{vmin:.4g}, {vmax:.4g}] with bits in [2, {cfg.max_bits}] and the first/last layers "
                            f"fixed (see --first-last-bits, --max-bits)")


def round_to_budget(cont: Mapping[str, float], learnable: list[str], fixed: Mapping[str, int], costs: Costs,
                    cfg: QATConfig) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Freeze the bits: round each learned bit-width (capped at max_bits), then, while a budget metric is
    further than the tolerance from its target, move one quantizer by one bit, the one whose new bits stay
    closest to its learned continuous value (NIPQ's own sensitivity: a layer that learned 4.45 bits gives up
    its rounded-up bit first) among the moves that bring the metric closer. Returns the bits and the moves."""
    bits: dict[str, int] = {n: int(fixed[n]) for n in fixed}
    for n in learnable:
        bits[n] = int(min(max(round(cont[n]), 2), cfg.max_bits))
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
                if not 2 <= new <= cfg.max_bits:
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
