"""SymReg (symmetry regularisation) and SatNL (saturating nonlinearity) for quantization-robust weights.

Choices made (the paper's text is not available; each is this project's reading):
- SymReg acts on every Conv and Linear weight except depthwise convolutions, per output channel, which
  is the grid mixq-onnx quantizes weights on. A channel's weights are sorted; the i-th smallest is paired
  with the i-th largest and the penalty is the mean of (w_(i) + w_(n+1-i))^2, divided by the channel's
  squared max |w| (detached) so that BETA does not depend on layer size or weight magnitude. A symmetric
  channel scores exactly 0: then E[w] = E[Q(w)] = 0 under a zero-point-0 quantizer, so quantization
  shifts no mean. Pairing "2:2" first sums adjacent sorted pairs (w_(2j-1) + w_(2j)) and pairs those
  sums the same way: half as many terms (the sort is the same), and a weaker condition: a symmetric channel
  still scores 0, but so do some asymmetric ones ([-3, -1, 2, 2]: 2:2 penalty 0, 1:1 penalty 0.11, and at 2
  bits its codes' mean is 0.75 where its mean is 0). 1:1 is the default.
- SatNL reparametrises each regularised weight as w = alpha * tanh(v / alpha), one alpha per layer,
  learned (default) or fixed. alpha starts at 1.001 * max |w| so that v = alpha * atanh(w / alpha) stays
  finite and the reparametrised layer reproduces the original weights at initialisation. It bounds the
  range the quantizer must cover by alpha and compresses the largest weights, so the grid spends its
  steps on the bulk. Learned alpha is the default: on the held-out images neither learned nor fixed alpha
  helped alone (docs/benchmarks.md, section robust), and the learned one shrinks, i.e. starts clipping,
  when SymReg trains beside it (ResNet-20's first conv: 1.87 -> 1.63 at lr 1e-2), which is where +both
  gains over SymReg alone at QDrop W2A4 on ResNet-20 (not on ResNet-8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import SEED_MAX, MixqError, check_int, refuse_unused
from ..registry import check_augment, check_bn_stats, check_loss

PAIRINGS = ("1:1", "2:2")
ALPHA_MARGIN = 1.001


@dataclass
class RobustConfig:
    """What `robustify` trains with (the loop is `mixq_onnx.training.train`)."""

    symreg: float = 0.0  # BETA, the SymReg weight; 0 = off
    pairing: str = "1:1"
    satnl: bool = False
    learn_alpha: bool = True
    sam: str | None = None  # None | "asam"
    rho: float = 0.5
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    kd_weight: float = 0.0  # labelled data: KD next to CE (a calibration cache always trains by KD)
    loss: str = "auto"  # auto: KD on a cache, CE on labels; ce needs labels; kd on labels: CE + KD (weight 1 if 0)
    augment: str = "none"  # "flip-crop": random mirror and shift of each training image (the shared loop's)
    bn_stats: str = "update"  # "freeze": BatchNorm keeps the checkpoint's running statistics (`TrainConfig.bn_stats`)

    def validate(self) -> RobustConfig:
        if not (math.isfinite(self.symreg) and self.symreg >= 0):
            raise MixqError(f"--symreg must be >= 0 and finite, got {self.symreg}")
        if self.pairing not in PAIRINGS:
            raise MixqError(f"--symreg-pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        check_int("--epochs", self.epochs, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0, SEED_MAX)
        if self.sam not in (None, "asam"):
            raise MixqError(f"--sam must be asam, got {self.sam!r}")
        for opt, v in (("--lr", self.lr), ("--rho", self.rho)):
            if not (math.isfinite(v) and v > 0):
                raise MixqError(f"{opt} must be positive, got {v}")
        if self.symreg == 0:
            refuse_unused(self, ("pairing",), "without --symreg (the pairing of its penalty)",
                          {"pairing": "--symreg-pairing"})
        if not self.satnl:
            refuse_unused(self, ("learn_alpha",), "without --satnl (it keeps SatNL's clip fixed)",
                          {"learn_alpha": "--fixed-alpha"})
        if self.sam is None:
            refuse_unused(self, ("rho",), "without --sam asam (its neighbourhood radius)")
        check_augment(self.augment)
        check_loss(self.loss)
        check_bn_stats(self.bn_stats)
        return self


def regularized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv2d and Linear layers whose weights SymReg and SatNL act on: the layers `quantize` quantizes
    (depthwise convolutions excluded). Other layers stay float, so regularising them buys nothing."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append((name, m))
    return out


def symreg_channel_penalty(w: torch.Tensor, pairing: str = "1:1") -> torch.Tensor:
    """Per-output-channel SymReg penalty of a weight [out, ...] (0 for a symmetric channel)."""
    if pairing not in PAIRINGS:
        raise MixqError(f"unknown SymReg pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")
    s = w.reshape(w.shape[0], -1).sort(dim=1).values
    if pairing == "2:2":
        n = s.shape[1]
        if n % 2:  # odd: the median sits on the axis of symmetry and pairs with nothing (an RGB stem's 27)
            s = torch.cat([s[:, : n // 2], s[:, n // 2 + 1:]], dim=1)
        s = s.reshape(s.shape[0], -1, 2).sum(-1) if s.shape[1] >= 2 else s
    k = s.shape[1] // 2
    if k == 0:
        return torch.zeros(s.shape[0], dtype=w.dtype, device=w.device)
    pair_sums = s[:, :k] + s.flip(1)[:, :k]
    scale = w.detach().reshape(w.shape[0], -1).abs().amax(1).clamp(min=1e-12)
    return pair_sums.pow(2).mean(1) / scale.pow(2)


def symreg_loss(model: nn.Module, pairing: str = "1:1") -> torch.Tensor:
    """Mean SymReg penalty over the regularised layers' channels (each layer weighs the same)."""
    terms = [symreg_channel_penalty(m.weight, pairing).mean() for _, m in regularized_layers(model)]
    if not terms:
        raise MixqError(f"{type(model).__name__} has no Conv or Linear layer for SymReg")
    return torch.stack(terms).mean()


class SatNL(nn.Module):
    """w = alpha * tanh(v / alpha) (a torch parametrization of a layer's `weight`)."""

    def __init__(self, alpha: float, learn_alpha: bool = True):
        super().__init__()
        a = torch.tensor(float(alpha))
        self.alpha = nn.Parameter(a) if learn_alpha else nn.Parameter(a, requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        a = self.alpha.abs().clamp(min=1e-12)
        return a * torch.tanh(v / a)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        a = float(self.alpha.detach().abs())
        return a * torch.atanh((w / a).clamp(-1 + 1e-7, 1 - 1e-7))


def apply_satnl(model: nn.Module, learn_alpha: bool = True) -> list[SatNL]:
    """Reparametrise every regularised layer's weight; returns the SatNL modules (their alphas)."""
    mods = []
    for _, m in regularized_layers(model):
        sat = SatNL(ALPHA_MARGIN * float(m.weight.detach().abs().max().clamp(min=1e-8)), learn_alpha).to(m.weight.device)
        parametrize.register_parametrization(m, "weight", sat)
        mods.append(sat)
    return mods


def remove_satnl(model: nn.Module) -> nn.Module:
    """Back to plain weights holding the effective w = alpha * tanh(v / alpha): every later stage (and
    `load_model`) sees an ordinary state dict."""
    for _, m in list(model.named_modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model
