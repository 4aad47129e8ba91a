"""Quantization recipes as config objects (torchao style): `quantize_(model, QuantConfig(...), data)`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import MixqError

METHODS = ("rtn", "adaround", "brecq", "qdrop", "genie")
PRESETS = ("fast", "paper")
BLOCK_SIZES = (32, 64, 128)


@dataclass
class QuantConfig:
    """What to quantize and how. Bits 2..8; `abits=16` means weight-only (no activation quantizers)."""

    wbits: int = 4
    abits: int = 4
    method: str = "qdrop"
    symmetric: bool = True
    first_last_bits: int | None = 8  # None: same as the rest
    preset: str = "fast"
    # learning (None: from the preset)
    iters: int | None = None
    batch_size: int | None = None
    num_samples: int | None = None
    lr_round: float | None = None  # AdaRound V (Adam)
    lr_act: float | None = None  # LSQ activation step sizes
    lr_wscale: float | None = None  # Genie-M weight scales
    round_weight: float | None = None  # lambda of the rounding regulariser
    drop_prob: float = 0.5  # QDrop
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    p_norm: float = 2.4  # Lp scale search
    scale_grid: int = 80  # clipping ratios tried by the weight-scale search
    block_size: int | None = None  # INT4 weight-only GEMMs: Linear weights only, block scales along K
    holdout: float = 0.1  # calibration fraction held out for the generalisation gap
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> QuantConfig:
        if self.method not in METHODS:
            raise MixqError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise MixqError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if not 2 <= self.wbits <= 8:
            raise MixqError(f"--wbits must be between 2 and 8, got {self.wbits}")
        if not (2 <= self.abits <= 8 or self.abits == 16):
            raise MixqError(f"--abits must be between 2 and 8 (or 16 for weight-only), got {self.abits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise MixqError(f"--first-last-bits must be between 2 and 8, got {self.first_last_bits}")
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
        if not 0 <= self.drop_prob <= 1:
            raise MixqError(f"--drop-prob must be in [0, 1], got {self.drop_prob}")
        return self

    def resolved(self) -> QuantConfig:
        """Fill unset learning parameters from the preset (the papers' values for `paper`)."""
        paper = self.preset == "paper"
        d = {
            "iters": 20000 if paper else 400,
            "batch_size": 32,
            "num_samples": 1024,
            "lr_round": 1e-3 if paper else 3e-3,
            "lr_act": 4e-5 if paper else 4e-4,
            "lr_wscale": 1e-4 if paper else 1e-4,
            "round_weight": 0.01 if self.method in ("brecq", "qdrop", "genie") else 0.01,
        }
        return replace(self, **{k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in d.items()})

    @property
    def weight_only(self) -> bool:
        return self.abits == 16

    @classmethod
    def int4_weight_only(cls, block_size: int = 128, **kw: Any) -> QuantConfig:
        """W4A16 for TensorRT's INT4 weight-only GEMMs: Linear weights in blocks, convolutions stay float."""
        return cls(wbits=4, abits=16, method=kw.pop("method", "rtn"), first_last_bits=None,
                   block_size=block_size, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["beta"] = list(self.beta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "beta" in kw:
            kw["beta"] = tuple(kw["beta"])
        return cls(**kw)
