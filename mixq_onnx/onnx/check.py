"""`check`: onnx.checker, shape inference, and a TensorRT QDQ rules lint naming the offending node.

TensorRT (strongly typed, explicit quantization) fuses DQ->Conv/Gemm/MatMul->(Add) into INT8 kernels
only when the graph follows these rules; every violation here is a layer that silently runs in float
or a graph TensorRT rejects.

Each rule is a function registered with `@rule(name, severity)`: it reads the `GraphIndex` and yields
`(node, message)` (or `(node, message, severity)` where the severity depends on the graph). `lint`
runs every rule in `RULES`, in registration order. tests/test_check.py plants one violation per rule
and fails when a registered rule has none.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .graph import DATA_MOVE_OPS, POOL_OPS, REQUANT_KEY, GraphIndex

MAX_OPSET = 24
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_FLOAT_CHECKED = (*_LAYER_OPS, "ConvTranspose")  # also a compute layer that must not run float unnoticed
SEVERITIES = ("error", "warning")


@dataclass
class Violation:
    rule: str
    node: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


Finding = tuple  # (node, message) or (node, message, severity)


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str  # what a violation is unless the rule says otherwise for this graph
    check: Callable[[GraphIndex], Iterable[Finding]]
    doc: str = ""


RULES: dict[str, Rule] = {}


def rule(name: str, severity: str = "error") -> Callable[[Callable[[GraphIndex], Iterable[Finding]]], Any]:
    """Register a lint rule under `name` (the `[name]` of every violation it reports)."""
    if severity not in SEVERITIES:
        raise ValueError(f"lint rule {name!r}: severity must be one of {SEVERITIES}, got {severity!r}")

    def register(fn: Callable[[GraphIndex], Iterable[Finding]]) -> Callable[[GraphIndex], Iterable[Finding]]:
        if name in RULES:
            raise ValueError(f"lint rule {name!r} is registered twice")
        RULES[name] = Rule(name, severity, fn, (fn.__doc__ or "").strip())
        return fn

    return register


def check_model(path: str | os.PathLike) -> list[Violation]:
    """Every registered rule's violations on the graph at `path` (errors and warnings); the verdict of
    `mixq-onnx check` is `report(violations)["ok"]`: no violation of severity "error"."""
    return lint(GraphIndex.load(path))


def lint(model: Any) -> list[Violation]:
    """Every registered rule on a ModelProto (or a GraphIndex of one)."""
    g = model if isinstance(model, GraphIndex) else GraphIndex(model)
    out: list[Violation] = []
    for r in RULES.values():
        for node, message, *severity in r.check(g):
            out.append(Violation(r.name, node, message, severity[0] if severity else r.severity))
    return out


def report(violations: list[Violation]) -> dict[str, Any]:
    """The verdict and its counts: {"ok": no errors, "errors": N, "violations": [...]} (`check --json`)."""
    errors = [v for v in violations if v.severity == "error"]
    return {"ok": not errors, "errors": len(errors), "violations": [asdict(v) for v in violations]}


# --------------------------------------------------------------------------- shared facts
def _int4_types() -> set[int]:
    import onnx

    return {t for t in (getattr(onnx.TensorProto, "INT4", None), getattr(onnx.TensorProto, "UINT4", None)) if t}


def _from_dq(g: GraphIndex, tensor: str) -> Any | None:
    return g.produced_by(tensor, "DequantizeLinear")


def _scale(g: GraphIndex, n: Any) -> np.ndarray | None:
    """A Q/DQ node's scale, if constant."""
    return g.value(n.input[1]) if len(n.input) > 1 else None


def _weight_only(g: GraphIndex) -> bool:
    """A weight-only graph (W4A16: no activation QuantizeLinear at all, and at least one layer's weights
    dequantized) runs its activations in float by design; float inputs, and float convolutions beside INT4
    GEMMs, are then notes, not errors. A graph with no Q/DQ at all is a float graph, not weight-only."""
    return (not any(n.op_type == "QuantizeLinear" for n in g.nodes)
            and any(True for _ in _layer_weight_dq(g)))


def _soft(g: GraphIndex) -> str:
    return "warning" if _weight_only(g) else "error"


def _nodes(g: GraphIndex, *ops: str) -> Iterator[Any]:
    return (n for n in g.nodes if n.op_type in ops)


def _layer_weight_dq(g: GraphIndex) -> Iterator[tuple[Any, Any]]:
    """(layer, the DequantizeLinear of its weight) for every Conv/Gemm/MatMul with a quantized weight."""
    for n in _nodes(g, *_LAYER_OPS):
        dq = _from_dq(g, n.input[1])
        if dq is not None:
            yield n, dq


def _layer_of(g: GraphIndex, tensor: str) -> Any | None:
    """The Conv/Gemm/MatMul whose output `tensor` is, possibly behind the constant Mul and Add that follow it
    (the integer layout's rescale and bias; a Linear's bias on 3-D input), else None."""
    const = g.folded_constants()
    p = g.producer.get(tensor)
    for _ in range(2):
        if p is not None and p.op_type in ("Add", "Mul") and len(p.input) == 2 and sum(i in const for i in p.input) == 1:
            p = g.producer.get(next(i for i in p.input if i not in const))
    return p if p is not None and p.op_type in _LAYER_OPS else None


_SHAPE_ONLY = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
_SLICES = ("Slice", "Split", "Gather")  # a part of a tensor: `quantize` looks through getitem as through a reshape


def _behind_moves(g: GraphIndex, tensor: str, find: Callable[[str], Any | None], ops: tuple[str, ...]) -> Any | None:
    """`find(tensor)`, or else `find` of what `tensor` is computed from through the data movement `ops` (a Pad
    only with zeros: per-tensor quantization commutes with it)."""
    for _ in range(32):
        hit = find(tensor)
        if hit is not None:
            return hit
        p = g.producer.get(tensor)
        if p is None or p.op_type not in ops or not p.input:
            return None
        if p.op_type == "Pad":
            value = g.value(p.input[2]) if len(p.input) > 2 and p.input[2] else None
            if g.attr(p, "mode", b"constant") not in (b"constant", "constant") or (value is not None and np.any(value != 0)):
                return None
        tensor = p.input[0]
    return None


def _is_weight(g: GraphIndex, tensor: str) -> bool:
    """A constant, or the DequantizeLinear of one (integer codes, or a Q/DQ pair on a float constant)."""
    const = g.folded_constants()
    if tensor in const:
        return True
    dq = _from_dq(g, tensor)
    if dq is None:
        return False
    q = g.produced_by(dq.input[0], "QuantizeLinear")
    return dq.input[0] in const or (q is not None and q.input[0] in const)


def _layer_behind_moves(g: GraphIndex, tensor: str) -> Any | None:
    """`_layer_of`, also through reshapes, transposes and layer-scale Muls in any order: `quantize`
    (`quant.graph._from_layer`) counts such a tensor as the layer's output, and places no identity quantizer on an
    add of two layer outputs; this rule must agree with the placement it lints. A MatMul of two activations
    (attention's attn @ v) is no layer there: `quantize` treats only Conv/Linear outputs so."""
    def find(t: str) -> Any | None:
        hit = _layer_of(g, t)
        if hit is not None and hit.op_type == "MatMul" and not _is_weight(g, hit.input[1]):
            hit = None
        p = g.producer.get(t)
        if hit is None and p is not None and p.op_type == "Concat" and p.input:  # a concatenation of layer outputs
            parts = [_layer_behind_moves(g, i) for i in p.input]
            hit = parts[0] if all(x is not None for x in parts) else None
        if hit is None and p is not None and p.op_type == "Mul" and len(p.input) == 2:  # a layer scale after a move
            acts = [i for i in p.input if i not in g.folded_constants()]  # (ResMLP: ls1 * linear(x).transpose)
            hit = _layer_behind_moves(g, acts[0]) if len(acts) == 1 else None
        return hit

    return _behind_moves(g, tensor, find, _SHAPE_ONLY + _SLICES)


def _layer_out(g: GraphIndex, tensor: str) -> bool:
    """Is `tensor` a Conv/Gemm/MatMul output (`_layer_of`)?"""
    return _layer_of(g, tensor) is not None


def _dq_through_moves(g: GraphIndex, tensor: str) -> Any | None:
    """The DequantizeLinear `tensor` comes from, directly or through data movement that per-tensor quantization
    commutes with (reshapes, transposes, slices, zero padding): a shared quantizer's DQ sits on the tensor
    itself, ahead of the slicing and padding of a subsampling shortcut."""
    return _behind_moves(g, tensor, lambda t: _from_dq(g, t), DATA_MOVE_OPS)


def _activation_adds(g: GraphIndex) -> Iterator[Any]:
    """Adds of two computed tensors (residual adds), not bias adds."""
    const = g.folded_constants()
    for n in _nodes(g, "Add"):
        if len(n.input) == 2 and not any(i in const for i in n.input):
            yield n


# --------------------------------------------------------------------------- graph
@rule("onnx-checker")
def _onnx_checker(g: GraphIndex) -> Iterator[Finding]:
    """onnx.checker rejects the model."""
    import onnx

    light = g.structure()
    try:  # a graph with external data by its path: the checker reads the file itself (a proto of 2 GiB cannot pass)
        onnx.checker.check_model(str(g.path) if light is not g.model else g.model)
    except Exception as e:  # noqa: BLE001
        yield "graph", str(e).splitlines()[0][:200]


@rule("shape-inference")
def _shape_inference(g: GraphIndex) -> Iterator[Finding]:
    """Strict shape inference fails."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(g.structure(), strict_mode=True)
    except Exception as e:  # noqa: BLE001
        yield "graph", str(e).splitlines()[0][:200]


@rule("opset")
def _opset(g: GraphIndex) -> Iterator[Finding]:
    """The default-domain opset is newer than TensorRT parses."""
    opset = g.opset("")
    if opset > MAX_OPSET:
        yield "graph", f"opset {opset} is above {MAX_OPSET}, the newest TensorRT parses"


# --------------------------------------------------------------------------- Q/DQ parameters
@rule("scale")
def _scale_rule(g: GraphIndex) -> Iterator[Finding]:
    """A Q/DQ scale that is not a constant, or not finite and positive."""
    for n in _nodes(g, "QuantizeLinear", "DequantizeLinear"):
        scale = _scale(g, n)
        if scale is None:
            yield g.label(n), "scale is not a constant"
        elif np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            flat = scale.reshape(-1).astype(np.float64)
            i = int(np.flatnonzero(~(np.isfinite(flat) & (flat > 0)))[0])
            at = f" at index {i}" if flat.size > 1 else ""
            yield g.label(n), f"non-positive or non-finite scale ({flat[i]:g}{at})"


@rule("zero-point")
def _zero_point(g: GraphIndex) -> Iterator[Finding]:
    """A non-zero zero point (TensorRT quantization is symmetric)."""
    for n in _nodes(g, "QuantizeLinear", "DequantizeLinear"):
        if len(n.input) > 2 and n.input[2]:
            zp = g.value(n.input[2])
            if zp is not None and np.any(zp != 0):
                yield g.label(n), (f"non-zero zero point ({zp.reshape(-1)[:4].tolist()}): "
                                   "TensorRT quantization is symmetric")


@rule("per-channel-input")
def _per_channel_input(g: GraphIndex) -> Iterator[Finding]:
    """A per-channel DequantizeLinear on a computed (non-constant) tensor."""
    for n in _nodes(g, "DequantizeLinear"):
        scale = _scale(g, n)
        if scale is not None and scale.size > 1 and not g.is_constant(n.input[0]):
            yield g.label(n), "per-channel scale on a non-constant input"


@rule("int32-bias")
def _int32_bias(g: GraphIndex) -> Iterator[Finding]:
    """An INT32 bias behind a DequantizeLinear."""
    import onnx

    for n in _nodes(g, "DequantizeLinear"):
        if g.const_dtype(n.input[0]) == onnx.TensorProto.INT32:
            yield g.label(n), "INT32 bias DQ: keep biases float"


@rule("int-clip")
def _int_clip(g: GraphIndex) -> Iterator[Finding]:
    """A Clip between a QuantizeLinear and its DequantizeLinear (in the integer domain)."""
    for n in _nodes(g, "DequantizeLinear"):
        p = g.produced_by(n.input[0], "Clip")
        if p is not None and g.produced_by(p.input[0], "QuantizeLinear") is not None:
            yield g.label(p), "Clip in the integer domain between Q and DQ; clip the float input before the Q instead"


def _requantized(g: GraphIndex, pool: Any) -> bool:
    """The pool's output goes (through its range Clip) only into a QuantizeLinear marked `mixq.requantize`."""
    after = g.users(pool.output[0])
    if len(after) == 1 and after[0].op_type == "Clip":
        after = g.users(after[0].output[0])
    return len(after) == 1 and after[0].op_type == "QuantizeLinear" and REQUANT_KEY in g.meta(after[0])


@rule("qdq-scale-pair")
def _qdq_scale_pair(g: GraphIndex) -> Iterator[Finding]:
    """Q -> DQ with different scales (a Reshape between them too: a tiled pool's window view). Only the integer
    layout's DQ(codes, scale 1) is legitimate, and only when every reader is a Conv/Gemm/MatMul whose output is
    rescaled by a constant Mul, or an average pool whose output is requantized (passes.integer_pools: its
    [Clip ->] Q carries `mixq.requantize`)."""
    const = g.folded_constants()
    for n in _nodes(g, "DequantizeLinear"):
        q = g.producer.get(n.input[0])
        while q is not None and q.op_type == "Reshape":  # a tiled pool's window view of the codes
            q = g.producer.get(q.input[0])
        if q is None:
            continue
        sq, sd = _scale(g, q), _scale(g, n)
        if q.op_type != "QuantizeLinear" or sq is None or sd is None or np.array_equal(sq, sd):
            continue
        for u in g.users(n.output[0]):
            if u.op_type in POOL_OPS and _requantized(g, u):
                continue
            after = g.users(u.output[0]) if u.op_type in _LAYER_OPS else []
            if not (len(after) == 1 and after[0].op_type == "Mul" and any(i in const for i in after[0].input)):
                yield g.label(n), (f"DQ scale {float(sd.reshape(-1)[0]):.6g} differs from its Q's "
                                   f"{float(sq.reshape(-1)[0]):.6g} and {g.label(u)} does not rescale its output: "
                                   "values change by their ratio")


# --------------------------------------------------------------------------- layers
@rule("unquantized-input")
def _unquantized_input(g: GraphIndex) -> Iterator[Finding]:
    """A Conv/ConvTranspose/Gemm/MatMul data input without Q/DQ (a warning in weight-only graphs; none on a
    layer `--float-layers` left float, which `float-layer` reports)."""
    const, soft = g.folded_constants(), _soft(g)
    for n in _nodes(g, *_FLOAT_CHECKED):
        if g.float_layer_of(n):
            continue
        data_in = [n.input[0]] + ([n.input[1]] if n.op_type == "MatMul" and n.input[1] not in const else [])
        for i in data_in:
            if _from_dq(g, i) is None:
                yield g.label(n), f"input {i!r} has no Q/DQ: the layer runs in float", soft


@rule("unquantized-weight")
def _unquantized_weight(g: GraphIndex) -> Iterator[Finding]:
    """A constant Conv/ConvTranspose/Gemm/MatMul weight without DequantizeLinear (a warning in weight-only graphs;
    none on a layer `--float-layers` left float)."""
    const, soft = g.folded_constants(), _soft(g)
    for n in _nodes(g, *_FLOAT_CHECKED):
        if g.float_layer_of(n):
            continue
        w = n.input[1]
        if _from_dq(g, w) is None and w in const:
            yield g.label(n), f"weight {w!r} has no DequantizeLinear", soft


@rule("float-layer", "warning")
def _float_layer(g: GraphIndex) -> Iterator[Finding]:
    """A layer `quantize --float-layers` left float (on purpose; a warning, so that it shows): it runs in float
    in the engine. One that has a Q/DQ all the same is an error: the graph is not what its folder records."""
    for n in _nodes(g, *_LAYER_OPS):
        mod = g.float_layer_of(n)
        if not mod:
            continue
        asked = not g.unquantized_layer_of(n)
        why = f"--float-layers {mod}" if asked else f"{mod}, which quantize could not quantize and reported"
        if any(_from_dq(g, i) is not None for i in n.input[:2]):
            yield g.label(n), f"marked float ({why}) but it reads a DequantizeLinear", "error"
        elif asked:
            yield g.label(n), f"left float by --float-layers ({mod}): runs in float in the engine"
        else:
            yield g.label(n), f"left float ({why} as unquantized_layers): runs in float in the engine"


@rule("block-axis")
def _block_axis(g: GraphIndex) -> Iterator[Finding]:
    """Block quantization not along the layer's reduction axis."""
    for n, dq in _layer_weight_dq(g):
        if not (g.attr(dq, "block_size", 0) or 0):
            continue
        shape = g.const_dims(dq.input[0])
        rank = len(shape) if shape is not None else 2
        if n.op_type == "Gemm":
            want_k = 1 if g.attr(n, "transB", 0) else 0
        else:
            want_k = rank - 2
        if g.attr(dq, "axis", 1) % rank != want_k:
            yield g.label(dq), (f"block quantization along axis {g.attr(dq, 'axis', 1)}, "
                                f"expected the reduction axis {want_k} of the {n.op_type}")


@rule("int4-conv")
def _int4_conv(g: GraphIndex) -> Iterator[Finding]:
    """INT4 weights feeding a Conv (TensorRT runs INT4 only weight-only in MatMul/Gemm)."""
    int4 = _int4_types()
    for n, dq in _layer_weight_dq(g):
        if n.op_type == "Conv" and g.const_dtype(dq.input[0]) in int4:
            yield g.label(n), "INT4 weights feed a Conv: TensorRT supports INT4 only weight-only for MatMul/Gemm"


@rule("per-channel-axis")
def _per_channel_axis(g: GraphIndex) -> Iterator[Finding]:
    """A per-channel weight scale along another axis than the output channels."""
    for n, dq in _layer_weight_dq(g):
        scale = g.value(dq.input[1])
        if scale is None or scale.size <= 1 or g.attr(dq, "block_size", 0) not in (0, None):
            continue
        shape = g.const_dims(dq.input[0])
        rank = len(shape) if shape is not None else 2
        axis = g.attr(dq, "axis", 1) % rank
        if n.op_type == "Conv":
            want = 0
        elif n.op_type == "Gemm":
            want = 0 if g.attr(n, "transB", 0) else 1
        else:
            want = rank - 1
        if axis != want:
            yield g.label(dq), f"per-channel axis {axis} on a {n.op_type} weight, expected {want} (output channels)"


@rule("rescale")
def _rescale(g: GraphIndex) -> Iterator[Finding]:
    """Integer layout (passes.integer_gemms): Conv/Gemm/MatMul(DQ(codes, 1), DQ(W, 1)) -> Mul(s_x * s_w).
    The real scales live in that Mul's constant, where the Q/DQ scale rule does not look: a zero there
    silences its channels, a negative one flips their sign, and TensorRT builds it all the same."""
    for n in _nodes(g, *_LAYER_OPS):
        if len(n.input) < 2:
            continue
        dqs = [_from_dq(g, i) for i in n.input[:2]]
        scales = [_scale(g, d) if d is not None else None for d in dqs]
        if any(sc is None or sc.size == 0 or not np.all(sc == 1) for sc in scales):
            continue
        after = g.users(n.output[0])
        if len(after) != 1 or after[0].op_type != "Mul":
            continue
        mul = after[0]
        factor = next((g.value(i) for i in mul.input if i != n.output[0] and g.value(i) is not None), None)
        if factor is None:
            continue
        flat = factor.reshape(-1).astype(np.float64)
        wrong = ~(np.isfinite(flat) & (flat > 0))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            yield g.label(mul), (f"rescale constant (s_x*s_w of {g.label(n)}) has {flat[i]:g} at "
                                 f"channel {i}: scales must be finite and positive")


# --------------------------------------------------------------------------- residual adds
@rule("qdq-conv-add")
def _qdq_conv_add(g: GraphIndex) -> Iterator[Finding]:
    """Q/DQ between a conv and the residual add it alone feeds: TensorRT cannot fuse the add into the conv.

    An add with a plain conv output on one side fuses into that conv; a quantized conv output on the other
    side is then its residual input (MobileNetV2: block i's output, quantized, is block i+1's identity), not
    a Q/DQ that breaks the fusion. Nor is one on a conv output that other nodes read too (Swin's
    patch-merging output feeds LayerNorm and the add): it cannot absorb the add. Nor is one whose codes another
    consumer reads too (a shared quantizer: the next block's first conv and MixNet's identity): it stays."""
    for n in _activation_adds(g):
        if any(_layer_out(g, i) for i in n.input):
            continue
        for d in (_from_dq(g, i) for i in n.input):
            q = g.produced_by(d.input[0], "QuantizeLinear") if d is not None else None
            if q is None:
                continue
            if len(g.users(q.output[0])) > 1 or len(g.users(d.output[0])) > 1:
                continue  # the codes serve another consumer too (a shared quantizer): the add is not alone
            src = g.quantizer_input(q)  # before the quantizer's own range Clip (grids narrower than INT8)
            if _layer_out(g, src) and len(g.users(src)) == 1:
                yield g.label(n), (f"Q/DQ between {g.label(g.producer[src])} and the add it feeds: "
                                   "TensorRT cannot fuse the add into the conv")


@rule("residual-identity")
def _residual_identity(g: GraphIndex) -> Iterator[Finding]:
    """The identity input of a conv + identity residual add has no Q/DQ, directly or through data movement
    (not checked in weight-only graphs, nor where the conv is a layer `--float-layers` left float)."""
    if _weight_only(g):
        return
    for n in _activation_adds(g):
        layers = [_layer_behind_moves(g, i) for i in n.input]
        sides = [x is not None for x in layers]
        if sides.count(True) == 1:
            if g.float_layer_of(layers[sides.index(True)]):
                continue  # the conv runs in float (--float-layers): so does its add, by request
            ident = n.input[sides.index(False)]
            if _dq_through_moves(g, ident) is None:
                yield g.label(n), (f"identity input {ident!r} of the residual add has no Q/DQ: "
                                   "the add (and conv) fall back to float")


@rule("duplicate-qdq", "warning")
def _duplicate_qdq(g: GraphIndex) -> Iterator[Finding]:
    """Two Q/DQ pairs with equal scales (and zero points and range clips) quantize the same tensor: one pair,
    its DQ feeding every consumer, computes the same, and the engine writes the tensor once instead of twice
    (in INT8 for one consumer, in float for the other). `quantize` shares such quantizers (on by default)."""
    seen: dict[tuple[Any, ...], Any] = {}
    for q in _nodes(g, "QuantizeLinear"):
        scale = _scale(g, q)
        if scale is None or scale.size != 1:
            continue
        zp = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        src = g.quantizer_input(q)
        clip = g.produced_by(q.input[0], "Clip") if src != q.input[0] else None
        bounds = tuple(float(v.reshape(-1)[0]) if v is not None else None
                       for v in (g.value(i) if i else None for i in (clip.input[1:3] if clip is not None else ())))
        key = (src, float(scale.reshape(-1)[0]), None if zp is None else (zp.dtype.str, int(zp.reshape(-1)[0])), bounds)
        first = seen.setdefault(key, q)
        if first is not q:
            yield g.label(q), (f"quantizes {src!r} with the same scale as {g.label(first)}: one Q/DQ pair, its DQ "
                               "feeding both consumers, would do (one quantizer per tensor and grid, as mixq-onnx "
                               "quantize places them by default)")


def _read_only_by_the_chain(g: GraphIndex, start: str, end: str) -> bool:
    """Every tensor from `start` (a layer's output) to `end` (through its rescale, bias and reshapes) has one reader:
    a BatchNorm on `end` could then be folded into the layer without changing what anything else reads."""
    t, const = end, g.folded_constants()
    for _ in range(32):
        if len(g.users(t)) != 1:
            return False
        if t == start:
            return True
        p = g.producer.get(t)
        if p is None:
            return False
        ins = [i for i in p.input if i and i not in const]
        if len(ins) != 1:
            return False
        t = ins[0]
    return False


@rule("unfolded-batchnorm", "warning")
def _unfolded_batchnorm(g: GraphIndex) -> Iterator[Finding]:
    """A BatchNormalization on a quantized Conv/Gemm/MatMul's output (through reshapes), which nothing else reads:
    folded into the layer's weights and bias it costs nothing; left in the graph it runs as a float scale between
    the INT8 kernel and the next quantizer. `quantize` folds a conv's BatchNorm and, from placement revision 3, a BatchNorm1d on a Linear's
    features (LeViT's LinearNorm); one this warns about is a layout it did not recognise, or an older folder."""
    const = g.folded_constants()
    for n in _nodes(g, "BatchNormalization"):
        if not all(i in const for i in n.input[1:5]):
            continue  # statistics computed from the batch (track_running_stats=False): nothing constant to fold
        layer = _layer_behind_moves(g, n.input[0])
        if layer is not None and any(_from_dq(g, i) is not None for i in layer.input[:2]) \
                and _read_only_by_the_chain(g, layer.output[0], n.input[0]):
            yield g.label(n), (f"normalises the output of the quantized {layer.op_type} {g.label(layer)!r}: folded into "
                               "its weights and bias it would cost nothing; here it runs in float between the INT8 "
                               "kernel and the next quantizer")


# --------------------------------------------------------------------------- concat
@rule("concat-scales")
def _concat_scales(g: GraphIndex) -> Iterator[Finding]:
    """Unequal Q/DQ scales across a Concat's inputs and output (TensorRT inserts requantize layers)."""
    for n in _nodes(g, "Concat"):
        scales = []
        for i in n.input:
            d = _from_dq(g, i)
            if d is not None and g.value(d.input[1]) is not None:
                scales.append(float(g.value(d.input[1]).reshape(-1)[0]))
        for u in g.users(n.output[0]):
            if u.op_type == "QuantizeLinear" and g.value(u.input[1]) is not None:
                scales.append(float(g.value(u.input[1]).reshape(-1)[0]))
        if len(scales) > 1 and (max(scales) - min(scales)) > 1e-6 * max(abs(s) for s in scales):
            yield g.label(n), (f"unequal Q/DQ scales across the Concat ({len(scales)} "
                               "scales): TensorRT inserts requantize layers")
