"""Engine layer information in one shape, whichever way it was captured.

TensorRT-RTX builds on a CPU (ahead of time) and cannot deserialize the plan there, so the
layer list comes from the builder's VERBOSE log (`Layers:` dump, one `Name: …` line per layer).
On a GPU host the engine inspector's JSON gives the same facts. Both become `LayerInfo`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_DTYPES = (("int4", "Int4"), ("int8", "Int8"), ("uint8", "UInt8"), ("fp8", "FP8"), ("fp4", "FP4"),
           ("bf16", "BFloat16"), ("bfloat16", "BFloat16"), ("half", "Half"), ("fp16", "Half"),
           ("float16", "Half"), ("fp32", "Float"), ("float", "Float"), ("int32", "Int32"),
           ("int64", "Int64"), ("bool", "Bool"))

#: bits per element of each normalised datatype
DTYPE_BITS = {"Int4": 4, "FP4": 4, "Int8": 8, "UInt8": 8, "FP8": 8, "Bool": 8, "BFloat16": 16, "Half": 16,
              "Float": 32, "Int32": 32, "Int64": 64}


def normalize_dtype(text: str) -> str:
    """'Int8', 'INT8', 'Channel major INT8 format …', 'Row major linear FP32' -> Int8 / Float / …"""
    t = text.lower()
    for key, name in _DTYPES:
        if re.search(rf"(?<![a-z0-9]){key}(?![a-z0-9])", t):
            return name
    return text.strip() or "Unknown"


@dataclass
class TensorInfo:
    name: str
    dtype: str
    dims: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int | None:
        """Bytes of one tensor of these dims (None where a dim or the datatype is unknown); Int4/FP4 pack two a byte."""
        size = DTYPE_BITS.get(self.dtype)
        if size is None or any(d < 0 for d in self.dims):
            return None
        n = 1
        for d in self.dims:
            n *= d
        return (n * size + 7) // 8

    @property
    def volume_known_scalar(self) -> bool:
        """Scalars and per-tensor constants ([1], [1,1,…]) are scales, not operands."""
        return all(d == 1 for d in self.dims)


@dataclass
class LayerInfo:
    name: str
    layer_type: str
    inputs: list[TensorInfo] = field(default_factory=list)
    constants: list[TensorInfo] = field(default_factory=list)  # weights (Myelin constants / inspector Weights)
    outputs: list[TensorInfo] = field(default_factory=list)
    onnx_nodes: list[str] = field(default_factory=list)
    tactic: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        """A record of model.plan.json, type-checked field by field (TypeError): a received sidecar is data,
        and `inspect` must refuse a malformed one rather than fail inside the analysis."""
        def text(v: Any, what: str) -> str:
            if not isinstance(v, str):
                raise TypeError(f"{what} is {type(v).__name__}, not a string")
            return v

        def t(xs: Any, what: str) -> list[TensorInfo]:
            if not isinstance(xs, list) or not all(isinstance(x, dict) for x in xs):
                raise TypeError(f"{what} is not a list of tensor records")
            out = []
            for x in xs:
                dims = x.get("dims", [])
                if not isinstance(dims, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in dims):
                    raise TypeError(f"{what}: dims are not a list of integers")
                out.append(TensorInfo(text(x.get("name"), f"{what}: name"), text(x.get("dtype"), f"{what}: dtype"),
                                      list(dims)))
            return out

        if not isinstance(d, dict):
            raise TypeError("a layer record is not an object")
        nodes = d.get("onnx_nodes", [])
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise TypeError("onnx_nodes is not a list of strings")
        return cls(name=text(d.get("name"), "name"), layer_type=text(d.get("layer_type"), "layer_type"),
                   inputs=t(d.get("inputs", []), "inputs"), constants=t(d.get("constants", []), "constants"),
                   outputs=t(d.get("outputs", []), "outputs"), onnx_nodes=list(nodes),
                   tactic=text(d.get("tactic", ""), "tactic"))


def _bracket(s: str, key: str) -> str | None:
    """Content of the `[...]` that follows `key: ` (nesting aware), or None."""
    i = s.find(f"{key}: [")
    if i < 0:
        return None
    start = i + len(key) + 3
    depth = 1
    for j in range(start, len(s)):
        c = s[j]
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return s[start:j]
    return None


def _dims(text: str) -> list[int]:
    out = []
    for v in text.split(","):
        v = v.strip()
        try:
            out.append(int(v))
        except ValueError:
            out.append(-1)
    return out


def _tensors(text: str | None) -> list[TensorInfo]:
    if not text:
        return []
    out = []
    for m in re.finditer(r"\{(.*?)\}", text):
        body = m.group(1)
        name = re.search(r"Name: (.*?),", body)
        dims = re.search(r"Dimensions: \[(.*?)\]", body)
        dt = re.search(r"Datatype: ([A-Za-z0-9]+)", body) or re.search(r"Format/Datatype: ([^,}]*)", body)
        out.append(TensorInfo(name.group(1).strip() if name else "", normalize_dtype(dt.group(1)) if dt else "Unknown",
                              _dims(dims.group(1)) if dims else []))
    return out


def parse_oneline(line: str) -> LayerInfo | None:
    """One `Name: …, LayerType: …, Inputs: […], …, Metadata: […]` line (builder log / ONELINE inspector)."""
    if not line.startswith("Name: "):
        return None
    m = re.match(r"Name: (.*?), LayerType: ([^,]*),", line)
    if not m:
        return None
    meta_i = line.rfind("Metadata:")
    meta = line[meta_i:] if meta_i >= 0 else ""
    tactic = re.search(r"TacticName: ([^,]*),", line)
    return LayerInfo(name=m.group(1), layer_type=m.group(2).strip(), inputs=_tensors(_bracket(line, "Inputs")),
                     constants=_tensors(_bracket(line, "Constants")), outputs=_tensors(_bracket(line, "Outputs")),
                     onnx_nodes=_ONNX_LAYER.findall(meta), tactic=tactic.group(1).strip() if tactic else "")


def parse_builder_log(messages: Iterable[str]) -> list[LayerInfo]:
    """Layers from the builder's VERBOSE messages: the last `Layers:` dump wins (one per engine)."""
    layers: list[LayerInfo] = []
    for msg in messages:
        if not msg.lstrip().startswith("Layers:"):
            continue
        cur = []
        for line in msg.splitlines()[1:]:
            if not line.strip():
                break
            li = parse_oneline(line.strip())
            if li is not None:
                cur.append(li)
        if cur:
            layers = cur
    return layers


def parse_inspector_json(text: str) -> list[LayerInfo]:
    """Layers from `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)` (DETAILED)."""
    data = json.loads(text)
    out = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            out.append(LayerInfo(name=layer, layer_type="Unknown"))
            continue

        def tens(xs: Any) -> list[TensorInfo]:
            res = []
            for x in xs or []:
                dt = x.get("Format/Datatype") or x.get("Datatype") or ""
                res.append(TensorInfo(str(x.get("Name", "")), normalize_dtype(str(dt)),
                                      [int(d) for d in x.get("Dimensions", [])]))
            return res

        consts = tens(layer.get("Constants"))
        for key in ("Weights", "Kernel Weights"):
            w = layer.get(key)
            if isinstance(w, dict) and int(w.get("Count", 1) or 0) > 1:
                consts.append(TensorInfo(key, normalize_dtype(str(w.get("Type", ""))), [int(w.get("Count", 0))]))
        meta = str(layer.get("Metadata", ""))
        out.append(LayerInfo(name=str(layer.get("Name", "")), layer_type=str(layer.get("LayerType", "")),
                             inputs=tens(layer.get("Inputs")), constants=consts, outputs=tens(layer.get("Outputs")),
                             onnx_nodes=_ONNX_LAYER.findall(meta), tactic=str(layer.get("TacticName", ""))))
    return out
