"""The differentiable pieces of QAT: NIPQ's pseudo-quantization noise and learned bit-width, and LSQ's hard
fake quantization with a straight-through estimator.

NIPQ (Shin et al., CVPR 2023) trains without rounding: inside the range a value becomes x + n * delta with
n drawn from the distribution that rounding would produce, so the gradients of the bits and the range are
smooth; only the final phase quantizes for real.
"""
from __future__ import annotations

import torch

from ..quant.spec import int_range
from .config import MIN_BITS, TRAIN_MAX_BITS

N_BINS = 256
TABLE = 1 << 16
SUBSAMPLE = 1 << 16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def cap_ste(x: torch.Tensor, cap: float) -> torch.Tensor:
    """min(x, cap) forward, identity backward: a capped bit-width still feels the budget's pull."""
    return x - (x - x.clamp(max=cap)).detach()


def bits_of(theta: torch.Tensor) -> torch.Tensor:
    """Continuous bit-width b = 2 + 12 * sigmoid(theta), in (2, 14)."""
    return MIN_BITS + (TRAIN_MAX_BITS - MIN_BITS) * torch.sigmoid(theta)


def theta_of(bits: float) -> float:
    """Inverse of `bits_of`."""
    p = (bits - MIN_BITS) / (TRAIN_MAX_BITS - MIN_BITS)
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """theta with softplus(theta) = y (y > 0): ranges are stored this way so they stay positive."""
    y = y.double().clamp(min=1e-8)
    return torch.where(y > 20, y, torch.log(torch.expm1(y))).float()


def sample_noise(err: torch.Tensor, shape: torch.Size | tuple[int, ...], mode: str = "hist",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise in units of the step, shaped `shape`: "uniform" draws U(-0.5, 0.5); "hist" draws from the
    256-bin histogram of `err` (measured normalised rounding errors; values outside [-0.5, 0.5] and NaN are
    ignored), uniformly within a bin. The inverse of that piecewise-linear CDF is tabulated at 2^16 points
    and looked up with random indices (a gather, several times cheaper on CPU than a search per element)."""
    n = 1
    for d in shape:
        n *= int(d)
    dev = err.device
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=dev).view(shape) - 0.5
    if mode != "hist":
        raise ValueError(f"unknown noise {mode!r}")
    hist = torch.histc(err.detach().float().reshape(-1), bins=N_BINS, min=-0.5, max=0.5).double()
    total = hist.sum()
    if not bool(total > 0):  # nothing inside the range: no error measured
        return torch.rand(n, generator=generator, device=dev).view(shape) - 0.5
    cdf = torch.cat([hist.new_zeros(1), torch.cumsum(hist, 0) / total])  # at the N_BINS + 1 bin edges
    u = (torch.arange(TABLE, device=dev, dtype=torch.float64) + 0.5) / TABLE
    k = torch.searchsorted(cdf[1:], u, right=True).clamp(max=N_BINS - 1)  # the bin holding probability u
    lo, hi = cdf[k], cdf[k + 1]
    table = ((k + (u - lo) / (hi - lo).clamp(min=1e-300)) / N_BINS - 0.5).float()
    idx = torch.randint(0, TABLE, (n,), generator=generator, device=dev, dtype=torch.int32)
    return torch.index_select(table, 0, idx).view(shape)


def levels(bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """Positive levels of NIPQ's grid at (possibly fractional, STE-rounded) `bits`: the top of `int_range`'s
    grid (2^(b-1)-1 signed, 2^b-1 unsigned) at those widths."""
    return int_range(bits, signed, narrow=True)[1]


def rounding_errors(x: torch.Tensor, alpha: torch.Tensor, n_lv: torch.Tensor, signed: bool) -> torch.Tensor:
    """Normalised errors (round(v) - v, v = x / alpha * levels) of the values strictly inside the range, NaN
    elsewhere. With a scalar range, a random 2^16-value subsample of a large tensor (enough for 256 bins)."""
    x = x.detach()
    if alpha.numel() == 1 and x.numel() > SUBSAMPLE:
        x = torch.index_select(x.reshape(-1), 0, torch.randint(0, x.numel(), (SUBSAMPLE,), dtype=torch.int32).to(x.device))
    a = alpha.detach()
    v = x / a * n_lv.detach()
    inside = (x < a) & ((x > -a) if signed else (x > 0))
    return torch.where(inside, torch.round(v) - v, float("nan"))


class NoisyClip(torch.autograd.Function):
    """clip(x) with `noise * delta` added strictly inside the range, as one autograd node: the nested
    where/minimum of the plain form costs several full-size passes more in backward on CPU.
    Gradients: x inside; alpha from the clipped values (+1 above, -1 below when signed); delta from the noise of
    the values inside only (a clipped value's output is the range's end: no noise reaches it, as in the official
    code's nested where). `noise` may hold draws for every element: the clipped ones are ignored."""

    @staticmethod
    def forward(ctx, x, alpha, delta, noise, upper, lower, signed: bool):
        out = torch.where(lower, -alpha if signed else torch.zeros_like(alpha), x + noise * delta)
        out = torch.where(upper, alpha, out)
        ctx.save_for_backward(noise, upper, lower)
        ctx.signed = signed
        ctx.shapes = (alpha.shape, delta.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        noise, upper, lower = ctx.saved_tensors
        a_shape, d_shape = ctx.shapes
        inner = grad.masked_fill(upper | lower, 0.0)
        gx = inner if ctx.needs_input_grad[0] else None
        ga = gd = None
        if ctx.needs_input_grad[1]:
            ga = grad * upper
            if ctx.signed:
                ga = ga - grad * lower
            ga = ga.sum_to_size(a_shape)
        if ctx.needs_input_grad[2]:
            gd = (inner * noise).sum_to_size(d_shape)
        return gx, ga, gd, None, None, None, None


def nipq_quant(x: torch.Tensor, bits: torch.Tensor, alpha: torch.Tensor, signed: bool, noise: str = "hist",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """NIPQ's training forward: clamp to [-alpha, alpha] ([0, alpha] unsigned); strictly inside, x + n * delta
    with delta = alpha / levels(bits) and n from `sample_noise` ("hist": of the errors rounding x would make
    now). Gradients reach x (inside), alpha (outside, and through delta) and bits (through delta)."""
    n_lv = levels(bits, signed)
    delta = alpha / n_lv
    with torch.no_grad():
        a = alpha.detach()
        upper = x >= a
        lower = x <= -a if signed else x <= 0
        err = rounding_errors(x, a, n_lv, signed) if noise == "hist" else x.new_zeros(0)
        n = sample_noise(err, x.shape, noise, generator)
    return NoisyClip.apply(x, alpha, delta, n, upper, lower, signed)


def lsq_quant(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, grad_scale: float,
              round_fn=torch.round) -> torch.Tensor:
    """LSQ (Esser et al. 2020): clamp(round(x / s), lo, hi) * s with an STE for the rounding and the step's
    gradient scaled by `grad_scale` (1 / sqrt(elements * hi)). `round_fn` is the deployed rounding (weights
    round half up, activations half to even), so the trained grid is the exported one. `step` may be per
    channel (broadcast against x).

    The paper's gradients (its eq. 3, and the official NIPQ code's hardtanh-then-round): a value is inside when
    -Q_N < v < Q_P, before rounding: gradient 1 to x and round(v) - v to the step, also where round(v) is an end
    code. Otherwise 0 to x and the grid's end to the step, also for v within half a step beyond the end, which
    rounds onto the end code. (`quant`'s PTQ LSQ rounds first and then clamps, as QDrop's reference does, so that
    half step counts as inside there. Clamping the straight-through value zeroed the gradient of every value
    rounding onto an end code from inside, depending on which side of the end float rounding left it.)"""
    s = step * grad_scale + (step - step * grad_scale).detach()
    v = x / s
    with torch.no_grad():
        inside = (v > lo) & (v < hi)
        code = round_fn(v).clamp(lo, hi)
    return torch.where(inside, v + (code - v).detach(), code) * s
