"""One read-only index of an ONNX graph, shared by every tool that reads an exported graph: `check`
(the TensorRT lint), `verify` (onnxruntime against PyTorch) and `trt.inspect` (engine precision report).

Built once from the protobuf: the nodes in graph order, who produces and who reads each tensor, the
constant values (initializers and Constant nodes) as numpy arrays, shapes, and the metadata the
exporter writes on every Q/DQ/Clip node. A node is matched back to its quantizer through that
`mixq.quantizer` metadata, never by parsing its name (`passes.integer_gemms` and `split_fused_qkv`
copy nodes under new names; the metadata travels with them). Rewrites live in `passes.py`; this
module never changes the model it indexes.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MixqError
from ..utils import sha256_file

#: Ops that only move their first input's values (or pad them with zeros): per-tensor quantization commutes
#: with them, so a DQ may sit on either side (the exporter's `sink_dequantize`, check's `residual-identity`).
DATA_MOVE_OPS = ("Slice", "Pad", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")

#: Average pools: on integer codes (passes.integer_pools) their fp32 sums are exact in any order.
POOL_OPS = ("AveragePool", "GlobalAveragePool", "ReduceMean")

QUANTIZER_KEY = "mixq.quantizer"  # node metadata: the quantizer's name in the PyTorch model
BITS_KEY = "mixq.bits"  # node metadata: that quantizer's bit width
REQUANT_KEY = "mixq.requantize"  # Q metadata: it reads the mean codes of this (pool) quantizer (passes.integer_pools)
FLOAT_LAYER_KEY = "mixq.float_layer"  # Conv/Gemm/MatMul metadata: a layer `--float-layers` left float (its module)
# Conv/Gemm/MatMul metadata: a layer `quantize` could not quantize and left float with a warning (its module; the
# folder's "unquantized_layers", e.g. inside a module timm keeps opaque to torch.fx)
UNQUANTIZED_KEY = "mixq.unquantized_layer"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def load_model(path: str | os.PathLike, external_data: bool = True, *, infer_shapes: bool = False,
               input_shapes: dict[str, list[int]] | None = None) -> Any:
    """onnx.load with one-line errors for a missing or unreadable file. `input_shapes` pins graph inputs and
    `infer_shapes` annotates every tensor's shape, both before the external data is read: onnx's shape inference
    serializes the model, which protobuf cannot do at 2 GiB and more, and a graph that large keeps its weights in
    a data file (whose values shape inference never needs: a shape tensor is small, so always inline)."""
    import onnx

    path = Path(path)
    if path.is_dir():
        raise MixqError(f"{path} is a folder, not an ONNX graph (a result folder goes to export --quantized)")
    if not path.is_file():
        raise MixqError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if not model.ir_version or not model.HasField("graph"):  # protobuf parses empty bytes as an empty model
            raise ValueError("no ir_version or no graph")
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not a readable ONNX model
        kind = ("an engine plan" if Path(str(path) + ".json").is_file() or path.suffix.lower() == ".plan"
                else "a JSON file" if path.suffix.lower() == ".json" else None)
        if kind:
            raise MixqError(f"{path} is {kind}, not an ONNX graph: give the .onnx from `mixq-onnx export`") from None
        raise MixqError(f"cannot read ONNX model {path} (not ONNX?): {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from None
    if input_shapes:
        from .passes import set_input_shapes

        set_input_shapes(model, input_shapes)
    external = uses_external_data(model)
    late = external and external_data and not too_big_to_serialize(path, model)  # as before: on the whole model
    if infer_shapes and not late:
        model = inferred_shapes(model)
    if external_data and external:
        from onnx.external_data_helper import load_external_data_for_model

        try:  # onnx's own loader: it refuses a location outside the folder, a link, a short file
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # noqa: BLE001
            raise MixqError(f"cannot read the external data of {path}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
        if model.producer_name == PRODUCER:
            graph_sha256(path)  # its data files hash to the digests their names record, or a one-line error
    if infer_shapes and late:
        model = inferred_shapes(model)
    return model


#: Weight bytes above which a graph is written with its weights in a data file (`storage.write_graph`), and read
#: with onnx's checker and shape inference on its structure alone: protobuf cannot serialize a message of
#: 2 GiB or more, and the nodes and inline constants need their share.
EXTERNAL_DATA_ABOVE = 3 << 29  # 1.5 GiB


def too_big_to_serialize(path: Path, light: Any) -> bool:
    """Whether the external data that `light` (a graph at `path`, loaded without it) names passes
    `EXTERNAL_DATA_ABOVE`: then the whole model cannot go through onnx's serializing checks. Smaller graphs with
    external data are checked whole, as before (a shape tensor a user's tool put outside still counts)."""
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.external_data_helper import uses_external_data as external

    size = 0
    for loc in {ExternalDataInfo(t).location for t in tensors(light.graph) if external(t)}:
        try:
            size += (path.parent / loc).stat().st_size
        except (OSError, ValueError):
            pass  # the loader reports it
    return size > EXTERNAL_DATA_ABOVE


PRODUCER = "mixq-onnx"  # the producer_name of every graph this tool writes


def written_by_mixq(path: str | os.PathLike) -> bool:
    """True for an ONNX graph this tool wrote (its producer_name): `export` replaces those, nothing else, and
    only their data files carry a digest readers must check."""
    return load_model(path, external_data=False).producer_name == PRODUCER


def inferred_shapes(model: Any) -> Any:
    """`model` with onnx's shape inference (data propagation on) written into its value_info, or `model` as it
    is where inference fails (tensors of unknown shape then read as -1 / [])."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return model


def uses_external_data(model: Any) -> bool:
    """Whether any tensor of `model` keeps its bytes in an external-data file."""
    from onnx.external_data_helper import uses_external_data as external

    return any(external(t) for t in tensors(model.graph))


def tensors(graph: Any) -> Iterable[Any]:
    """Every TensorProto of `graph`: initializers, sparse ones, node attributes, and those of subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from tensors(a.g)
            for sub in a.graphs:
                yield from tensors(sub)


def external_data_files(path: str | os.PathLike, model: Any = None) -> list[str]:
    """The external-data locations an ONNX graph names (relative to its folder, sorted, each once); a location
    outside the folder (absolute, `..`) is refused, as onnx's own loader refuses it. `model`: the graph at `path`,
    loaded without its external data, when the caller has it (a single-file graph may be hundreds of MB)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    model = load_model(path, external_data=False) if model is None else model
    found: set[str] = set()
    for t in tensors(model.graph):
        if uses_external_data(t):
            loc = ExternalDataInfo(t).location
            p = Path(loc)
            if not loc or p.is_absolute() or ".." in p.parts:
                raise MixqError(f"{path} names external data {loc!r} outside its folder: refused")
            found.add(p.as_posix())
    return sorted(found)


def checked_external_data(path: str | os.PathLike, model: Any = None) -> list[str]:
    """`external_data_files`, each checked as onnx's loader checks it before it reads, but without reading:
    no symbolic link from the graph's folder down to it, a regular file (not a FIFO a reader would wait on), and
    every tensor's offset and length inside it. For a reader that hands the graph to another parser (TensorRT's
    reads the data itself and checks none of this): it no longer loads gigabytes into memory only to check them.
    `model` as for `external_data_files`."""
    import stat

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    model = load_model(path, external_data=False) if model is None else model
    locations = external_data_files(path, model)
    if not locations:
        return locations
    folder = path.parent
    sizes: dict[str, int] = {}
    for loc in locations:
        cur = folder
        for part in Path(loc).parts:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except OSError as e:
                raise MixqError(f"the external data of {path} is refused: {loc}: {e.strerror or e}") from None
            if stat.S_ISLNK(st.st_mode):
                raise MixqError(f"the external data of {path} is refused: {cur.relative_to(folder)} is a symbolic "
                                "link (a received graph would read a file outside its folder)")
        if not stat.S_ISREG(st.st_mode):
            raise MixqError(f"the external data of {path} is refused: {loc} is not a regular file")
        sizes[loc] = st.st_size
    for t in tensors(model.graph):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        size, start = sizes[Path(info.location).as_posix()], int(info.offset or 0)
        if start > size or (info.length is not None and start + int(info.length) > size):
            raise MixqError(f"the external data of {path} is refused: tensor {t.name!r} lies beyond the end of "
                            f"{info.location} ({size} bytes; truncated?)")
    return locations


def data_file_name(graph_name: str, digest: str) -> str:
    """The name `export` gives a graph's external-data file: the graph's file name, the first 16 hex digits of the
    data's sha256, `.data` (`m.onnx.3f2a9c1d5e7b8a90.data`). A new export never overwrites the file an older graph
    names, so a crash between the two renames leaves a whole old pair or a whole new one; readers check the digest."""
    return f"{graph_name}.{digest[:16]}.data"


def recorded_digest(location: str) -> str | None:
    """The sha256 prefix a data file's name records when `export` named it (`data_file_name`; the graph file
    may have been renamed since), else None."""
    m = re.fullmatch(r".+\.([0-9a-f]{16})\.data", Path(location).name)
    return m.group(1) if m else None


def graph_sha256(path: str | os.PathLike) -> str:
    """The sha256 that identifies an ONNX graph *with* its weights: the file's own sha256 when it keeps its
    weights inside (the common case, so this equals `sha256_file`), else the sha256 of the file's sha256 and of
    each external-data file's name and sha256. A plan records it, so new weights beside an old graph file are
    seen as another graph. A data file `export` named (`data_file_name`) must hash to the digest in its name."""
    path = Path(path)
    own = sha256_file(path)
    files = external_data_files(path)
    if not files:
        return own
    h = hashlib.sha256(own.encode())
    ours = written_by_mixq(path)
    for loc in files:
        try:
            digest = sha256_file(path.parent / loc)
        except OSError as e:
            raise MixqError(f"cannot read the external data {loc!r} of {path}: {e.strerror or e}") from None
        want = recorded_digest(loc) if ours else None
        if want is not None and not digest.startswith(want):
            raise MixqError(f"the external data {loc} of {path} is not the file export wrote: its sha256 "
                            f"{digest[:16]}… is not the {want} its name records (changed or truncated since)")
        h.update(f"\n{loc}\0{digest}".encode())
    return h.hexdigest()


def _constant_array(node: Any) -> np.ndarray | None:
    """The value of a Constant node (tensor, or the scalar/list forms), else None."""
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
    return None


def _value_tensor(node: Any) -> Any | None:
    """The TensorProto of a Constant node's `value` attribute, else None."""
    return next((a.t for a in node.attribute if a.name == "value"), None)


class GraphIndex:
    """Lookup tables over one ModelProto; nothing here mutates it.

    `nodes` (graph order), `by_name`, `producer[tensor]`, `users(tensor)`, `initializers`,
    `constant_nodes`, `value(tensor)` (numpy, cached, read-only), `shapes`, `meta(node)`,
    `quantizer_of(node)`, `bits_of(node)`."""

    def __init__(self, model: Any, infer_shapes: bool = False, path: str | os.PathLike | None = None):
        if infer_shapes:  # on a copy: onnx returns a new model
            model = inferred_shapes(model)
        self.model = model
        self.path = Path(path) if path is not None else None  # the file it was read from (`load`), else None
        self._structure: Any = None
        g = model.graph
        self.nodes: list[Any] = list(g.node)
        self.by_name: dict[str, Any] = {n.name: n for n in self.nodes}
        self.producer: dict[str, Any] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers: dict[str, Any] = {t.name: t for t in g.initializer}
        self.constant_nodes: dict[str, Any] = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.inputs: list[str] = [i.name for i in g.input]
        self.outputs: list[str] = [o.name for o in g.output]
        self._values: dict[str, np.ndarray | None] = {}
        self._shapes: dict[str, list[int]] | None = None
        self._folded: set[str] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, external_data: bool = True, infer_shapes: bool = False,
             input_shapes: dict[str, list[int]] | None = None) -> GraphIndex:
        """The index of the graph at `path`; shapes are inferred before its external data is read (`load_model`)."""
        model = load_model(path, external_data, infer_shapes=infer_shapes, input_shapes=input_shapes)
        return cls(model, path=path)

    def structure(self) -> Any:
        """The ModelProto for onnx's checker and shape inference, which serialize what they are given (protobuf
        cannot at 2 GiB): read again from `path` without its external data when that passes
        `EXTERNAL_DATA_ABOVE`, else the model itself."""
        if self.path is None:
            return self.model
        if self._structure is None:
            light = load_model(self.path, external_data=False)
            self._structure = light if too_big_to_serialize(self.path, light) else self.model
        return self._structure

    # ---------------------------------------------------------------- structure
    def users(self, tensor: str) -> list[Any]:
        """Nodes reading `tensor`, in graph order (a node reading it twice appears twice)."""
        return self.consumers.get(tensor, [])

    def produced_by(self, tensor: str, *ops: str) -> Any | None:
        """The producer of `tensor` if it is one of `ops`, else None."""
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type in ops else None

    def opset(self, domain: str = "") -> int:
        return {o.domain: o.version for o in self.model.opset_import}.get(domain, 0)

    def model_meta(self, key: str, default: str | None = None) -> str | None:
        """A model-level metadata_props value (e.g. `mixq.layout`)."""
        return next((p.value for p in self.model.metadata_props if p.key == key), default)

    @staticmethod
    def attr(node: Any, key: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == key:
                return helper.get_attribute_value(a)
        return default

    @staticmethod
    def label(node: Any) -> str:
        """The node's name, or `Op(first output)` for an unnamed node."""
        return node.name or f"{node.op_type}({node.output[0]})"

    # ---------------------------------------------------------------- constants
    def is_constant(self, tensor: str) -> bool:
        """An initializer or a Constant node's output."""
        return tensor in self.initializers or tensor in self.constant_nodes

    def value(self, tensor: str) -> np.ndarray | None:
        """A constant tensor's value (read-only numpy array), None for computed tensors."""
        if tensor in self._values:
            return self._values[tensor]
        from onnx import TensorProto, numpy_helper

        a = None
        if tensor in self.initializers:
            t = self.initializers[tensor]
            if t.data_location == TensorProto.EXTERNAL and self.path is not None:  # loaded without its data
                t = self._read_external(t)
            a = numpy_helper.to_array(t)
        elif tensor in self.constant_nodes:
            a = _constant_array(self.constant_nodes[tensor])
        if a is not None:
            a = np.asarray(a)
            a.flags.writeable = False
        self._values[tensor] = a
        return a

    def _read_external(self, t: Any) -> Any:
        """A copy of initializer `t` with its bytes read from the data file beside `path` (onnx's checked
        reader: inside the folder, no link, within the file): an index loaded without its external data reads
        only the constants it is asked for, the scales, not the gigabytes of weights."""
        from onnx import TensorProto
        from onnx.external_data_helper import load_external_data_for_tensor

        copy = TensorProto()
        copy.CopyFrom(t)
        try:
            load_external_data_for_tensor(copy, str(self.path.parent))
        except Exception as e:  # noqa: BLE001 - onnx refuses locations outside the folder, links, short files
            raise MixqError(f"cannot read the external data of {self.path} ({t.name}): {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
        return copy

    def _tensor_proto(self, tensor: str) -> Any | None:
        if tensor in self.initializers:
            return self.initializers[tensor]
        n = self.constant_nodes.get(tensor)
        return _value_tensor(n) if n is not None else None

    def const_dtype(self, tensor: str) -> int | None:
        """onnx.TensorProto element type of a constant tensor (INT4, INT32, …), None if not constant."""
        t = self._tensor_proto(tensor)
        return t.data_type if t is not None else None

    def const_dims(self, tensor: str) -> list[int] | None:
        t = self._tensor_proto(tensor)
        return list(t.dims) if t is not None else None

    def folded_constants(self) -> set[str]:
        """Constants, and tensors computed from constants alone (a gathered relative-position-bias table,
        a shifted-window mask): TensorRT folds them at build time (graph nodes are topologically sorted)."""
        if self._folded is None:
            const = set(self.initializers) | set(self.constant_nodes)
            for n in self.nodes:
                ins = [i for i in n.input if i]
                if ins and n.domain in ("", "ai.onnx") and all(i in const for i in ins):
                    const.update(o for o in n.output if o)
            self._folded = const
        return self._folded

    # ---------------------------------------------------------------- shapes
    @property
    def shapes(self) -> dict[str, list[int]]:
        """Known tensor shapes (value_info, graph inputs/outputs, constants); unknown dims are -1."""
        if self._shapes is None:
            g = self.model.graph
            shapes: dict[str, list[int]] = {}
            for vi in list(g.value_info) + list(g.input) + list(g.output):
                dims = vi.type.tensor_type.shape.dim
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
            for name, t in self.initializers.items():
                shapes[name] = list(t.dims)
            for name, n in self.constant_nodes.items():
                t = _value_tensor(n)
                if t is not None:
                    shapes[name] = list(t.dims)
            self._shapes = shapes
        return self._shapes

    # ---------------------------------------------------------------- mixq metadata
    @staticmethod
    def meta(node: Any) -> dict[str, str]:
        return {p.key: p.value for p in node.metadata_props}

    @staticmethod
    def quantizer_of(node: Any | None) -> str | None:
        """The PyTorch quantizer a Q/DQ/Clip node implements (`mixq.quantizer`), else None."""
        if node is None:
            return None
        return next((p.value for p in node.metadata_props if p.key == QUANTIZER_KEY), None)

    @staticmethod
    def bits_of(node: Any | None) -> int | None:
        """That quantizer's bit width (`mixq.bits`), else None."""
        if node is None:
            return None
        v = next((p.value for p in node.metadata_props if p.key == BITS_KEY), None)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    @staticmethod
    def float_layer_of(node: Any | None) -> str | None:
        """The module a Conv/Gemm/MatMul implements when the folder left it float (`--float-layers` on purpose, or
        a layer `quantize` could not quantize and said so), else None."""
        if node is None:
            return None
        return next((p.value for p in node.metadata_props if p.key in (FLOAT_LAYER_KEY, UNQUANTIZED_KEY)), None)

    @staticmethod
    def unquantized_layer_of(node: Any | None) -> str | None:
        """The module of a Conv/Gemm/MatMul `quantize` could not quantize (reported then), else None."""
        if node is None:
            return None
        return next((p.value for p in node.metadata_props if p.key == UNQUANTIZED_KEY), None)

    def quantizer_nodes(self, ops: Iterable[str] = QDQ_OPS) -> dict[str, list[Any]]:
        """Quantizer name -> its nodes among `ops`, in graph order (a split weight has several DQs)."""
        ops = tuple(ops)
        out: dict[str, list[Any]] = {}
        for n in self.nodes:
            q = self.quantizer_of(n) if n.op_type in ops else None
            if q is not None:
                out.setdefault(q, []).append(n)
        return out

    def quantizer_input(self, q: Any) -> str:
        """The float tensor a QuantizeLinear's quantizer sees: the input of the quantizer's own range Clip
        (grids narrower than INT8) when there is one, else the QuantizeLinear's input."""
        src = q.input[0]
        clip = self.produced_by(src, "Clip")
        name = self.quantizer_of(q)
        if clip is not None and name is not None and self.quantizer_of(clip) == name:
            return clip.input[0]
        return src
