"""`QATConfig`: what `mixq_onnx.qat.train` learns and on which budget. Light (no torch): the CLI validates
options with it before the model loads."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import SEED_MAX, MixqError, check_int, refuse_unused
from ..registry import check_augment, check_loss

QAT_METHODS = ("nipq", "lsq")
NOISES = ("hist", "uniform")
RANGE_INITS = ("official", "lp")
SCHEDULES = ("restart", "continuous")
BUDGET_SCOPES = ("all", "learned")  # which quantizers --target-bits averages over
MIN_BITS, TRAIN_MAX_BITS = 2, 14  # NIPQ's bit-width range: b = 2 + 12 * sigmoid(theta_b)
#: fields only --method nipq reads (lsq refuses them when set)
NIPQ_ONLY = ("noise", "qlr", "max_bits", "init_bits", "range_init", "budget_weight", "budget_rate", "tolerance",
             "budget_over")
FLOAT_BITS = 16  # --max-bits 16: what a float layer counts as once deployed (FP16 or wider)


@dataclass
class QATConfig:
    """Quantization-aware training (issue 14).

    nipq: learned bits and ranges under a budget (`target_bits` or `target_gbops`), pseudo-quantization
    noise, then `final_epochs` of hard quantization with the bits frozen. lsq: fixed `wbits`/`abits`,
    LSQ step sizes with a straight-through estimator, on the same schedule (the baseline)."""

    method: str = "nipq"
    target_bits: float | None = None  # average bits, of the weights and of the activations (each)
    # which quantizers target_bits averages over. all: every one, the fixed first/last layers' included (the
    # network's real average); learned: those whose bits are learned, the fixed ones (and a pool feeding a fixed
    # layer, at that layer's bits as `quantize` gives it) outside, as "W4A4" keeps its first/last layers at 8 bits
    budget_over: str = "all"
    target_gbops: float | None = None  # sum over Conv/Linear of MACs * b_w * b_a, in 1e9
    wbits: int | None = None  # lsq only [default: 4]; nipq learns the bits and refuses them
    abits: int | None = None  # lsq only [default: 4]
    max_bits: int = 8  # deployment cap of a learned bit-width; 16: a layer that learns more than 8 stays float
    first_last_bits: int | None = 8  # None (or 0, as the CLI's --first-last-bits 0): learned like the rest
    noise: str = "hist"  # nipq: "hist" (measured rounding-error histogram) or "uniform" U(-0.5, 0.5)
    epochs: int = 10  # nipq: noise phase; lsq: first phase (same schedule)
    final_epochs: int = 2  # hard quantization with frozen bits (STE), both methods
    lr: float = 1e-3  # weights, SGD momentum 0.9, cosine to 0 in each phase
    qlr: float = 2e-2  # nipq's noise-phase quantizer parameters (theta_b, theta_alpha)
    step_lr: float = 2e-3  # LSQ step sizes in the hard phases (both methods); 10x lower than qlr, see docs
    final_lr: float | None = None  # weights in the final phase [default: lr]
    # restart: each phase anneals its own cosine from its lr to 0; continuous: the phases are consecutive slices
    # of one cosine over epochs + final_epochs, as the official NIPQ code's single scheduler
    schedule: str = "restart"
    # also learn each quantized layer's float bias (the folded BatchNorm shift), stored in the result folder; both
    # papers fine-tune every parameter, BN's affine shift included (False: biases keep the checkpoint's values)
    train_biases: bool = False
    max_update: float = 0.01  # trust region: lr * |grad| of a weight or step tensor <= this fraction of its norm
    batch_size: int = 128
    seed: int = 0
    kd_weight: float = 0.0  # labelled data: weight of KD from the FP model next to CE (cache: KD only)
    loss: str = "auto"  # auto: KD on a cache, CE on labels; ce needs labels; kd on labels: CE + KD (weight 1 if 0)
    temperature: float = 4.0
    augment: str = "none"  # "flip-crop": random mirror and shift of each training image (the shared loop's)
    budget_weight: float = 1.0  # weight of the budget penalty (nipq)
    budget_rate: float = 0.0  # nipq: dual-ascent rate of the budget's multipliers (0: the fixed penalty alone)
    range_init: str = "official"  # nipq: initial ranges as the official code, or "lp" (the budget's Lp clip)
    init_bits: float = 8.0  # nipq: starting bit-width of the learned quantizers
    tolerance: float = 0.05  # rounding to the budget: average bits within this (GBOPs: this fraction)

    def __post_init__(self) -> None:
        if self.first_last_bits == 0:
            self.first_last_bits = None

    @property
    def bits_cap(self) -> int:
        """The widest frozen bit-width: `max_bits`, or NIPQ's 14 under `--max-bits 16` (more than 8: float)."""
        return min(self.max_bits, TRAIN_MAX_BITS)

    def validate(self) -> QATConfig:
        """The config to train with (lsq's unset bits filled in), or a one-line MixqError."""
        if self.method not in QAT_METHODS:
            raise MixqError(f"unknown QAT method {self.method!r}: choose one of {', '.join(QAT_METHODS)}")
        if self.range_init not in RANGE_INITS:
            raise MixqError(f"--range-init must be one of {', '.join(RANGE_INITS)}, got {self.range_init!r}")
        if self.schedule not in SCHEDULES:
            raise MixqError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.budget_over not in BUDGET_SCOPES:
            raise MixqError(f"--budget-over must be one of {', '.join(BUDGET_SCOPES)}, got {self.budget_over!r}")
        if self.noise not in NOISES:
            raise MixqError(f"--noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        check_int("--epochs", self.epochs, 1)
        check_int("--final-epochs", self.final_epochs, 0)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0, SEED_MAX)
        check_int("--max-bits", self.max_bits)
        for opt, b in (("--wbits", self.wbits), ("--abits", self.abits), ("--first-last-bits", self.first_last_bits)):
            if b is not None:
                check_int(opt, b)
        check_augment(self.augment)
        check_loss(self.loss)
        if not (2 <= self.max_bits <= 8 or self.max_bits == FLOAT_BITS):
            raise MixqError(f"--max-bits must be between 2 and 8, or {FLOAT_BITS} (a layer that learns more than 8 "
                            f"bits stays float), got {self.max_bits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise MixqError(f"--first-last-bits must be between 2 and 8 (0 or None: learned), got {self.first_last_bits}")
        for opt, v in (("--lr", self.lr), ("--qlr", self.qlr), ("--step-lr", self.step_lr),
                       ("--final-lr", self.final_lr),
                       ("the temperature", self.temperature)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise MixqError(f"{opt} must be positive, got {v}")
        if not (math.isfinite(self.max_update) and self.max_update > 0):
            raise MixqError(f"--max-update must be positive, got {self.max_update}")
        if self.batch_size < 1:
            raise MixqError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.kd_weight) and self.kd_weight >= 0):
            raise MixqError(f"--kd-weight must be >= 0, got {self.kd_weight}")
        if self.method == "lsq":
            if self.target_bits is not None or self.target_gbops is not None:
                raise MixqError("--target-bits/--target-gbops are budgets of --method nipq; lsq trains fixed "
                                "--wbits/--abits")
            refuse_unused(self, NIPQ_ONLY, "by --method lsq (they set NIPQ's noise phase and budget)")
            done = replace(self, wbits=4 if self.wbits is None else self.wbits,
                           abits=4 if self.abits is None else self.abits)
            for opt, v in (("--wbits", done.wbits), ("--abits", done.abits)):
                if not 2 <= v <= 8:
                    raise MixqError(f"{opt} must be between 2 and 8, got {v}")
            return done
        if self.wbits is not None or self.abits is not None:
            raise MixqError("--wbits/--abits fix the bits of --method lsq; nipq learns them (use --target-bits)")
        if self.target_bits is not None and self.target_gbops is not None:
            raise MixqError("give one budget: --target-bits or --target-gbops, not both")
        if self.target_bits is None and self.target_gbops is None:
            raise MixqError("--method nipq needs a budget: --target-bits B or --target-gbops G")
        if self.budget_over != "all" and self.target_bits is None:
            raise MixqError("--budget-over scopes the average of --target-bits; GBOPs count every layer")
        if self.budget_over == "learned" and self.first_last_bits is None:
            raise MixqError("--budget-over learned leaves the fixed first/last layers out of the averages; with "
                            "--first-last-bits 0 none is fixed: drop it")
        if self.target_bits is not None and not (math.isfinite(self.target_bits) and 2 <= self.target_bits <= 8):
            raise MixqError(f"--target-bits must be between 2 and 8, got {self.target_bits}")
        if self.target_gbops is not None and not (math.isfinite(self.target_gbops) and self.target_gbops > 0):
            raise MixqError(f"--target-gbops must be positive, got {self.target_gbops}")
        if not (math.isfinite(self.budget_weight) and self.budget_weight >= 0):
            raise MixqError(f"--budget-weight must be >= 0, got {self.budget_weight}")
        if not (math.isfinite(self.budget_rate) and self.budget_rate >= 0):
            raise MixqError(f"--budget-rate must be >= 0, got {self.budget_rate}")
        if not MIN_BITS <= self.init_bits < TRAIN_MAX_BITS:
            raise MixqError(f"--init-bits must be in [{MIN_BITS}, {TRAIN_MAX_BITS}), got {self.init_bits}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise MixqError(f"the budget tolerance must be positive, got {self.tolerance}")
        return self

    def lr_windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The slices of one cosine that the first phase (noise / LSQ's hard phase) and the final phase cover."""
        if self.schedule == "restart" or self.final_epochs == 0:
            return (0.0, 1.0), (0.0, 1.0)
        cut = self.epochs / (self.epochs + self.final_epochs)
        return (0.0, cut), (cut, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
