"""Training forms of the project's quantizers. Each is a subclass of `WeightQuantizer` / `ActQuantizer` (same
name, placement, axis, so the layers and `quantizers(model)` see them as usual) with a `QATParams` child
holding what is learned; `to_plain` turns it back into the plain quantizer `quantize` would have produced,
with its own bits in its spec, so saving, export, check and verify need no special case.

Phases: "noise" (NIPQ: learned bits theta_b and range theta_alpha, pseudo-quantization noise) and "hard"
(LSQ: frozen bits on the deployed grid `spec.grid()`, learned step, straight-through rounding).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.quantizer import (
    ActQuantizer,
    WeightQuantizer,
    forget_draw,
    lsq_grad_scale,
    once_per_tensor,
    per_sample,
    weight_round,
)
from .noise import bits_of, cap_ste, inverse_softplus, levels, lsq_quant, nipq_quant, round_ste, theta_of


class QATParams(nn.Module):
    """Learned state of one quantizer. `alpha` is per output channel for weights (the BN-folded weights
    differ by channel far more than NIPQ's unfolded ones), a scalar for activations."""

    def __init__(self, alpha: torch.Tensor, *, signed: bool, learn_bits: bool, bits: float, cap: int,
                 noise: str):
        super().__init__()
        self.theta_a = nn.Parameter(inverse_softplus(alpha.detach().reshape(-1)))
        self.theta_b = nn.Parameter(torch.tensor(theta_of(bits))) if learn_bits else None
        self.fixed_bits = None if learn_bits else int(round(bits))
        self.step: nn.Parameter | None = None
        self.signed = signed  # NIPQ's grid: symmetric [-alpha, alpha] or unsigned [0, alpha]
        self.cap = cap
        self.noise = noise
        self.phase = "noise"

    def alpha(self) -> torch.Tensor:
        return F.softplus(self.theta_a)

    def continuous_bits(self) -> float:
        """The learned bit-width before rounding (the fixed one for first/last layers)."""
        if self.theta_b is None:
            return float(self.fixed_bits)
        return float(bits_of(self.theta_b.detach()))

    def bits(self, stochastic: bool) -> torch.Tensor:
        """Bits the forward uses: b (+ U(-0.5, 0.5) when `stochastic`), rounded and capped with STEs."""
        if self.theta_b is None:
            return torch.tensor(float(self.fixed_bits), device=self.theta_a.device)
        b = bits_of(self.theta_b)
        if stochastic:
            b = b + (torch.rand((), device=b.device) - 0.5)
        return cap_ste(round_ste(b), self.cap)

    def budget_bits(self) -> torch.Tensor:
        """Bits as the budget counts them: rounded and capped, gradient straight through."""
        return self.bits(stochastic=False)

    def start_hard(self, step: torch.Tensor) -> None:
        """Freeze the bits: from now on only the step (and the weights) learn."""
        self.step = nn.Parameter(step.detach().reshape(-1).clone().float())
        self.phase = "hard"
        for p in (self.theta_a, self.theta_b):
            if p is not None:
                p.requires_grad_(False)

    def noise_forward(self, x: torch.Tensor, alpha: torch.Tensor, training: bool) -> torch.Tensor:
        bits = self.bits(stochastic=training)
        if training:
            return nipq_quant(x, bits, alpha, self.signed, self.noise)
        n_lv = levels(bits.detach(), self.signed)  # evaluation between phases: round on NIPQ's grid
        return torch.round(F.hardtanh(x / alpha, -1.0 if self.signed else 0.0, 1.0) * n_lv) * (alpha / n_lv)


class QATWeightQuantizer(WeightQuantizer):
    """A weight quantizer the weights train through (per-channel)."""

    def __init__(self, base: WeightQuantizer, params: QATParams):
        super().__init__(base.name, base.bits, base.symmetric, base.axis, base.block_size)
        self.mode = "qat"  # never "int": the layer stays in its float form while training
        self.initialized.fill_(True)
        self.qat = params

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shape = self.broadcast_shape(w)
        p = self.qat
        if p.phase == "float":  # observing the float network (the hard phase's step search)
            return w
        if p.phase == "noise":
            return p.noise_forward(w, p.alpha().view(shape), self.training)
        lo, hi = self.spec.grid()
        g = lsq_grad_scale(max(1, w.numel() // w.shape[self.axis]), hi)
        return lsq_quant(w, p.step.view(shape), lo, hi, g, weight_round)


class QATActQuantizer(ActQuantizer):
    """A per-tensor activation quantizer (`learning` keeps its layer out of the integer form)."""

    def __init__(self, base: ActQuantizer, params: QATParams):
        super().__init__(base.name, base.bits, base.symmetric, base.placement)
        self.signed = base.signed
        self.shared_with = tuple(base.shared_with)
        self.scale.requires_grad_(False)  # unused: the step lives in `qat`
        self.initialized.fill_(True)
        self.learning = True
        self.qat = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.qat
        if p.phase == "float":
            if self.observing:
                self.observe(x)
            return x
        if p.phase == "noise":
            if not (self.shared_with and self.training):
                return p.noise_forward(x, p.alpha().reshape(()), self.training)
            # every consumer of this forward reads the same noise and the same stochastic bits
            return once_per_tensor(self, x, lambda: p.noise_forward(x, p.alpha().reshape(()), True))
        forget_draw(self)
        lo, hi = self.spec.grid()
        return lsq_quant(x, p.step.reshape(()), lo, hi, lsq_grad_scale(per_sample(x), hi))


def replace_quantizers(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put `make(q)` in place of every quantizer q of `model` (None keeps q); returns how many changed. A
    quantizer shared by several consumers (`quant.graph.share_quantizers`) is made once, and every place that
    held it holds the one replacement."""
    n = 0
    made: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, (WeightQuantizer, ActQuantizer)):
                if id(child) not in made:
                    made[id(child)] = make(child)
                    n += made[id(child)] is not None and made[id(child)] is not child
                new = made[id(child)]
                if new is not None and new is not child:
                    setattr(parent, attr, new)
    return n


def to_plain(q: nn.Module, weight: torch.Tensor | None) -> nn.Module | None:
    """The plain, finished quantizer of a hard-phase training quantizer: bits and sign in its spec, the
    learned step as its scale, and for weights the integers round-to-nearest on that step."""
    if isinstance(q, QATWeightQuantizer):
        assert weight is not None and q.qat.step is not None
        out = WeightQuantizer(q.name, q.bits, q.symmetric, q.axis, q.block_size)
        out.set_scale(q.qat.step.detach().clamp(min=1e-8).reshape(out.scale_shape(weight.shape)))
        out.finalize(weight.detach())
        return out
    if isinstance(q, QATActQuantizer):
        assert q.qat.step is not None
        out = ActQuantizer(q.name, q.bits, q.symmetric, q.placement)
        out.signed = q.signed
        out.shared_with = tuple(q.shared_with)
        out.scale = nn.Parameter(q.qat.step.detach().clamp(min=1e-8).reshape(()).clone(), requires_grad=False)
        out.initialized.fill_(True)
        return out
    return None
