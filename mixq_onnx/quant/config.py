"""Quantization recipes as config objects (torchao style): `quantize_(model, QuantConfig(...), data)`.

A `QuantConfig` is the part every method shares (bits, method, preset, samples, scale search, ...) plus
`params`, the learning parameters of the reconstruction (`ReconParams`). The flat keyword form
`QuantConfig(wbits=4, method="qdrop", iters=50, lr_round=1e-3)` still works: learning-parameter keywords
fill `params`, and `cfg.iters`, `cfg.lr_round`, ... read and write `cfg.params`. `to_dict` (quant.json's "config") stays flat.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import MixqError
from ..methods import METHODS, PRESETS

BLOCK_SIZES = (32, 64, 128)

__all__ = ["BLOCK_SIZES", "METHODS", "PLACEMENTS", "PRESETS", "QuantConfig", "ReconParams"]


@dataclass
class ReconParams:
    """Learning parameters of the reconstruction; None: the method's default for the preset
    (`Method.defaults`). RTN learns nothing and ignores them (they are still recorded)."""

    iters: int | None = None  # iterations per unit
    lr_round: float | None = None  # AdaRound V (Adam)
    lr_act: float | None = None  # LSQ activation step sizes
    lr_wscale: float | None = None  # Genie-M weight scales
    round_weight: float | None = None  # lambda of the rounding regulariser
    drop_prob: float = 0.5  # QDrop
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # rounding-regulariser annealing, start and end


PARAM_NAMES = tuple(f.name for f in fields(ReconParams))

#: Common settings a config leaves unset (None), whatever the method.
COMMON_DEFAULTS = {"batch_size": 32, "num_samples": 1024}

#: Revisions of the placement rules (`quant.graph.prepare`); a new one changes where quantizers go for some model,
#: so a result folder records the revision it was written with and is rebuilt by it.
#: 1: the rules before 2026-12-01.
#: 2: with share_quantizers, a block's quantizer of its own input also joins the calling graph's quantizers of that
#:    tensor (HRNet: a branch block and a transition conv read one tensor); an add whose inputs are a sum that a
#:    layer started and another tensor quantizes that tensor as its identity (HRNet's fuse layers: conv + x + y).
#: 3: a BatchNorm1d that normalises the features of a Linear's output (through row-major reshapes: LeViT's
#:    LinearNorm) is folded into that Linear, and `x.reshape_as(y)`/`x.view_as(y)` count as reshapes of x when an add
#:    asks whether its input comes from a layer (so the residual add after a folded LinearNorm quantizes its identity).
#: 4: the modules timm keeps opaque to torch.fx (ConViT's GPSA, NFNet's NormFreeBlock, MobileViT's and TinyViT's
#:    blocks, EfficientViT's LiteMLA, VGG's ConvMlp) are traced too (`quant.tracing.trace_leaves`), so their
#:    Conv/Linear layers, MatMuls and residual adds get quantizers like any other code instead of staying float; and
#:    a reader of a tensor's shape alone no longer keeps an identity of the tensor from counting as the tensor when
#:    quantizers are shared (EfficientViT: `B, _, H, W = x.shape` beside the qkv conv that reads x).
#: 5: an nn.AvgPool2d in ceil mode is an integer pool (`graph.quantize_pools`) where its input, in one example forward,
#:    leaves no partial window (ResNet-D's and NF-RegNet's 2x2 stride-2 downsampling shortcuts on even sizes); up to 4
#:    it averaged float values, and the engine fell back to float around it.
#: 6: a BatchNorm whose output a Linear or an unpadded conv alone reads (through exact identities) is folded into
#:    that layer's weights (`graph.fold_input_bn`): LeViT's and RepViT's classifier heads (BatchNorm1d, dropout,
#:    Linear) had a float BatchNormalization between two INT8 kernels, and their two heads read one tensor through two
#:    quantizers. The first/last-layer policy's last layers are every layer whose output reaches the model's output
#:    through no other layer (`graph.output_layers`: both heads of a distilled network), not the last one called
#:    alone, which gave a distilled network's two heads two grids, so no shared quantizer.
PLACEMENTS = (1, 2, 3, 4, 5, 6)

#: quant.json's "config" object, key by key in this order (the format predates the split into parts).
DICT_KEYS = ("wbits", "abits", "method", "symmetric", "first_last_bits", "preset", "iters", "batch_size",
             "num_samples", "lr_round", "lr_act", "lr_wscale", "round_weight", "drop_prob", "warmup", "beta",
             "p_norm", "scale_grid", "block_size", "holdout", "seed")


@dataclass(init=False)
class QuantConfig:
    """What to quantize and how. Bits 2..8; `abits=16` means weight-only (no activation quantizers)."""

    wbits: int = 4
    abits: int = 4
    method: str = "qdrop"  # a name in `METHODS`
    symmetric: bool = True
    first_last_bits: int | None = 8  # None: same as the rest
    preset: str = "fast"  # learning-parameter defaults: "fast" or "paper"
    batch_size: int | None = None  # reconstruction batch (None: 32)
    num_samples: int | None = None  # calibration images used (None: 1024)
    p_norm: float = 2.4  # Lp scale search
    scale_grid: int = 80  # clipping ratios tried by the weight-scale search
    block_size: int | None = None  # INT4 weight-only GEMMs: Linear weights only, block scales along K
    holdout: float = 0.1  # calibration fraction held out for the generalisation gap
    seed: int = 0
    share_quantizers: bool = True  # one quantizer per tensor and grid (graph.share_quantizers); quant.json without it: False
    # revision of the placement rules (`PLACEMENTS`); quant.json without "placement": 1, so a folder keeps the layout
    # it was written with
    placement: int = 6
    integer_pools: bool = True  # average pools read integer codes (graph.quantize_pools); quant.json without it: False
    # Conv2d/Linear left unquantized (module names or fnmatch patterns): no quantizer, float in the graph and the
    # engine; `graph.prepare` refuses a pattern that matches no layer
    float_layers: tuple[str, ...] = ()
    params: ReconParams = field(default_factory=ReconParams)

    def __init__(self, wbits: int = 4, abits: int = 4, method: str = "qdrop", symmetric: bool = True,
                 first_last_bits: int | None = 8, preset: str = "fast", *, batch_size: int | None = None,
                 num_samples: int | None = None, p_norm: float = 2.4, scale_grid: int = 80,
                 block_size: int | None = None, holdout: float = 0.1, seed: int = 0,
                 share_quantizers: bool = True, integer_pools: bool = True, float_layers: Sequence[str] = (),
                 placement: int = 6, params: ReconParams | None = None, **learning: Any):
        unknown = sorted(set(learning) - set(PARAM_NAMES))
        if unknown:
            raise TypeError(f"QuantConfig() got an unexpected keyword argument {unknown[0]!r}")
        self.wbits, self.abits, self.method, self.symmetric = wbits, abits, method, symmetric
        self.first_last_bits = first_last_bits or None  # 0 (the CLI's --first-last-bits 0) means None
        self.preset, self.batch_size, self.num_samples = preset, batch_size, num_samples
        self.p_norm, self.scale_grid, self.block_size, self.holdout, self.seed = p_norm, scale_grid, block_size, holdout, seed
        self.share_quantizers, self.integer_pools = share_quantizers, integer_pools
        self.placement = placement
        self.float_layers = (float_layers,) if isinstance(float_layers, str) else tuple(float_layers)
        self.params = replace(params if params is not None else ReconParams(), **learning)

    def validate(self) -> QuantConfig:
        METHODS.lookup(self.method)  # "unknown method 'x': choose one of rtn, adaround, ..."
        if self.preset not in PRESETS:
            raise MixqError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if not 2 <= self.wbits <= 8:
            raise MixqError(f"--wbits must be between 2 and 8, got {self.wbits}")
        if not (2 <= self.abits <= 8 or self.abits == 16):
            raise MixqError(f"--abits must be between 2 and 8 (or 16 for weight-only), got {self.abits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise MixqError(f"--first-last-bits must be between 2 and 8 (0 or None: as the rest), got {self.first_last_bits}")
        if self.block_size is not None:
            if self.block_size not in BLOCK_SIZES:
                raise MixqError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
            if not self.weight_only or self.wbits > 4:
                raise MixqError("block scales are for INT4 weight-only GEMMs: use --wbits 4 (or less) --abits 16")
        for opt, v in (("--iters", self.iters), ("--batch-size", self.batch_size), ("--num-samples", self.num_samples)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise MixqError(f"{opt} must be a positive integer, got {v!r}")
        if self.scale_grid < 1:
            raise MixqError(f"scale_grid must be at least 1, got {self.scale_grid}")
        if isinstance(self.placement, bool) or self.placement not in PLACEMENTS:
            raise MixqError(f"placement must be one of {', '.join(map(str, PLACEMENTS))}, got {self.placement!r}")
        for key in ("share_quantizers", "integer_pools"):
            if not isinstance(getattr(self, key), bool):
                raise MixqError(f"{key} must be true or false, got {getattr(self, key)!r}")
        bad = [p for p in self.float_layers if not isinstance(p, str) or not p.strip() or "," in p]
        if bad:
            raise MixqError(f"--float-layers: each entry is a layer name or pattern (no commas, not empty), got {bad[0]!r}")
        if not 0 <= self.drop_prob <= 1:
            raise MixqError(f"--drop-prob must be in [0, 1], got {self.drop_prob}")
        return self

    def resolved(self) -> QuantConfig:
        """Fill unset settings: learning parameters from the method's defaults for the preset (the papers'
        values for `paper`), batch size and sample count from `COMMON_DEFAULTS`."""
        defaults = METHODS.lookup(self.method).defaults(self.preset)
        params = replace(self.params, **{k: v for k, v in defaults.items() if getattr(self.params, k) is None})
        fill = {k: v for k, v in COMMON_DEFAULTS.items() if getattr(self, k) is None}
        if self.block_size:  # INT4 weight-only GEMMs: every Linear gets block scales, no first/last exception
            fill["first_last_bits"] = None
        return replace(self, params=params, **fill)

    @property
    def weight_only(self) -> bool:
        return self.abits == 16

    @classmethod
    def int4_weight_only(cls, block_size: int = 128, **kw: Any) -> QuantConfig:
        """W4A16 for TensorRT's INT4 weight-only GEMMs: Linear weights in blocks, convolutions stay float."""
        return cls(wbits=4, abits=16, method=kw.pop("method", "rtn"), first_last_bits=None,
                   block_size=block_size, **kw)

    def to_dict(self) -> dict[str, Any]:
        """quant.json's "config": the flat keys of `DICT_KEYS`, then "share_quantizers": true when quantizers are
        shared, "integer_pools": true when pools are quantized, "placement" from revision 2 on and "float_layers" when some layers stay float (each absent
        otherwise, as in every quant.json written before the rule existed, so those files and the graphs exported
        from them stay the same byte for byte), then "extra": {} — the key of a removed field (QuantConfig.extra,
        never used), kept so that files stay the same value for value."""
        d = {k: getattr(self, k) for k in DICT_KEYS}
        d["beta"] = list(self.beta)
        if self.share_quantizers:
            d["share_quantizers"] = True
        if self.integer_pools:
            d["integer_pools"] = True
        if self.placement >= 2:
            d["placement"] = self.placement
        if self.float_layers:  # only then: files without float layers stay as they were
            d["float_layers"] = list(self.float_layers)
        d["extra"] = {}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Read `to_dict`'s form (flat, as every quant.json has it); unknown keys (such as "extra") are ignored.
        A config without "share_quantizers" (written before sharing, or with it off) places one quantizer per
        consumer, as its file records; one without "placement" has revision 1's placements; one without "integer_pools" has no pool quantizers."""
        names = {f.name for f in fields(cls) if f.name != "params"} | set(PARAM_NAMES)
        kw = {k: v for k, v in d.items() if k in names}
        if "beta" in kw:
            kw["beta"] = tuple(kw["beta"])
        if "float_layers" in kw:
            fl = kw["float_layers"]
            if not isinstance(fl, list):
                raise MixqError(f"config float_layers must be a list of layer names, got {fl!r}")
            kw["float_layers"] = tuple(fl)
        kw.setdefault("share_quantizers", False)
        kw.setdefault("placement", 1)
        kw.setdefault("integer_pools", False)
        return cls(**kw)


def _forward(name: str) -> property:
    def get(self: QuantConfig) -> Any:
        return getattr(self.params, name)

    def set_(self: QuantConfig, value: Any) -> None:
        setattr(self.params, name, value)

    return property(get, set_, doc=f"`params.{name}` (the flat, pre-split spelling)")


for _name in PARAM_NAMES:  # cfg.iters, cfg.lr_round, ...: read and write cfg.params
    setattr(QuantConfig, _name, _forward(_name))
del _name
