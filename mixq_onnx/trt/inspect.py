"""Per-layer precision report of a built engine, mapped back to the QDQ ONNX graph.

The engine's layer list (captured at build time) says which datatypes each kernel reads; the
ONNX graph says which nodes were meant to be quantized and how many MACs each compute node
does. Joining them by the `[ONNX Layer: …]` metadata shows where quantization did not survive
the build: float compute, stray requantize layers, unfused 4-bit Clips, bypassed quantizers; and the
hand-offs, conversions between kernels that cost bandwidth (reformat/requantize layers, tensors passed
in float between non-compute kernels), which `build --max-handoffs` bounds.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixqError
from .layers import LayerInfo, TensorInfo

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# ops that only move or reshape data: reading a float tensor for these is no precision loss
MOVE_OPS = {"Slice", "Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Gather",
            "Identity", "Expand", "Tile", "MaxPool", "Shape", "Cast", "Clip", "Relu"}
AMBIGUOUS = ("its name is empty or not unique in the graph, so no engine layer can be matched to it (its MACs "
             "count as not INT8); give every node a unique name")
_COMPUTE_LAYER = re.compile(r"conv|correlation|gemm|matmul|matrixmultiply|fullyconnected|deconv", re.IGNORECASE)
_REFORMAT_LAYER = re.compile(r"reformat|requant|shuffle", re.IGNORECASE)
_HANDOFF_LAYER = re.compile(r"reformat|requant", re.IGNORECASE)  # a kernel type that only converts a tensor
#: TensorRT's own name for the reformat layers it inserts (a layer *type* names the rest; an ONNX node name such
#: as `neck.reformat/Conv` carried into a layer's name says nothing about what the layer does)
_REFORMAT_NAME = re.compile(r"^Reformatting CopyNode", re.IGNORECASE)
#: Myelin op tokens of a fused layer (`__myl_CastMulFc_myl0_2`, type runtime_fusion) that multiply by weights
_MYELIN_COMPUTE = {"Fc", "Conv", "Gemm", "Mm", "Bmm", "Deconv"}
INT8 = {"Int8", "UInt8"}
#: What the summary's "hand-offs" count means, in one sentence.
HANDOFF_NOTE = ("(a hand-off is a conversion between kernels: a reformat/requantize layer, or a float hand-off, a "
                "tensor that one non-compute kernel passes to the next in float rather than int8, where the engine "
                "converts between int8 and float between kernels; either costs bandwidth and time, not accuracy; "
                "the float input of a layer the graph leaves float is that layer's precision, not a hand-off)")
LOW_WEIGHTS = {"Int8", "UInt8", "Int4", "FP8", "FP4"}


@dataclass
class Fallback:
    node: str  # the ONNX node that lost its quantization
    op: str
    layer: str | None
    reason: str

    def __str__(self) -> str:
        where = f" (engine layer {self.layer})" if self.layer else ""
        return f"{self.node} [{self.op}]{where}: {self.reason}"


@dataclass
class ComputeNode:
    node: str
    op: str
    macs: int
    quantized: str  # "int8" (Q/DQ on both operands), "weight-only", "" (float in the graph)
    precision: str  # what the engine runs: "int8", "int4-weight", "int8-weight", "float", "missing"
    layer: str | None = None
    bits: str = ""  # the grid the graph means (its DQs' mixq.bits): "w4a4", "w4" (weight-only), "" (float)


@dataclass
class PrecisionReport:
    int8_mac_fraction: float
    total_macs: int
    int8_macs: int
    int4_weight_macs: int
    fallbacks: list[Fallback] = field(default_factory=list)
    standalone_clips: list[dict[str, str]] = field(default_factory=list)
    int4_weight_layers: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # quantized ONNX nodes no engine layer names
    compute: list[ComputeNode] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # float activations passed between two non-compute kernels (extra bandwidth, not a precision loss)
    float_handoffs: list[dict[str, Any]] = field(default_factory=list)
    # kernels that only convert a tensor: TensorRT's reformat layers, standalone requantize (DQ -> Q) layers
    reformat_layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def handoffs(self) -> int:
        """Hand-offs: reformat/requantize layers plus float hand-offs between non-compute kernels (what
        `build --max-handoffs` bounds)."""
        return len(self.reformat_layers) + len(self.float_handoffs)

    @property
    def handoff_bytes(self) -> int | None:
        """Bytes the hand-offs move per inference at the profile's shape (each float hand-off's tensor, each
        conversion layer's outputs), so a 32-value pooled vector and a full feature map are not one count each;
        None when some shape is unknown."""
        sizes = [h.get("bytes") for h in (*self.reformat_layers, *self.float_handoffs)]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def handoff_lines(self) -> list[str]:
        """One line per hand-off: the conversion layers, then the float tensors (from kernel -> to kernel)."""
        out = [f"{li['type']} layer {li['layer']}" + (f" ({', '.join(li['onnx_nodes'][:3])})" if li["onnx_nodes"] else "")
               for li in self.reformat_layers]
        for h in self.float_handoffs:
            dims = "x".join("?" if d < 0 else str(d) for d in h.get("dims") or [])
            out.append(f"{h.get('dtype', 'Float')} {dims} {h.get('from', '?')} -> {h.get('to', '?')}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8_mac_fraction"] = round(self.int8_mac_fraction, 6)
        d["fallbacks"] = [asdict(f) for f in self.fallbacks]
        d["handoffs"] = self.handoffs
        d["handoff_bytes"] = self.handoff_bytes
        return d

    def summary(self, max_lines: int = 20) -> str:
        n_layers = len(self.layers)
        shape = " ".join("x".join(str(d) for d in v) for v in self.shapes.values()) or "the graph's shape"
        by_prec: dict[str, int] = defaultdict(int)
        for c in self.compute:
            by_prec[c.precision] += 1
        lines = [f"int8 MAC fraction {100 * self.int8_mac_fraction:.2f} % of {self.total_macs / 1e6:.2f} M MACs at {shape} "
                 f"({n_layers} engine layers; compute nodes: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(by_prec.items())) + ")"]
        grids: dict[tuple[str, str], int] = defaultdict(int)
        for c in self.compute:
            if c.bits:
                grids[(c.bits, c.precision)] += 1
        if grids:
            lines.append("intended grids (graph bits on engine precision): "
                         + ", ".join(f"{b} on {p} x {k}" for (b, p), k in sorted(grids.items(), key=lambda kv: (-kv[1], kv[0]))))
        if self.int4_weight_layers:
            lines.append(f"int4 weight layers: {len(self.int4_weight_layers)} "
                         f"({100 * self.int4_weight_macs / max(self.total_macs, 1):.2f} % of MACs)")
        lines.append(f"fallbacks: {len(self.fallbacks)}  standalone clip layers: {len(self.standalone_clips)}  "
                     f"hand-offs: {self.handoffs} = {len(self.reformat_layers)} reformat/requantize layers + "
                     f"float hand-offs between non-compute kernels: {len(self.float_handoffs)}"
                     + (f" ({_kib(self.handoff_bytes)} per inference at {shape})" if self.handoffs
                        and self.handoff_bytes is not None else ""))
        lines.append(f"  {HANDOFF_NOTE}")
        for kind, items in (("fallback", [str(f) for f in self.fallbacks]), ("hand-off", self.handoff_lines())):
            for item in items[:max_lines]:
                lines.append(f"  {kind}: {item}")
            if len(items) > max_lines:
                lines.append(f"  … {len(items) - max_lines} more {kind}s (use --json)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the ONNX side
class _Graph:
    """inspect's questions about the graph, asked of the shared GraphIndex (inputs pinned to the plan's
    shapes, shapes inferred so MACs can be counted)."""

    def __init__(self, onnx_path: str | Path, input_shapes: dict[str, list[int]]):
        from ..onnx.graph import GraphIndex  # the onnx package imports torch: only when analyzing

        # without its external data: a constant is read from the data file when asked for (the scales), and
        # `inspect_plan` has compared the graph with its weights against the plan's record before this
        self.index = ix = GraphIndex.load(onnx_path, external_data=False, infer_shapes=True,
                                          input_shapes=input_shapes)
        self.nodes = ix.by_name
        # Engine layers name the ONNX nodes they run: a node whose name is empty or shared cannot be matched to
        # its layer, so its precision is not attributed (counted as not INT8, never as INT8).
        counts = Counter(n.name for n in ix.nodes)
        self.ambiguous = {name for name, k in counts.items() if k > 1 or not name}
        self.producer = ix.producer
        self.graph_inputs = set(ix.inputs)
        self.shapes = ix.shapes

    def op(self, name: str) -> str:
        n = self.nodes.get(name)
        return n.op_type if n is not None else "?"

    def dq_fed(self, tensor: str) -> Any | None:
        return self.index.produced_by(tensor, "DequantizeLinear")

    def is_weight_dq(self, n: Any) -> bool:
        return n.op_type == "DequantizeLinear" and self.index.is_constant(n.input[0])

    def grid(self, n: Any) -> str:
        """The bit widths the graph means a compute node to run at, from its operands' DQ `mixq.bits`:
        "w4a4" (4-bit weights, 4-bit activations), "w4" (weight-only), "a8a8" (two activations), "float" (a
        layer `--float-layers` left float on purpose), "" (float, not asked for)."""
        if self.index.float_layer_of(n):
            return "float"
        parts = []
        for t in n.input[:2]:
            dq = self.dq_fed(t)
            bits = self.index.bits_of(dq)
            if bits is not None:
                parts.append(("w" if self.is_weight_dq(dq) else "a", bits))
        parts.sort(key=lambda p: p[0] != "w")  # weights first
        return "".join(f"{k}{b}" for k, b in parts)

    def macs(self, n: Any) -> int:
        out = self.shapes.get(n.output[0], [])
        if not out or any(d <= 0 for d in out):
            return 0
        vol = 1
        for d in out:
            vol *= d
        if n.op_type in ("Conv", "ConvTranspose"):
            w = self._operand_shape(n.input[1])
            if len(w) < 3:
                return 0
            k = 1
            for d in w[2:]:
                k *= d
            if n.op_type == "ConvTranspose":  # each input pixel scatters Cout/g * k
                x = self.shapes.get(n.input[0], [])
                return _prod(x) * w[1] * k if x and all(d > 0 for d in x) else 0
            return vol * w[1] * k
        a = self._operand_shape(n.input[0])
        if not a:
            return 0
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        kdim = a[-2] if (n.op_type == "Gemm" and trans_a) else a[-1]
        return vol * kdim if kdim > 0 else 0

    def _operand_shape(self, tensor: str) -> list[int]:
        s = self.shapes.get(tensor)
        if s:
            return s
        dq = self.dq_fed(tensor)
        return self.shapes.get(dq.input[0], []) if dq is not None else []

    def feeds_quantizer(self, tensor: str) -> bool:
        """Does this tensor reach a QuantizeLinear (directly or through its Clip)?"""
        for c in self.index.users(tensor):
            if c.op_type == "QuantizeLinear":
                return True
            if c.op_type == "Clip" and any(cc.op_type == "QuantizeLinear" for cc in self.index.users(c.output[0])):
                return True
        return False


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


# --------------------------------------------------------------------------- the engine side
def _operands(layer: LayerInfo) -> list[str]:
    return [t.dtype for t in layer.inputs if not t.volume_known_scalar]


def _weights(layer: LayerInfo) -> list[str]:
    """Datatypes of weight-like constants (at least 2-D or many elements, not per-channel scale vectors)."""
    out = []
    for t in layer.constants:
        big = [d for d in t.dims if d > 1]
        if len(big) >= 2 or (t.name in ("Weights", "Kernel Weights")):
            out.append(t.dtype)
    return out


def layer_precision(layer: LayerInfo) -> str:
    ins, ws = _operands(layer), _weights(layer)
    if ins and all(d in INT8 for d in ins) and (any(w in INT8 for w in ws) or (not ws and len(ins) >= 2)):
        return "int8"
    if any(w == "Int4" for w in ws):
        return "int4-weight"
    if any(w in INT8 for w in ws):
        return "int8-weight"
    kinds = sorted(set(ins))
    if ws and kinds and all(k in INT8 for k in kinds):
        # int8 in, float weights: the kernel converts its input and multiplies in float (an INT8 GEMM needs
        # integer weights), so it is a float layer whatever its input says
        return f"{'/'.join(sorted({w.lower() for w in ws}))}(int8 in)"
    return "/".join(k.lower() for k in kinds) if kinds else "none"


def analyze(onnx_path: str | Path, layers: list[LayerInfo], input_shapes: dict[str, list[int]] | None = None
            ) -> PrecisionReport:
    """Join engine layers with the ONNX graph: MAC-weighted int8 share and every lost quantization."""
    input_shapes = input_shapes or {}
    batch = next((v[0] for v in input_shapes.values() if v and v[0] > 0), None)  # the profile's opt batch
    g = _Graph(onnx_path, input_shapes)
    by_node: dict[str, list[LayerInfo]] = defaultdict(list)
    for li in layers:
        for n in li.onnx_nodes:
            by_node[n].append(li)
    tensor_producer = {t.name: li for li in layers for t in li.outputs}
    fallbacks: list[Fallback] = []
    unmapped: list[str] = []
    seen: set[tuple[str, str]] = set()

    def fall(node: str, layer: str | None, reason: str) -> None:
        if (node, reason) not in seen:
            seen.add((node, reason))
            fallbacks.append(Fallback(node, g.op(node), layer, reason))

    # compute nodes: MACs and the precision the engine gave them
    compute: list[ComputeNode] = []
    total = int8_macs = int4_macs = 0
    int4_layers: list[str] = []
    for n in g.index.nodes:
        name = n.name
        if n.op_type not in COMPUTE_OPS:
            continue
        macs = g.macs(n)
        total += macs
        if name in g.ambiguous:
            compute.append(ComputeNode(name, n.op_type, macs, "", "unattributed", None, g.grid(n)))
            fall(name or f"<unnamed {n.op_type}>", None, AMBIGUOUS)
            continue
        a_dq = g.dq_fed(n.input[0])
        b_dq = g.dq_fed(n.input[1]) if len(n.input) > 1 else None
        quantized = "int8" if (a_dq is not None and b_dq is not None) else ("weight-only" if b_dq is not None else "")
        cands = by_node.get(name, [])
        comp = [li for li in cands if _COMPUTE_LAYER.search(li.layer_type) or _COMPUTE_LAYER.search(li.name)]
        best = None
        prec = "missing"
        for li in comp or cands:
            p = layer_precision(li)
            rank = {"int8": 3, "int4-weight": 2, "int8-weight": 1}.get(p, 0)
            if best is None or rank > {"int8": 3, "int4-weight": 2, "int8-weight": 1}.get(prec, 0):
                best, prec = li, p
        if prec == "int8":
            int8_macs += macs
        elif prec == "int4-weight":
            int4_macs += macs
            if best is not None and best.name not in int4_layers:
                int4_layers.append(best.name)
        compute.append(ComputeNode(name, n.op_type, macs, quantized, prec if best is not None else "missing",
                                   best.name if best is not None else None, g.grid(n)))
        if quantized == "int8" and prec != "int8":
            why = ("no engine layer runs it" if best is None else
                   f"runs in a {prec} layer (inputs {', '.join(_operands(best)) or '-'}; "
                   f"weights {', '.join(_weights(best)) or '-'})")
            fall(name, best.name if best else None, why)
        elif quantized == "weight-only" and prec not in ("int4-weight", "int8-weight", "int8"):
            fall(name, best.name if best else None,
                 "weight-only quantized weights were dequantized to float before the kernel")

    # Q/DQ nodes: fused into a layer that reads/writes the integer type?
    for n in g.index.nodes:
        name = n.name
        if n.op_type not in QDQ_OPS:
            continue
        if name in g.ambiguous:
            fall(name or f"<unnamed {n.op_type}>", None, AMBIGUOUS)
            continue
        lis = by_node.get(name, [])
        if not lis:
            unmapped.append(name)
            continue
        if n.op_type == "QuantizeLinear":
            dqs = [c for c in g.index.users(n.output[0]) if c.op_type == "DequantizeLinear"]
            fused = bool(dqs) and all(any(d.name in li.onnx_nodes for li in lis) for d in dqs)  # Q->DQ in-kernel
            ok = fused or any(t.dtype in INT8 | {"Int4"} for li in lis for t in li.outputs + li.inputs)
            if not ok:
                fall(name, lis[0].name, "quantization runs in a float layer (no integer output)")
        elif g.is_weight_dq(n):
            ok = any(t.dtype in LOW_WEIGHTS for li in lis for t in li.constants + li.inputs)
            if not ok:
                fall(name, lis[0].name, "weights were dequantized to float at build time")
        else:
            q = g.producer.get(n.input[0])
            fused = q is not None and any(q.name in li.onnx_nodes for li in lis)  # Q->DQ inside one kernel
            ok = fused or any(t.dtype in INT8 | {"Int4"} for li in lis for t in li.inputs)
            if not ok:
                fall(name, lis[0].name, "dequantization runs in a float layer (no integer input)")

    # requantize / reformat layers and standalone Clips
    clips: list[dict[str, str]] = []
    reformats: list[dict[str, Any]] = []
    for li in layers:
        ops = {n: g.op(n) for n in li.onnx_nodes}
        qdq = [n for n, o in ops.items() if o in QDQ_OPS]
        if (_HANDOFF_LAYER.search(li.layer_type) or _REFORMAT_NAME.search(li.name)) and not _is_compute(li):
            reformats.append({"layer": li.name, "type": li.layer_type, "onnx_nodes": list(li.onnx_nodes),
                              "bytes": _written(li, batch)})
        if _REFORMAT_LAYER.search(li.layer_type) and qdq:
            for n in qdq:
                fall(n, li.name, f"gained a {li.layer_type} layer")
        elif qdq and all(o in QDQ_OPS | {"Clip", "Cast", "Identity"} for o in ops.values()):
            input_quant = all(g.nodes[n].op_type == "QuantizeLinear" and g.nodes[n].input[0] in g.graph_inputs
                              for n in qdq if n in g.nodes)
            has_dq_then_q = any(o == "DequantizeLinear" for o in ops.values()) and any(
                o == "QuantizeLinear" for o in ops.values())
            if not input_quant and (has_dq_then_q or any(o == "Clip" for o in ops.values())):
                for n in qdq:
                    fall(n, li.name, "standalone requantize layer (not fused into a neighbour)")
            if not input_quant and has_dq_then_q and not any(r["layer"] == li.name for r in reformats):
                reformats.append({"layer": li.name, "type": "requantize", "onnx_nodes": list(li.onnx_nodes),
                                  "bytes": _written(li, batch)})
        clip_only = bool(ops) and all(o in QDQ_OPS | {"Clip", "Cast", "Identity"} for o in ops.values())
        for n, o in ops.items():
            if o != "Clip" or n not in g.nodes:
                continue
            src = g.producer.get(g.nodes[n].input[0])
            with_producer = src is not None and any(src.name in x.onnx_nodes for x in by_node[n])
            if clip_only or (src is not None and not with_producer and src.op_type not in QDQ_OPS):
                clips.append({"node": n, "layer": li.name})
                fall(n, li.name, "standalone Clip layer: the activation clip is not fused into the producer's epilogue")

    # bypassed quantizers: an arithmetic node reading the float tensor that feeds a QuantizeLinear
    for li in layers:
        for t in li.inputs:
            if t.dtype in INT8 or t.name not in tensor_producer:
                continue
            src = tensor_producer[t.name]
            if _is_compute(src):
                continue
            src_nodes = set(src.onnx_nodes)
            for v in li.onnx_nodes:
                vn = g.nodes.get(v)
                if vn is None or vn.op_type in MOVE_OPS | QDQ_OPS | COMPUTE_OPS:
                    continue
                for x in vn.input:
                    p = g.producer.get(x)
                    if p is not None and p.name in src_nodes and g.feeds_quantizer(x):
                        fall(v, li.name, f"reads the unquantized {t.dtype} tensor {x!r} that also feeds a "
                                         f"QuantizeLinear (its Q/DQ pair is bypassed)")

    # A compute node the graph leaves float (a float layer, a weight-only GEMM) reads float activations by
    # design: its engine layer's float input is that layer's precision (reported above as its compute precision
    # and in int8_mac_fraction), not a conversion between kernels.
    # Float data flow between two kernels that both run wholly in float (a float engine, a weight-only
    # network, a float region) converts nothing either: it is counted only where one side handles int8.
    float_compute_layers = {c.layer for c in compute if c.layer is not None and c.quantized != "int8"}
    handoffs = []
    for li in layers:
        if li.name in float_compute_layers:
            continue
        for t in li.inputs:
            src = tensor_producer.get(t.name)
            if (src is not None and t.dtype not in INT8 and not _is_compute(src)
                    and src.layer_type != "shape_call" and (_handles_int8(src) or _handles_int8(li))):
                handoffs.append({"tensor": t.name, "dtype": t.dtype, "dims": t.dims, "from": src.name, "to": li.name,
                                 "bytes": _nbytes(t, batch)})

    table = [{"name": li.name, "type": li.layer_type, "precision": layer_precision(li),
              "inputs": [t.dtype for t in li.inputs], "weights": _weights(li),
              "outputs": [t.dtype for t in li.outputs], "onnx_nodes": li.onnx_nodes} for li in layers]
    amb = [n.name or f"<unnamed {n.op_type}>" for n in g.index.nodes
           if n.name in g.ambiguous and n.op_type in COMPUTE_OPS | QDQ_OPS]
    warnings = ([f"{len(amb)} compute or Q/DQ node(s) of {onnx_path} have an empty or shared name "
                 f"({', '.join(sorted(set(amb))[:3])}): engine layers name their ONNX nodes, so these are not "
                 "attributed and their MACs count as not INT8"] if amb else [])
    if not any(n.op_type == "QuantizeLinear" for n in g.index.nodes):  # strongly typed: no Q/DQ, no int8 anywhere
        warnings.append(f"{onnx_path} has no QuantizeLinear node: the engine runs wholly in float (precision comes "
                        "only from Q/DQ); build the graph `mixq-onnx export` writes from a quantized folder")
    return PrecisionReport(int8_mac_fraction=(int8_macs / total) if total else 0.0, total_macs=total,
                           int8_macs=int8_macs, int4_weight_macs=int4_macs, fallbacks=fallbacks,
                           standalone_clips=clips, int4_weight_layers=int4_layers, unmapped=unmapped,
                           compute=compute, layers=table, shapes=dict(input_shapes), float_handoffs=handoffs,
                           reformat_layers=reformats, warnings=warnings)


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _nbytes(t: TensorInfo, batch: int | None) -> int | None:
    """`t.nbytes` with a dynamic (-1) dimension taken at the profile's opt batch: the builder logs a dynamic batch
    as -1, and the batch is the only dimension `build` makes dynamic."""
    if batch is None or all(d >= 0 for d in t.dims):
        return t.nbytes
    return TensorInfo(t.name, t.dtype, [batch if d < 0 else d for d in t.dims]).nbytes


def _written(li: LayerInfo, batch: int | None = None) -> int | None:
    """Bytes a conversion layer writes per inference (its outputs), None where a shape is unknown."""
    sizes = [_nbytes(t, batch) for t in li.outputs]
    return None if not sizes or any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


def _is_compute(li: LayerInfo) -> bool:
    """A conv/GEMM kernel: by its type, or, for Myelin's fused layers (type runtime_fusion), by an op token of
    its name."""
    if _COMPUTE_LAYER.search(li.layer_type):
        return True
    m = re.match(r"__myl_([A-Za-z0-9]+?)_myl", li.name)
    return bool(m) and not _MYELIN_COMPUTE.isdisjoint(re.findall(r"[A-Z][a-z0-9]*", m.group(1)))


def _handles_int8(li: LayerInfo) -> bool:
    """The engine layer reads or writes an int8 tensor: it belongs to the quantized part of the engine."""
    return any(t.dtype in INT8 for t in li.inputs + li.outputs)


# ModelProto's first bytes: field 1 (ir_version, a small varint), then one of its other fields' tags
_ONNX_THIRD_BYTE = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x52, 0x5A, 0x72}


def refuse_onnx_as_plan(path: str | Path) -> None:
    """Raise a one-line `MixqError` when `path` is an ONNX graph (by its .onnx name, or by its first bytes when
    it has no PLAN.json beside it) given where a built plan belongs."""
    from .builder import meta_path_for

    path = Path(path)
    if not path.is_file():
        return
    onnx_graph = path.suffix.lower() == ".onnx"
    if not onnx_graph and not meta_path_for(path).is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(3)
        except OSError:
            return
        onnx_graph = len(head) == 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_THIRD_BYTE
    if onnx_graph:
        raise MixqError(f"{path} is an ONNX graph, not a plan: run build first (mixq-onnx build {path})")


def inspect_plan(plan_path: str | Path, onnx_path: str | Path | None = None) -> PrecisionReport:
    """Precision report of a built plan from its model.plan.json (no GPU needed)."""
    from .builder import plan_layers, read_plan_meta

    refuse_onnx_as_plan(plan_path)
    meta = read_plan_meta(plan_path)
    given = onnx_path is not None
    onnx_path = Path(onnx_path or meta["onnx"]["path"])
    if not onnx_path.is_file():
        raise MixqError(f"the plan's ONNX graph {onnx_path} is gone; pass --onnx PATH")
    from ..onnx.graph import graph_sha256

    want = (meta.get("onnx") or {}).get("sha256")
    try:
        same = isinstance(want, str) and graph_sha256(onnx_path) == want
    except OSError as e:
        raise MixqError(f"cannot read {onnx_path}: {e.strerror or e}") from None
    if not same:  # the layers would be mapped onto another graph: a wrong report, so none
        recorded = f"sha256 {want[:12]}… recorded in {Path(plan_path).name}.json" if isinstance(want, str) else \
            f"{Path(plan_path).name}.json records no sha256"
        where = "--onnx " + str(onnx_path) if given else f"{onnx_path}, the graph {Path(plan_path).name}.json names,"
        raise MixqError(f"{where} is not the graph the plan was built from ({recorded}): pass --onnx with the graph it "
                        "was built from, or rebuild the plan from this one")
    layers = plan_layers(meta)
    if not layers:
        raise MixqError(f"{plan_path}.json holds no layer information; rebuild the plan with `mixq-onnx build`")
    shapes = {i["name"]: list(i["opt"]) for i in meta.get("inputs", [])}
    return analyze(onnx_path, layers, shapes)
