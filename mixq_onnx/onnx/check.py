"""`check`: onnx.checker, shape inference, and a TensorRT QDQ rules lint naming the offending node.

TensorRT (strongly typed, explicit quantization) fuses DQ->Conv/Gemm/MatMul->(Add) into INT8 kernels
only when the graph follows these rules; every violation here is a layer that silently runs in float
or a graph TensorRT rejects.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MixqError

MAX_OPSET = 24
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_INT4 = None


@dataclass
class Violation:
    rule: str
    node: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


def _int4_types() -> set[int]:
    import onnx

    return {t for t in (getattr(onnx.TensorProto, "INT4", None), getattr(onnx.TensorProto, "UINT4", None)) if t}


def check_model(path: str | os.PathLike) -> list[Violation]:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MixqError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot read ONNX model {path}: {str(e)[:160]}") from None
    return lint(model)


def lint(model) -> list[Violation]:
    import onnx
    from onnx import numpy_helper

    out: list[Violation] = []
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        out.append(Violation("onnx-checker", "graph", str(e).splitlines()[0][:200]))
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        out.append(Violation("shape-inference", "graph", str(e).splitlines()[0][:200]))
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset > MAX_OPSET:
        out.append(Violation("opset", "graph", f"opset {opset} is above {MAX_OPSET}, the newest TensorRT parses"))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    int4 = _int4_types()
    # tensors computed from constants alone (a relative-position-bias table gathered and reshaped, a
    # shifted-window mask): TensorRT folds them at build time, so they are weights or biases, not
    # activations (graph nodes are topologically sorted)
    const = set(inits) | set(consts)
    for n in g.node:
        ins = [i for i in n.input if i]
        if ins and n.domain in ("", "ai.onnx") and all(i in const for i in ins):
            const.update(o for o in n.output if o)

    def arr(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    def dtype(name: str) -> int | None:
        if name in inits:
            return inits[name].data_type
        return None

    def nm(n) -> str:
        return n.name or f"{n.op_type}({n.output[0]})"

    def attr(n, key: str, default=None):
        for a in n.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    # ---- Q/DQ parameters
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = arr(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            out.append(Violation("scale", nm(n), "scale is not a constant"))
        elif np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            flat = scale.reshape(-1).astype(np.float64)
            i = int(np.flatnonzero(~(np.isfinite(flat) & (flat > 0)))[0])
            at = f" at index {i}" if flat.size > 1 else ""
            out.append(Violation("scale", nm(n), f"non-positive or non-finite scale ({flat[i]:g}{at})"))
        if len(n.input) > 2 and n.input[2]:
            zp = arr(n.input[2])
            if zp is not None and np.any(zp != 0):
                out.append(Violation("zero-point", nm(n), f"non-zero zero point ({zp.reshape(-1)[:4].tolist()}): "
                                                          "TensorRT quantization is symmetric"))
        if n.op_type == "DequantizeLinear":
            x = n.input[0]
            if scale is not None and scale.size > 1 and x not in inits and x not in consts:
                out.append(Violation("per-channel-input", nm(n), "per-channel scale on a non-constant input"))
            if dtype(x) == onnx.TensorProto.INT32:
                out.append(Violation("int32-bias", nm(n), "INT32 bias DQ: keep biases float"))
            p = producer.get(x)
            if p is not None and p.op_type == "Clip" and producer.get(p.input[0]) is not None and \
                    producer[p.input[0]].op_type == "QuantizeLinear":
                out.append(Violation("int-clip", nm(p), "Clip in the integer domain between Q and DQ; "
                                                         "clip the float input before the Q instead"))

    # ---- Q -> DQ pairs with different scales: only the integer layout's DQ(codes, scale 1) is legitimate,
    # and only when every reader is a Conv/Gemm/MatMul whose output is rescaled by a constant Mul
    for n in g.node:
        if n.op_type != "DequantizeLinear" or producer.get(n.input[0]) is None:
            continue
        q = producer[n.input[0]]
        sq, sd = (arr(q.input[1]) if len(q.input) > 1 else None), (arr(n.input[1]) if len(n.input) > 1 else None)
        if q.op_type != "QuantizeLinear" or sq is None or sd is None or np.array_equal(sq, sd):
            continue
        for u in users.get(n.output[0], []):
            after = users.get(u.output[0], []) if u.op_type in _LAYER_OPS else []
            if not (len(after) == 1 and after[0].op_type == "Mul" and any(i in const for i in after[0].input)):
                out.append(Violation("qdq-scale-pair", nm(n), f"DQ scale {float(sd.reshape(-1)[0]):.6g} differs from "
                                                              f"its Q's {float(sq.reshape(-1)[0]):.6g} and {nm(u)} "
                                                              "does not rescale its output: values change by their ratio"))

    # ---- layers
    def from_dq(name: str):
        p = producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    # A weight-only graph (W4A16: no activation QuantizeLinear at all) runs its activations in float by
    # design; float inputs, and float convolutions beside INT4 GEMMs, are then notes, not errors.
    weight_only = not any(n.op_type == "QuantizeLinear" for n in g.node)
    soft = "warning" if weight_only else "error"
    for n in g.node:
        if n.op_type not in _LAYER_OPS:
            continue
        data_in = [n.input[0]] + ([n.input[1]] if n.op_type == "MatMul" and n.input[1] not in const else [])
        for i in data_in:
            if from_dq(i) is None:
                out.append(Violation("unquantized-input", nm(n), f"input {i!r} has no Q/DQ: the layer runs in float",
                                     soft))
        w = n.input[1]
        dq = from_dq(w)
        if dq is None:
            if w in const:
                out.append(Violation("unquantized-weight", nm(n), f"weight {w!r} has no DequantizeLinear", soft))
            continue
        block = attr(dq, "block_size", 0) or 0
        if block:
            shape = inits[dq.input[0]].dims if dq.input[0] in inits else None
            rank = len(shape) if shape is not None else 2
            if n.op_type == "Gemm":
                want_k = 1 if attr(n, "transB", 0) else 0
            else:
                want_k = rank - 2
            if attr(dq, "axis", 1) % rank != want_k:
                out.append(Violation("block-axis", nm(dq), f"block quantization along axis {attr(dq, 'axis', 1)}, "
                                                            f"expected the reduction axis {want_k} of the {n.op_type}"))
        wx = dq.input[0]
        if dtype(wx) in int4 and n.op_type == "Conv":
            out.append(Violation("int4-conv", nm(n), "INT4 weights feed a Conv: TensorRT supports INT4 only "
                                                    "weight-only for MatMul/Gemm"))
        scale = arr(dq.input[1])
        if scale is not None and scale.size > 1 and attr(dq, "block_size", 0) in (0, None):
            axis = attr(dq, "axis", 1)
            shape = inits[wx].dims if wx in inits else None
            rank = len(shape) if shape is not None else 2
            axis = axis % rank
            if n.op_type == "Conv":
                want = 0
            elif n.op_type == "Gemm":
                want = 0 if attr(n, "transB", 0) else 1
            else:
                want = rank - 1
            if axis != want:
                out.append(Violation("per-channel-axis", nm(dq), f"per-channel axis {axis} on a {n.op_type} weight, "
                                                                  f"expected {want} (output channels)"))

    # ---- integer layout (passes.integer_gemms): Conv/Gemm/MatMul(DQ(codes, 1), DQ(W, 1)) -> Mul(s_x * s_w).
    # The real scales live in that Mul's constant, where the Q/DQ scale rule above does not look: a zero
    # there silences its channels, a negative one flips their sign, and TensorRT builds it all the same.
    for n in g.node:
        if n.op_type not in _LAYER_OPS or len(n.input) < 2:
            continue
        dqs = [from_dq(i) for i in n.input[:2]]
        scales = [arr(d.input[1]) if d is not None and len(d.input) > 1 else None for d in dqs]
        if any(sc is None or sc.size == 0 or not np.all(sc == 1) for sc in scales):
            continue
        after = users.get(n.output[0], [])
        if len(after) != 1 or after[0].op_type != "Mul":
            continue
        mul = after[0]
        factor = next((arr(i) for i in mul.input if i != n.output[0] and arr(i) is not None), None)
        if factor is None:
            continue
        flat = factor.reshape(-1).astype(np.float64)
        wrong = ~(np.isfinite(flat) & (flat > 0))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            out.append(Violation("rescale", nm(mul), f"rescale constant (s_x*s_w of {nm(n)}) has {flat[i]:g} at "
                                                     f"channel {i}: scales must be finite and positive"))

    # ---- residual adds
    def layer_out(name: str) -> bool:
        p = producer.get(name)
        if p is not None and p.op_type == "Add" and len(p.input) == 2 and sum(i in const for i in p.input) == 1:
            p = producer.get(next(i for i in p.input if i not in const))  # MatMul + bias (a Linear on 3-D input)
        return p is not None and p.op_type in _LAYER_OPS

    for n in g.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(i in const for i in n.input):
            continue
        sides = [layer_out(i) for i in n.input]
        dq_sides = [from_dq(i) for i in n.input]
        for d in dq_sides:
            # an add with a plain conv output on one side fuses into that conv; a quantized conv output on
            # the other side is then its residual input (MobileNetV2: block i's output, quantized, is block
            # i+1's identity), not a Q/DQ that breaks the fusion. Nor is one on a conv output that other
            # nodes read too (Swin's patch-merging output feeds LayerNorm and the add): it cannot absorb the add.
            if d is not None and not any(sides):
                q = producer.get(d.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    src = q.input[0]
                    c = producer.get(src)
                    if c is not None and c.op_type == "Clip" and c.name.rsplit("/", 1)[0] == q.name.rsplit("/", 1)[0]:
                        src = c.input[0]  # the quantizer's own range Clip (grids narrower than INT8)
                    if layer_out(src) and len(users.get(src, [])) == 1:
                        out.append(Violation("qdq-conv-add", nm(n), f"Q/DQ between {nm(producer[src])} and the "
                                                                   "add it feeds: TensorRT cannot fuse the add into the conv"))
        if sides.count(True) == 1 and not weight_only:
            ident = n.input[sides.index(False)]
            if from_dq(ident) is None:
                out.append(Violation("residual-identity", nm(n), f"identity input {ident!r} of the residual add has "
                                                                  "no Q/DQ: the add (and conv) fall back to float"))

    # ---- concat scales
    for n in g.node:
        if n.op_type != "Concat":
            continue
        scales = []
        for i in n.input:
            d = from_dq(i)
            if d is not None and arr(d.input[1]) is not None:
                scales.append(float(arr(d.input[1]).reshape(-1)[0]))
        for u in users.get(n.output[0], []):
            if u.op_type == "QuantizeLinear" and arr(u.input[1]) is not None:
                scales.append(float(arr(u.input[1]).reshape(-1)[0]))
        if len(scales) > 1 and (max(scales) - min(scales)) > 1e-6 * max(abs(s) for s in scales):
            out.append(Violation("concat-scales", nm(n), f"unequal Q/DQ scales across the Concat ({len(scales)} "
                                                         "scales): TensorRT inserts requantize layers"))
    return out


def report(violations: list[Violation]) -> dict[str, Any]:
    errors = [v for v in violations if v.severity == "error"]
    return {"ok": not errors, "errors": len(errors), "violations": [asdict(v) for v in violations]}
