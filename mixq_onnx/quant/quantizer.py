"""Fake quantizers: the single source of truth for every placement's bits, scale(s), sign and axis.

The ONNX exporter, the onnxruntime checker and the TensorRT builder all read these objects (through
`quant.json`), so what PyTorch simulates is exactly what the engine runs.

Conventions (TensorRT-legal in symmetric mode):
- weights: per output channel, zero point 0, narrow signed range [-(2^(b-1)-1), 2^(b-1)-1];
  after `finalize()` the integers are stored and the float weight is no longer consulted.
- activations: per tensor, zero point 0, signed full range [-2^(b-1), 2^(b-1)-1], or unsigned
  [0, 2^b-1] for non-negative inputs when b <= 7, so every grid is a subset of INT8.
- rounding: activations round half to even (as ONNX QuantizeLinear does); weight integers are
  floor(x) + (frac >= 0.5), which AdaRound's hard rounding reproduces at initialisation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by g (LSQ step-size gradient scaling)."""
    y = x * g
    return (x - y).detach() + y


class _LSQ(torch.autograd.Function):
    """Fused LSQ fake quantization: STE for x inside the grid, LSQ step-size gradient (scaled by g).

    Written out by hand because clamp/where backward is several times slower on CPU than this."""

    @staticmethod
    def forward(ctx, x, s, zp, lo: float, hi: float, g: float):
        v = x / s
        r = torch.round(v) + zp
        q = torch.clamp(r, lo, hi)
        ctx.save_for_backward(v, q, s, zp, r)
        ctx.lo, ctx.hi, ctx.g = lo, hi, g
        return (q - zp) * s

    @staticmethod
    def backward(ctx, grad):
        v, q, s, zp, r = ctx.saved_tensors
        inside = (r == q).to(grad.dtype)  # clamp did not bite: straight-through
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = ((grad * ((q - zp) - v * inside)).sum() * ctx.g).reshape(s.shape)
        return gx, gs, None, None, None, None


def weight_round(x: torch.Tensor) -> torch.Tensor:
    """Round half up via floor + (frac >= 0.5): the rounding AdaRound's hard decision starts from."""
    f = torch.floor(x)
    return f + ((x - f) >= 0.5).to(x.dtype)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Float {0,1} mask, 1 with probability p. p = 0.5 unpacks random bits (4x cheaper than rand on CPU)."""
    n = like.numel()
    if p == 0.5 and n % 64 == 0 and like.device.type == "cpu":
        r = torch.randint(-(2**63), 2**63 - 1, (n // 64,), dtype=torch.int64, generator=generator).view(torch.uint8)
        return ((r.unsqueeze(-1) >> _SHIFTS) & 1).view(like.shape).to(like.dtype)
    return (torch.rand(like.shape, generator=generator, device=like.device) < p).to(like.dtype)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1


class _Base(nn.Module):
    kind = "base"

    def __init__(self, name: str, bits: int, symmetric: bool = True):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.name = name
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.enabled = True

    @property
    def qrange(self) -> tuple[int, int]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        lo, hi = self.qrange
        return f"{self.name!r}, bits={self.bits}, range=[{lo},{hi}], symmetric={self.symmetric}"


class ActQuantizer(_Base):
    """Per-tensor activation quantizer with an LSQ step size and optional QDrop."""

    kind = "act"

    def __init__(self, name: str, bits: int, symmetric: bool = True, placement: str = "input"):
        super().__init__(name, bits, symmetric)
        self.placement = placement  # input (of a Conv/Gemm/MatMul) | residual (identity input of an add)
        self.signed = True
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.observing = False
        self.learning = False  # LSQ gradient scaling and QDrop apply only while learning
        self.drop_prob = 0.0
        self.max_samples = 1 << 16
        self._obs: list[torch.Tensor] = []
        self._obs_min = math.inf

    @property
    def qrange(self) -> tuple[int, int]:
        if not self.symmetric:
            return 0, 2**self.bits - 1
        return int_range(self.bits, self.signed, narrow=False)

    # -- observation for scale initialisation
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self._obs_min = min(self._obs_min, float(flat.min()))
        budget = self.max_samples - sum(t.numel() for t in self._obs)
        if budget <= 0:
            return
        if flat.numel() > budget:
            idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(len(self._obs)))[:budget]
            flat = flat[idx.to(flat.device)]
        self._obs.append(flat.cpu())

    def observed(self) -> torch.Tensor:
        return torch.cat(self._obs) if self._obs else torch.zeros(1)

    def clear_observations(self) -> None:
        self._obs = []
        self._obs_min = math.inf

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.qrange
        if self.learning and (self.scale.requires_grad or x.requires_grad):
            per_sample = x[0].numel() if x.ndim > 1 else x.numel()
            g = 1.0 / math.sqrt(per_sample * max(hi, 1))
            return _LSQ.apply(x, self.scale, self.zero_point, float(lo), float(hi), g)
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, lo, hi)
        return (q - self.zero_point) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        export = getattr(self, "export_state", None)  # set by mixq_onnx.onnx.markers.marker_mode
        if export is not None:
            return torch.ops.mixq.marker(x, self.name) if export == "marker" else x
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled or not bool(self.initialized):
            return x
        xq = self.fake_quant(x)
        if self.learning and self.drop_prob > 0:  # QDrop: element-wise, keep the float value with p
            xq = xq + keep_mask(x, self.drop_prob) * (x - xq)
        return xq

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes this quantizer assigns to x (what the INT8 kernel sees)."""
        lo, hi = self.qrange
        return torch.clamp(torch.round(x / self.scale.detach()) + self.zero_point, lo, hi)

    def record(self) -> dict[str, Any]:
        lo, hi = self.qrange
        return {
            "name": self.name, "kind": "act", "placement": self.placement, "bits": self.bits,
            "signed": self.signed, "symmetric": self.symmetric, "axis": None,
            "qmin": lo, "qmax": hi, "scale": float(self.scale.detach()),
            "zero_point": float(self.zero_point),
        }


class WeightQuantizer(_Base):
    """Per-output-channel weight quantizer: round-to-nearest, AdaRound (soft/hard), or stored integers.

    mode: "nearest" | "soft" (h(V) during learning) | "hard" (V >= 0) | "int" (finalized integers).
    With `learn_scale` (Genie-M) the per-channel scale is trained on the integer base frozen at init.
    `block_size` (2-D Linear weights only): one scale per output channel and per block of `block_size`
    input features, scale shape [out, in / block_size] (TensorRT's INT4 weight-only GEMMs).
    """

    kind = "weight"

    def __init__(self, name: str, bits: int, symmetric: bool = True, axis: int = 0, block_size: int | None = None):
        super().__init__(name, bits, symmetric)
        self.axis = axis
        self.block_size = block_size
        self.mode = "nearest"
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("int_weight", torch.empty(0, dtype=torch.int8))
        self.register_buffer("w_floor", torch.empty(0))
        self.register_buffer("initialized", torch.tensor(False))
        self.alpha: nn.Parameter | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        if not self.symmetric:
            return 0, 2**self.bits - 1
        return int_range(self.bits, True, narrow=True)

    def _shape(self, w: torch.Tensor) -> list[int]:
        shape = [1] * w.ndim
        shape[self.axis] = -1
        return shape

    def set_scale(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=False)
        self.zero_point = (zero_point if zero_point is not None else torch.zeros_like(scale)).detach().clone().float()
        self.initialized.fill_(True)

    def _s_zp(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block_size:  # [out, nb] -> [out, nb * block] element-wise
            out, k = w.shape
            nb = k // self.block_size

            def expand(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(out, nb, 1).expand(out, nb, self.block_size).reshape(out, k)

            return expand(self.scale), expand(self.zero_point)
        shape = self._shape(w)
        return self.scale.view(shape), self.zero_point.view(shape)

    def scale_shape(self, w_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored scale: [out] per channel, [out, in / block] with blocks."""
        if self.block_size:
            return (int(w_shape[0]), int(w_shape[1]) // self.block_size)
        return (int(w_shape[self.axis]),)

    def init_adaround(self, w: torch.Tensor) -> None:
        """V from the fractional part so h(V) reproduces w/s, and V >= 0 exactly where RTN rounds up."""
        s, _ = self._s_zp(w)
        x = w.detach() / s
        floor = torch.floor(x)
        frac = (x - floor).clamp(0.0, 1.0)
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
        up = frac >= 0.5  # keep the decision bit-exact with weight_round at the boundary
        v = torch.where(up, v.clamp(min=0.0), v.clamp(max=-1e-12))
        self.w_floor = floor
        self.alpha = nn.Parameter(v)
        self.mode = "soft"

    def h(self) -> torch.Tensor:
        assert self.alpha is not None
        return rectified_sigmoid(self.alpha)

    def integers(self, w: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = mode or self.mode
        lo, hi = self.qrange
        s, zp = self._s_zp(w)
        if mode == "int":
            return self.int_weight.float()
        if mode == "nearest":
            return torch.clamp(weight_round(w / s) + zp, lo, hi)
        if mode == "soft":
            return torch.clamp(self.w_floor + self.h() + zp, lo, hi)
        if mode == "hard":
            assert self.alpha is not None
            return torch.clamp(self.w_floor + (self.alpha >= 0).float() + zp, lo, hi)
        raise ValueError(mode)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        export = getattr(self, "export_state", None)  # set by mixq_onnx.onnx.markers.marker_mode
        if export is not None:
            return torch.ops.mixq.marker(w.detach(), self.name) if export == "marker" else w
        if not self.enabled or not bool(self.initialized):
            return w
        s, zp = self._s_zp(w)
        return (self.integers(w) - zp) * s

    def int_values(self) -> torch.Tensor:
        """Frozen integers minus zero point, as float (the integer-domain operand of the layer)."""
        return self.int_weight.float() - self.zero_point.view(self._shape(self.int_weight))

    def finalize(self, w: torch.Tensor) -> None:
        """Freeze the current decisions (hard rounding) as stored integers."""
        mode = "hard" if self.mode in ("soft", "hard") else self.mode
        ints = self.integers(w, mode).detach()
        self.int_weight = ints.round().to(torch.int8 if self.symmetric else torch.uint8)
        self.mode = "int"
        self.alpha = None
        self.w_floor = torch.empty(0)
        self.scale.requires_grad_(False)

    def round_loss(self, beta: float) -> torch.Tensor:
        h = self.h()
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def record(self) -> dict[str, Any]:
        lo, hi = self.qrange
        return {
            "name": self.name, "kind": "weight", "placement": "weight", "bits": self.bits, "signed": self.symmetric,
            "symmetric": self.symmetric, "axis": self.axis, "qmin": lo, "qmax": hi,
            "block_size": self.block_size,
            "scale_shape": list(self.scale.shape),
            "scale": [float(v) for v in self.scale.detach().reshape(-1)],
            "zero_point": [float(v) for v in self.zero_point.reshape(-1)],
        }


# ----------------------------------------------------------------------------- scale search
def lp_error(x: torch.Tensor, xq: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    e = (x - xq).abs().pow(p)
    return e.mean() if dim is None else e.flatten(1).mean(1)


def search_weight_scale(w: torch.Tensor, q: WeightQuantizer, p: float = 2.4, grid: int = 80) -> None:
    """Per-channel (or per-block) clipping ratio minimising the Lp error of round-to-nearest."""
    if q.block_size:
        if w.ndim != 2 or w.shape[1] % q.block_size:
            raise ValueError(f"{q.name}: block size {q.block_size} needs a 2-D weight whose input dimension "
                             f"it divides, got shape {tuple(w.shape)}")
        wc = w.detach().reshape(-1, q.block_size)  # rows: (out, block) in row-major order
    else:
        wc = w.detach().transpose(0, q.axis).flatten(1) if q.axis != 0 else w.detach().flatten(1)
    lo, hi = q.qrange
    best_err = torch.full((wc.shape[0],), float("inf"))
    best_s = torch.ones(wc.shape[0])
    best_zp = torch.zeros(wc.shape[0])
    if q.symmetric:
        amax = wc.abs().amax(1).clamp(min=1e-8)
    else:
        wmin, wmax = wc.amin(1).clamp(max=0), wc.amax(1).clamp(min=0)
    for i in range(grid):
        r = 1.0 - i / grid * 0.85
        if q.symmetric:
            s = (amax * r / hi).clamp(min=1e-10)
            zp = torch.zeros_like(s)
        else:
            s = ((wmax - wmin) * r / (hi - lo)).clamp(min=1e-10)
            zp = torch.round(-wmin * r / s).clamp(lo, hi)
        qi = torch.clamp(weight_round(wc / s[:, None]) + zp[:, None], lo, hi)
        err = lp_error(wc, (qi - zp[:, None]) * s[:, None], p, dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_zp = torch.where(better, zp, best_zp)
    shape = q.scale_shape(w.shape)
    q.set_scale(best_s.reshape(shape), best_zp.reshape(shape))


def search_act_scale(q: ActQuantizer, p: float = 2.4, grid: int = 80) -> None:
    """Per-tensor scale (and sign) minimising the Lp error on the observed activations."""
    x = q.observed()
    q.signed = not (q._obs_min >= 0 and q.bits <= 7) if q.symmetric else False
    lo, hi = q.qrange
    best = (float("inf"), 1.0, 0.0)
    if q.symmetric:
        amax = float(x.abs().max().clamp(min=1e-8))
        top = amax / hi
    else:
        xmin, xmax = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
    for i in range(grid):
        r = 1.0 - i / grid * 0.9
        if q.symmetric:
            s, zp = max(top * r, 1e-10), 0.0
        else:
            s = max((xmax - xmin) * r / (hi - lo), 1e-10)
            zp = float(min(max(round(-xmin * r / s), lo), hi))
        xq = (torch.clamp(torch.round(x / s) + zp, lo, hi) - zp) * s
        err = float(lp_error(x, xq, p))
        if err < best[0]:
            best = (err, s, zp)
    q.scale.data.fill_(best[1])
    q.zero_point.fill_(best[2])
    q.initialized.fill_(True)
    q.clear_observations()
