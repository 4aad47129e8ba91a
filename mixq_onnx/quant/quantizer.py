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

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from .spec import SUPPORTED_BITS, QuantSpec

ZETA, GAMMA = 1.1, -0.1


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


#: Largest tensor `ActQuantizer.observe` samples through a whole permutation; a larger one is sampled with
#: replacement. Every result measured before 2026-12-02 sampled by permutation, and the CIFAR networks' tensors
#: (128 x 16 x 32 x 32 values at most) still do, so their scales and accuracies are what they were.
PERMUTE_LIMIT = 1 << 22


def weight_round(x: torch.Tensor) -> torch.Tensor:
    """Round half up via floor + (frac >= 0.5): the rounding AdaRound's hard decision starts from."""
    f = torch.floor(x)
    return f + ((x - f) >= 0.5).to(x.dtype)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Float {0,1} mask, 1 with probability p. p = 0.5 unpacks random bits (4x cheaper than rand on CPU).
    A CPU `generator` (quantize's seeded one) draws on the CPU for a tensor on a GPU too, and the mask is
    copied over: the same seed drops the same values on either device."""
    n = like.numel()
    if like.device.type != "cpu" and (generator is None or generator.device.type != "cpu"):
        return (torch.rand(like.shape, generator=generator, device=like.device) < p).to(like.dtype)
    if p == 0.5 and n % 64 == 0:
        r = torch.randint(-(2**63), 2**63 - 1, (n // 64,), dtype=torch.int64, generator=generator).view(torch.uint8)
        mask = ((r.unsqueeze(-1) >> _SHIFTS) & 1).view(like.shape)
    else:
        mask = torch.rand(like.shape, generator=generator) < p
    return mask.to(device=like.device, dtype=like.dtype)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


# export mode: the marker op; None outside `export_markers` (which quantizers emit it: their `_emit` flag)
_EXPORT: Callable[[torch.Tensor, str], torch.Tensor] | None = None


@contextlib.contextmanager
def export_markers(model: nn.Module, op: Callable[[torch.Tensor, str], torch.Tensor]) -> Iterator[None]:
    """Export mode, entered by the exporter: every enabled, initialised quantizer of `model` returns
    `op(x, name)` (an identity the exporter later turns into that quantizer's Q/DQ) instead of
    fake-quantizing, and the others pass x through. Which ones emit is decided here, before tracing (the
    tracer cannot branch on a buffer). The op is injected, so quant/ depends on no ONNX module."""
    global _EXPORT
    # a flag on each emitting quantizer, not a set of ids: torch.export may trace a copy of the model (it
    # does when a quantizer is shared by two layers), and a copy keeps its attributes
    emit = [m for m in model.modules() if isinstance(m, _Base) and m.exported()]
    prev, _EXPORT = _EXPORT, op
    for m in emit:
        m._emit = True
    try:
        yield
    finally:
        _EXPORT = prev
        for m in emit:
            m._emit = False


def exporting() -> bool:
    """True inside `export_markers` (layers then keep the float form that carries the markers)."""
    return _EXPORT is not None


def per_sample(x: torch.Tensor) -> int:
    """Elements of one sample of an activation (the whole tensor when it has no batch axis)."""
    return x[0].numel() if x.ndim > 1 else x.numel()


def lsq_grad_scale(elements: int, qmax: int) -> float:
    """LSQ's step-gradient scale 1 / sqrt(N * Q_P) (Esser et al. 2020): N the elements one step serves (per
    sample for activations, per channel for weights), Q_P the grid's top."""
    return 1.0 / math.sqrt(elements * max(qmax, 1))


class _Base(nn.Module):
    kind = "base"

    def __init__(self, name: str, bits: int, symmetric: bool = True):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be in {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}, got {bits}")
        self.name = name
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.enabled = True
        self._emit = False  # set by `export_markers` while this quantizer emits its marker

    @property
    def spec(self) -> QuantSpec:
        """Frozen snapshot of this quantizer's grid: what quant.json, the exporter and the checkers read."""
        raise NotImplementedError

    @property
    def qrange(self) -> tuple[int, int]:
        return self.spec.grid()

    def exported(self) -> bool:
        """Whether export places Q/DQ here (a disabled or never-calibrated quantizer stays float)."""
        return self.enabled and bool(self.initialized)

    def apply_spec(self, spec: QuantSpec) -> None:
        """Take bits and sign from a stored record; refuses a record of another quantizer."""
        mine = self.spec
        for f in ("name", "kind", "placement", "symmetric", "axis", "block_size", "shared_with"):
            if getattr(spec, f) != getattr(mine, f):
                raise ValueError(f"record of {spec.name} has {f} {getattr(spec, f)!r}, quantizer {mine.name} has "
                                 f"{getattr(mine, f)!r}")
        self.bits = spec.bits
        if spec.kind == "act":
            self.signed = spec.signed

    def extra_repr(self) -> str:
        lo, hi = self.qrange
        return f"{self.name!r}, bits={self.bits}, range=[{lo},{hi}], symmetric={self.symmetric}"


# shared quantizer -> (weak reference to its input, the input's version, its random output): every consumer of
# the one tensor gets the one random draw (outside the modules: never deep-copied)
_LAST_DRAW: weakref.WeakKeyDictionary[nn.Module, tuple[Any, int, torch.Tensor]] = weakref.WeakKeyDictionary()


def once_per_tensor(q: nn.Module, x: torch.Tensor, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`draw()`, or the output it gave for this same tensor (same object, unmodified) at `q`'s last call: a
    quantizer shared by several consumers (`graph.share_quantizers`) quantizes its tensor once per forward, as
    the engine does, so a random quantizer (QDrop's drops, NIPQ's noise) gives every consumer the same draw."""
    last = _LAST_DRAW.get(q)
    if last is not None and last[0]() is x and last[1] == x._version:
        return last[2]
    out = draw()
    _LAST_DRAW[q] = (weakref.ref(x), x._version, out)
    return out


def forget_draw(q: nn.Module) -> None:
    """Drop `q`'s kept draw (it no longer draws at random)."""
    _LAST_DRAW.pop(q, None)


class ActQuantizer(_Base):
    """Per-tensor activation quantizer with an LSQ step size and optional QDrop."""

    kind = "act"

    def __init__(self, name: str, bits: int, symmetric: bool = True, placement: str = "input"):
        super().__init__(name, bits, symmetric)
        self.placement = placement  # input (of a Conv/Gemm) | residual (identity input of an add) | matmul | pool
        self.shared_with: tuple[str, ...] = ()  # placements merged into this one (graph.share_quantizers)
        self.signed = True
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)  # a phase that learns it turns it on
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.observing = False
        self.learning = False  # LSQ gradient scaling and QDrop apply only while learning
        self.drop_prob = 0.0
        self.max_samples = 1 << 16
        self._obs: list[torch.Tensor] = []
        self._obs_min = math.inf

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.name, "act", self.placement, self.bits, self.signed, self.symmetric,
                         shared_with=tuple(self.shared_with))

    @property
    def observed_min(self) -> float:
        """Smallest value seen while observing: non-negative inputs may use an unsigned grid."""
        return self._obs_min

    # -- observation for scale initialisation
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self._obs_min = min(self._obs_min, float(flat.min()))
        budget = self.max_samples - sum(t.numel() for t in self._obs)
        if budget <= 0:
            return
        if flat.numel() > budget:  # a uniform sample without replacement (the first values of a permutation)
            g = torch.Generator().manual_seed(len(self._obs))
            if flat.numel() <= PERMUTE_LIMIT:
                idx = torch.randperm(flat.numel(), generator=g)[:budget]
            else:  # drawn with replacement: a permutation of a 224-pixel batch's early feature map took seconds
                idx = torch.randint(flat.numel(), (budget,), generator=g)  # and ~1 GB, per quantizer
            flat = flat[idx.to(flat.device)]
        self._obs.append(flat.cpu())

    def observed(self) -> torch.Tensor:
        return torch.cat(self._obs) if self._obs else torch.zeros(1)

    def clear_observations(self) -> None:
        self._obs = []
        self._obs_min = math.inf

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.qrange
        # a gradient asked for: the straight-through form (x inside the grid passes; the step learns only while
        # `learning`), also for a quantizer that is on but not learning in a trained path, where round() would
        # give its input zero gradient
        if x.requires_grad or (self.learning and self.scale.requires_grad):
            return _LSQ.apply(x, self.scale if self.learning else self.scale.detach(), self.zero_point, float(lo),
                              float(hi), lsq_grad_scale(per_sample(x), hi))
        s = self.scale.detach()  # no gradient wanted: the step learns only in the form above
        q = torch.clamp(torch.round(x / s) + self.zero_point, lo, hi)
        return (q - self.zero_point) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _EXPORT is not None:
            return _EXPORT(x, self.name) if self._emit else x
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled or not bool(self.initialized):
            return x
        if not (self.learning and self.drop_prob > 0):
            if self.shared_with:
                forget_draw(self)
            return self.fake_quant(x)

        def drop() -> torch.Tensor:  # QDrop: element-wise, keep the float value with p
            xq = self.fake_quant(x)
            return xq + keep_mask(x, self.drop_prob) * (x - xq)

        return once_per_tensor(self, x, drop) if self.shared_with else drop()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes this quantizer assigns to x (what the INT8 kernel sees)."""
        lo, hi = self.qrange
        return torch.clamp(torch.round(x / self.scale.detach()) + self.zero_point, lo, hi)

    def record(self) -> dict[str, Any]:
        return self.spec.to_record(float(self.scale.detach()), float(self.zero_point))


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
    def spec(self) -> QuantSpec:
        return QuantSpec(self.name, "weight", "weight", self.bits, self.symmetric, self.symmetric, self.axis,
                         self.block_size)

    def broadcast_shape(self, w: torch.Tensor) -> list[int]:
        """The view that broadcasts a per-channel scale against `w` ([1, .., -1 at the axis, .., 1])."""
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
        shape = self.broadcast_shape(w)
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
        if _EXPORT is not None:
            return _EXPORT(w.detach(), self.name) if self._emit else w
        if not self.enabled or not bool(self.initialized):
            return w
        s, zp = self._s_zp(w)
        return (self.integers(w) - zp) * s

    def int_values(self) -> torch.Tensor:
        """Frozen integers minus zero point, as float (the integer-domain operand of the layer)."""
        return self.int_weight.float() - self.zero_point.view(self.broadcast_shape(self.int_weight))

    def finalize(self, w: torch.Tensor) -> None:
        """Freeze the current decisions (hard rounding) as stored integers."""
        mode = "hard" if self.mode in ("soft", "hard") else self.mode
        ints = self.integers(w, mode).detach()
        self.int_weight = ints.round().to(getattr(torch, self.spec.container_dtype()))
        self.mode = "int"
        self.alpha = None
        self.w_floor = torch.empty(0)
        self.scale.requires_grad_(False)

    def round_loss(self, beta: float) -> torch.Tensor:
        h = self.h()
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def record(self) -> dict[str, Any]:
        return self.spec.to_record([float(v) for v in self.scale.detach().reshape(-1)],
                                   [float(v) for v in self.zero_point.reshape(-1)],
                                   scale_shape=list(self.scale.shape))


# ----------------------------------------------------------------------------- validation

# key -> accepted JSON shape: "str", "bool", "int" (not bool), "num" (int or float, not bool),
# "int?" (int or null), "null", "ints" / "nums" / "strs" (lists of those)
_COMMON_FIELDS = {"name": "str", "kind": "str", "placement": "str", "bits": "int", "signed": "bool",
                  "symmetric": "bool", "qmin": "int", "qmax": "int"}
_ACT_FIELDS = {**_COMMON_FIELDS, "axis": "null", "scale": "num", "zero_point": "num", "shared_with": "strs"}
_WEIGHT_FIELDS = {**_COMMON_FIELDS, "axis": "int", "block_size": "int?", "scale_shape": "ints",
                  "scale": "nums", "zero_point": "nums", "shape": "ints"}
# added to format 1 with block scales: folders written before lack them (no blocks, per-channel scales);
# "shared_with" only in records of shared activation quantizers (graph.share_quantizers)
_LATER_FIELDS = {"block_size": None, "scale_shape": None, "shared_with": None}


def _is(v: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "num":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "int?":
        return v is None or _is(v, "int")
    if kind == "null":
        return v is None
    if kind in ("ints", "nums", "strs"):
        return isinstance(v, list) and all(_is(x, kind[:-1]) for x in v)
    raise ValueError(kind)


def quantizer_state(q: ActQuantizer | WeightQuantizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The quant.json record and the tensors (keys `scale`, `zero_point`, and `int` for weights) of a
    quantizer: exactly what `save_quantized` writes, so export can validate a model in memory with the
    same `validate_record` the loader applies to files."""
    rec = q.record()
    tensors = {
        "scale": q.scale.detach().reshape(-1).float().contiguous().cpu(),
        "zero_point": q.zero_point.detach().reshape(-1).float().contiguous().cpu(),
    }
    if isinstance(q, WeightQuantizer):
        tensors["int"] = q.int_weight.contiguous().cpu()
        rec["shape"] = list(q.int_weight.shape)
    return rec, tensors


def validate_record(
    record: Any,
    tensors: Mapping[str, torch.Tensor | None],
    weight_shape: Sequence[int] | None = None,
    like: ActQuantizer | WeightQuantizer | None = None,
) -> None:
    """Raise `MixqError` ("quantizer NAME: ...") unless `record` and its `tensors` describe a usable quantizer.

    A result folder can come from anyone, and every consumer (the fake-quant model, the ONNX exporter,
    TensorRT) trusts these numbers: bits must be supported, the declared [qmin, qmax] must be the grid
    the bits give, scales finite and positive, zero points integral and on the grid (0 when
    symmetric), integer weights on the grid, shapes those of the layer (`weight_shape`), the record's
    scale/zero-point lists equal to the tensors (as float32), and the placement that of the model's
    quantizer `like`. tensors: `scale`, `zero_point`, and `int` for weight quantizers.
    """
    name = record.get("name") if isinstance(record, Mapping) else None
    where = f"quantizer {name}" if isinstance(name, str) else "a quantizer record"

    def bad(msg: str) -> MixqError:
        return MixqError(f"{where}: {msg}")

    if not isinstance(record, Mapping):
        raise bad(f"is a JSON {type(record).__name__}, not an object")
    kind = record.get("kind")
    if kind not in ("act", "weight"):
        raise bad(f"kind {kind!r} is neither 'act' nor 'weight'")
    for key, want in (_ACT_FIELDS if kind == "act" else _WEIGHT_FIELDS).items():
        if key not in record:
            if key in _LATER_FIELDS:
                continue
            raise bad(f"record lacks {key!r}")
        if not _is(record[key], want):
            raise bad(f"{key} is {record[key]!r}, expected {_TYPE_WORDS[want]}")
    bits, sym = record["bits"], record["symmetric"]
    if bits not in SUPPORTED_BITS:
        raise bad(f"bits {bits} is not supported ({SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]})")
    if kind == "weight":
        if record["placement"] != "weight":
            raise bad(f"placement {record['placement']!r} of a weight quantizer, expected 'weight'")
        if record["signed"] != sym:
            raise bad(f"signed {record['signed']} disagrees with symmetric {sym} (weights are signed iff symmetric)")
    spec = QuantSpec.from_record(record)
    grid = spec.grid()
    lo, hi = grid
    if (record["qmin"], record["qmax"]) != grid:
        raise bad(f"qmin/qmax [{record['qmin']}, {record['qmax']}] disagree with the grid [{lo}, {hi}] of "
                  f"{bits}-bit {'symmetric' if sym else 'asymmetric'} {kind} quantization")
    clo, chi = spec.container()
    if lo < clo or hi > chi:  # the exported QuantizeLinear would saturate where PyTorch does not
        raise bad(f"its grid [{lo}, {hi}] does not fit the {spec.container_dtype().upper()} the graph stores it in "
                  f"[{clo}, {chi}] (an unsigned symmetric grid goes up to 7 bits)")
    if like is not None:
        _match_quantizer(record, like, bad)

    scale, zp = tensors.get("scale"), tensors.get("zero_point")
    for key, t in (("scale", scale), ("zero_point", zp)):
        if t is None:
            raise bad(f"weights.safetensors lacks its {key} tensor")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise bad(f"{key} tensor is {getattr(t, 'dtype', type(t).__name__)}, expected float32")
    assert scale is not None and zp is not None
    if kind == "weight":
        ints = tensors.get("int")
        int_dtype = getattr(torch, spec.container_dtype())
        if ints is None:
            raise bad("weights.safetensors lacks its integer weights")
        if not isinstance(ints, torch.Tensor) or ints.dtype != int_dtype:
            raise bad(f"integer weights are {getattr(ints, 'dtype', type(ints).__name__)}, expected {int_dtype}")
        shape = tuple(int(v) for v in (weight_shape if weight_shape is not None else record["shape"]))
        if tuple(record["shape"]) != shape:
            raise bad(f"shape {record['shape']} in quant.json, the model's weight is {list(shape)}")
        if tuple(ints.shape) != shape:
            raise bad(f"integer weights have shape {list(ints.shape)}, the model's weight is {list(shape)}")
        want = _scale_shape(shape, record["axis"], record.get("block_size"), bad)
        if tuple(record.get("scale_shape", want)) != want:
            raise bad(f"scale_shape {record['scale_shape']} in quant.json, the weight {list(shape)} needs {list(want)}")
    else:
        want = ()
    n = math.prod(want)
    for key, t in (("scale", scale), ("zero_point", zp)):
        if t.numel() != n:
            raise bad(f"{key} tensor has {t.numel()} values, the model needs {n} ({list(want) or 'a scalar'})")
        if kind == "weight" and len(record[key]) != n:
            raise bad(f"{key} in quant.json has {len(record[key])} values, the model needs {n}")
    unit = "channel" if kind == "weight" and not record.get("block_size") else "index"
    at = (lambda i: f" at {unit} {i}") if kind == "weight" else (lambda i: "")
    s, z = scale.reshape(-1), zp.reshape(-1)
    wrong = ~(torch.isfinite(s) & (s > 0))
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        raise bad(f"scale has {float(s[i]):g}{at(i)} (scales must be finite and positive)")
    wrong = ~torch.isfinite(s * float(max(hi - lo, 1)))
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        raise bad(f"scale {float(s[i]):g}{at(i)} overflows float32 over the grid")
    wrong = ~torch.isfinite(z) | (z != torch.round(z)) | (z < lo) | (z > hi)
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        raise bad(f"zero point {float(z[i]):g}{at(i)} is not an integer in [{lo}, {hi}]")
    if sym and bool((z != 0).any()):
        i = int((z != 0).nonzero()[0])
        raise bad(f"zero point {float(z[i]):g}{at(i)} is not 0 (symmetric quantization has none)")
    if kind == "weight":
        ints = tensors["int"]
        assert ints is not None
        outside = (ints.to(torch.int32) < lo) | (ints.to(torch.int32) > hi)
        if bool(outside.any()):
            idx = tuple(int(v) for v in outside.nonzero()[0])
            raise bad(f"integer weight {int(ints[idx])} at index {idx} is outside the grid [{lo}, {hi}]")
    for key, t in (("scale", s), ("zero_point", z)):
        listed = record[key] if kind == "weight" else [record[key]]
        try:
            mine = torch.tensor([float(v) for v in listed], dtype=torch.float32)
        except OverflowError:
            raise bad(f"{key} in quant.json holds a number too large for float32") from None
        differ = mine != t
        if bool(differ.any()):
            i = int(differ.nonzero()[0])
            raise bad(f"{key} in quant.json ({float(mine[i]):g}) differs from weights.safetensors "
                      f"({float(t[i]):g}){at(i)}")


_TYPE_WORDS = {"str": "a string", "bool": "true or false", "int": "an integer", "num": "a number",
               "int?": "an integer or null", "null": "null", "ints": "a list of integers",
               "nums": "a list of numbers", "strs": "a list of strings"}


def _scale_shape(shape: tuple[int, ...], axis: int, block: int | None, bad: Any) -> tuple[int, ...]:
    """The scale shape a weight of `shape` needs (same rule as `WeightQuantizer.scale_shape`)."""
    if block is not None:
        if block <= 0 or len(shape) != 2 or shape[1] % block:
            raise bad(f"block_size {block} does not divide the input features of the weight {list(shape)}")
        return (shape[0], shape[1] // block)
    if not 0 <= axis < len(shape):
        raise bad(f"axis {axis} is outside the weight's {len(shape)} dimensions")
    return (shape[axis],)


def _match_quantizer(record: Mapping[str, Any], q: ActQuantizer | WeightQuantizer, bad: Any) -> None:
    """The record must describe the quantizer the model puts at that place (kind, symmetry, axis, blocks)."""
    if record["kind"] != q.kind:
        raise bad(f"is a {record['kind']} quantizer in quant.json, the model's is a {q.kind} quantizer")
    if record["symmetric"] != q.symmetric:
        raise bad(f"symmetric {record['symmetric']} in quant.json, the model's config says {q.symmetric}")
    if isinstance(q, WeightQuantizer):
        if record["axis"] != q.axis:
            raise bad(f"axis {record['axis']} in quant.json, the model quantizes along axis {q.axis}")
        if record.get("block_size") != q.block_size:
            raise bad(f"block_size {record.get('block_size')} in quant.json, the model's is {q.block_size}")
    elif record["placement"] != q.placement:
        raise bad(f"placement {record['placement']!r} in quant.json, the model's is {q.placement!r}")
    elif list(record.get("shared_with") or []) != list(q.shared_with):
        raise bad(f"serves also {list(record.get('shared_with') or [])} in quant.json, the model's quantizer serves "
                  f"also {list(q.shared_with)} (quantizer sharing, config share_quantizers)")


# ----------------------------------------------------------------------------- scale search
def lp_error(x: torch.Tensor, xq: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    e = (x - xq).abs().pow(p)
    return e.mean() if dim is None else e.flatten(1).mean(1)


def search_weight_scale(w: torch.Tensor, q: WeightQuantizer, p: float = 2.4, grid: int = 80,
                        chunk: int | None = None) -> None:
    """Per-channel (or per-block) clipping ratio minimising the Lp error of round-to-nearest.

    Rows go through the `grid` candidates a chunk of about `chunk` elements at a time, in buffers reused across
    candidates: on a large layer (VGG's 102 M-weight pre-logits conv) fresh full-size temporaries made the search
    memory-bound, several times slower. Each candidate's arithmetic is `weight_round`'s, element for element.
    `chunk` defaults to 2**18 elements on a CPU (cache-sized) and 2**24 on a GPU (fewer kernel launches).
    """
    if q.block_size:
        if w.ndim != 2 or w.shape[1] % q.block_size:
            raise ValueError(f"{q.name}: block size {q.block_size} needs a 2-D weight whose input dimension "
                             f"it divides, got shape {tuple(w.shape)}")
        wc = w.detach().reshape(-1, q.block_size)  # rows: (out, block) in row-major order
    else:
        wc = w.detach().transpose(0, q.axis).flatten(1) if q.axis != 0 else w.detach().flatten(1)
    wc = wc.float().contiguous()
    lo, hi = q.qrange
    rows, cols = wc.shape
    best_s = torch.ones(rows, device=wc.device)
    best_zp = torch.zeros(rows, device=wc.device)
    if chunk is None:
        chunk = 1 << 18 if wc.device.type == "cpu" else 1 << 24
    step = max(1, chunk // max(cols, 1))
    for start in range(0, rows, step):
        x = wc[start:start + step]
        s, zp = _lp_search_rows(x, lo, hi, q.symmetric, p, grid)
        best_s[start:start + step] = s
        best_zp[start:start + step] = zp
    shape = q.scale_shape(w.shape)
    q.set_scale(best_s.reshape(shape), best_zp.reshape(shape))


def _lp_search_rows(x: torch.Tensor, lo: int, hi: int, symmetric: bool, p: float,
                    grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, zero point) per row of `x` over the clipping grid (first minimum wins)."""
    n = x.shape[0]
    best_err = torch.full((n,), float("inf"), device=x.device)
    best_s = torch.ones(n, device=x.device)
    best_zp = torch.zeros(n, device=x.device)
    if symmetric:
        amax = x.abs().amax(1).clamp(min=1e-8)
    else:
        wmin, wmax = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    f, frac = torch.empty_like(x), torch.empty_like(x)
    for i in range(grid):
        r = 1.0 - i / grid * 0.85
        if symmetric:
            s = (amax * r / hi).clamp(min=1e-10)
            zp = torch.zeros_like(s)
        else:
            s = ((wmax - wmin) * r / (hi - lo)).clamp(min=1e-10)
            zp = torch.round(-wmin * r / s).clamp(lo, hi)
        sc, zc = s[:, None], zp[:, None]
        torch.div(x, sc, out=frac)  # weight_round(x / s), in place: floor + (frac >= 0.5)
        torch.floor(frac, out=f)
        f.add_(frac.sub_(f).ge_(0.5))  # ge_ writes 1.0 / 0.0 in place (a bool temporary costs 3x as much)
        if symmetric:  # zero point 0: adding and taking it away changes no error
            f.clamp_(lo, hi).mul_(sc)
        else:
            f.add_(zc).clamp_(lo, hi).sub_(zc).mul_(sc)  # dequantized
        err = f.sub_(x).abs_().pow_(p).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_zp = torch.where(better, zp, best_zp)
    return best_s, best_zp


def search_act_scale(q: ActQuantizer, p: float = 2.4, grid: int = 80) -> None:
    """Per-tensor scale (and sign) minimising the Lp error on the observed activations."""
    x = q.observed()
    q.signed = not (q.observed_min >= 0 and q.bits <= 7) if q.symmetric else False
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
