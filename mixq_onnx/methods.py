"""The method registry: every post-training quantization method is one `Method` subclass here, registered by
`@register_method` (all re-exported by `mixq_onnx.quant`). `quantize` looks the method up
(`METHODS.lookup(cfg.method)`) and runs its phases; the CLI's `--method` choices and `QuantConfig.validate`
read the same registry.

A method is data, not code: which units it reconstructs (blocks or single layers), the optimisation phases
it runs on each unit (what is learned, whether activations are quantized, QDrop), and its default learning
parameters per preset. The loop that executes a phase is `quant.reconstruct._reconstruct`.

Light on purpose (the CLI builds `--method`'s choices from it at start-up): no torch, numpy, ... at module level;
it lives outside the `quant` package because importing that package imports torch.

Adding a method touches this file only (or none: register it from your own code, as
tests/test_methods.py does):

    @register_method
    class QDropNoDrop(Method):
        name = "qdrop-nodrop"
        help = "qdrop without QDrop: rounding and LSQ step sizes jointly"
        phases = (Phase(learn_round=True, learn_act=True),)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .registry import Registry


@dataclass(frozen=True)
class Phase:
    """One optimisation pass over a unit (`reconstruct._reconstruct`).

    learn_round:  AdaRound rectified-sigmoid rounding of the weights (with the rounding regulariser).
    learn_act:    LSQ activation step sizes (cosine-annealed Adam).
    learn_wscale: per-channel weight scales on the integer base frozen at init (Genie-M), annealed with the
                  activation steps by one cosine, as Genie's reference does; the rounding keeps a constant rate.
                  Against the constant rate it replaced (ResNet-20, draw-0 cache, seeds 0-2, test top-1,
                  2026-12-01): W4A4 79.19 against 79.08, W2A4 73.59 against 73.34, within a seed's spread.
    drop:         QDrop with `drop_prob`: mix float into the quantized activations, on the unit input and
                  inside the unit. The unit's input is mixed with the float model's input first, and the
                  unit's own input quantizer (inside the unit: quantizers sit at layer inputs) drops again, so
                  at p = 0.5 the deployed input reaches the unit a quarter of the time, where QDrop's reference
                  (whose block input was quantized by the previous block) mixes deployed and float half and half;
                  Genie's reference mixes twice as this does. Kept: the reference's single mix, tried on
                  ResNet-20 (draw-0 cache, seeds 0-2, test top-1, 2026-12-01), gave W4A4 79.28 against
                  79.31 and W2A4 73.11 against 73.48 (a diagnostic patch, not kept).
    acts_on:      activation quantizers enabled while this phase runs.
    iters_div:    this phase runs max(1, iters // iters_div) iterations.
    finalize_weights: freeze the weights to their integer codes (hard rounding) after this phase.

    Weight-only configs (abits 16) have no activation quantizers: there, learn_act, drop and acts_on are
    off, and a phase that learns nothing else is skipped."""

    learn_round: bool = False
    learn_act: bool = False
    learn_wscale: bool = False
    drop: bool = False
    acts_on: bool = True
    iters_div: int = 1
    finalize_weights: bool = False

    def for_config(self, weight_only: bool) -> Phase | None:
        """The phase as it runs under a weight-only config, or None when nothing is left to learn."""
        if not weight_only:
            return self
        if not (self.learn_round or self.learn_wscale):
            return None
        return Phase(learn_round=self.learn_round, learn_act=False, learn_wscale=self.learn_wscale, drop=False,
                     acts_on=False, iters_div=self.iters_div, finalize_weights=self.finalize_weights)


#: Learning parameters every method starts from, by preset. `paper`: QDrop's reference values (20k iterations per
#: unit, lr 1e-3 rounding, 4e-5 steps) for every method; BRECQ's reference learns its steps at 4e-4 for 5k
#: iterations with an Lp (p 2.4) loss, and Genie's uses a rounding weight of 1.0: not reproduced.
PRESET_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "fast": {"iters": 400, "lr_round": 3e-3, "lr_act": 4e-4, "lr_wscale": 1e-4, "round_weight": 0.01},
    "paper": {"iters": 20000, "lr_round": 1e-3, "lr_act": 4e-5, "lr_wscale": 1e-4, "round_weight": 0.01},
}
PRESETS = tuple(PRESET_DEFAULTS)


class Method:
    """A post-training quantization method. Subclass it, set the class attributes, decorate with
    `@register_method`.

    name:        the `--method` value (and `quant.json`'s config.method).
    help:        one line for listings.
    granularity: "block": residual/transformer blocks as units (layers outside any block alone);
                 "layer": every Conv/Linear alone, in execution order.
    phases:      run in order on every unit; none: round to nearest after the scale search (rtn).
    defaults():  learning parameters (iters, lr_round, lr_act, lr_wscale, round_weight) a config leaves
                 unset, by preset."""

    name: ClassVar[str]
    help: ClassVar[str]
    granularity: ClassVar[str] = "block"
    phases: ClassVar[tuple[Phase, ...]] = ()

    def defaults(self, preset: str) -> dict[str, Any]:
        return dict(PRESET_DEFAULTS[preset])

    def phases_for(self, weight_only: bool) -> list[Phase]:
        return [p for p in (ph.for_config(weight_only) for ph in self.phases) if p is not None]

    def __repr__(self) -> str:
        return f"<method {self.name}>"


METHODS: Registry[Method] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register an instance of `cls` under `cls.name`."""
    if cls.granularity not in ("block", "layer"):
        raise ValueError(f"method {cls.name!r}: granularity must be 'block' or 'layer', got {cls.granularity!r}")
    METHODS.register(cls.name, cls())
    return cls


@register_method
class RTN(Method):
    name = "rtn"
    help = "Lp scale search + round to nearest"


@register_method
class AdaRound(Method):
    name = "adaround"
    help = "layer-wise learned rounding on each layer's output (before its activation; the paper fits after it)"
    granularity = "layer"
    phases = (Phase(learn_round=True),)


@register_method
class BRECQ(Method):
    name = "brecq"
    help = ("block-wise learned rounding (the block's own activations float), then LSQ step sizes for half as many "
            "iterations, unit by unit (the reference makes two passes over the network)")
    phases = (Phase(learn_round=True, acts_on=False, finalize_weights=True),
              Phase(learn_act=True, iters_div=2))


@register_method
class QDrop(Method):
    name = "qdrop"
    help = "block-wise rounding and LSQ step sizes jointly, with QDrop"
    phases = (Phase(learn_round=True, learn_act=True, drop=True),)


@register_method
class Genie(Method):
    name = "genie"
    help = "qdrop plus learned per-channel weight scales (Genie-M)"
    phases = (Phase(learn_round=True, learn_act=True, learn_wscale=True, drop=True),)
