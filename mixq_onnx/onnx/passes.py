"""Graph rewrites on the exported onnx-ir model that keep its exact semantics but give TensorRT the
form its INT8 fusions need.

`split_fused_qkv`: a fused projection whose output is only ever split along a reshaped output axis
(a ViT's `qkv = Linear(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4); q, k, v = qkv.unbind(0)`)
becomes one GEMM per part, each on a column slice of the INT8 weight. TensorRT(-RTX) otherwise
pushes the split into the weight: it dequantizes that weight to float in a separate kernel and runs
the projection as a float GEMM.

`integer_gemms`: every quantized Conv/Gemm/MatMul dequantizes its input codes and integer weights with
scale 1 and rescales its output once per channel by s_x * s_w (then adds the bias), which is the
arithmetic of an INT8 kernel and of the PyTorch layer in integer mode. onnxruntime's fp32 accumulation
of integer products is then exact, so its output is bit-identical to PyTorch's; TensorRT folds the
Mul and Add into the same INT8 kernel's epilogue as it would fold the DQ scales.

`integer_pools`: an average pool of quantized codes (`quant.modules.QuantPool`) dequantizes them with scale 1
and multiplies the mean by s_x once: sums of integers are exact in fp32, so onnxruntime equals PyTorch bit
for bit, where summing scaled values rounds differently in each runtime's order.

`global_average_pools`: an AveragePool whose window is its whole (static) spatial input, without padding, is a
global mean; it becomes ReduceMean over the spatial axes, the form `AdaptiveAvgPool2d` exports to. TensorRT(-RTX)
fuses that reduction into the kernel before it, where it runs an AveragePool as a layer of its own (ResNet-8's
`avg_pool2d(x, 8)`: one engine layer and one float hand-off fewer).

`add_initializer` and `replace_uses` are the onnx-ir building blocks the exporter shares.

Rewrites of a loaded ModelProto (copies for other tools, never the exported graph itself):
`convert_to_fp16` (the float baseline engine of `bench`), `set_input_shapes` (static shapes for shape
inference in `inspect`), `expose_outputs` (intermediate tensors as outputs for `verify`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .graph import DATA_MOVE_OPS, FLOAT_LAYER_KEY, POOL_OPS, PRODUCER, REQUANT_KEY, UNQUANTIZED_KEY

_LABELS3 = ("q", "k", "v")


def _const_array(v) -> np.ndarray | None:
    if v is None:
        return None
    import onnx_ir as ir

    t = ir.convenience.get_const_tensor(v)
    return None if t is None else np.asarray(t.numpy())


def _ints(v) -> list[int] | None:
    a = _const_array(v)
    if a is None or a.dtype.kind not in "iu":
        return None
    return [int(x) for x in a.reshape(-1)]


def _attr_int(node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def _single_user(value):
    """The one node reading `value` (and that it is no graph output), else None."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0][0]


def _squeezed_axis0(node) -> bool:
    if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _ints(node.inputs[1])
    else:
        a = node.attributes.get("axes")
        axes = list(a.as_ints()) if a is not None else None
    return axes == [0]


def _picks(transpose, parts: int) -> list[tuple[int, Any, list]] | None:
    """Every reader of the transposed tensor selects one part along axis 0: Slice(i:i+1, axis 0) ->
    Squeeze(0), or Gather(axis 0, scalar i). Returns (part, value that holds it, nodes to drop)."""
    out = transpose.outputs[0]
    if out.is_graph_output():
        return None
    picks = []
    for user, idx in list(out.uses()):
        if idx != 0 or user.domain not in ("", "ai.onnx"):
            return None
        if user.op_type == "Gather":
            ind = _const_array(user.inputs[1])
            if _attr_int(user, "axis", 0) != 0 or ind is None or ind.ndim != 0 or ind.dtype.kind not in "iu":
                return None
            i = int(ind)
            i = i + parts if i < 0 else i
            if not 0 <= i < parts:
                return None
            if user.outputs[0].is_graph_output():
                return None
            picks.append((i, user.outputs[0], [user]))
        elif user.op_type == "Slice":
            starts, ends = _ints(user.inputs[1]), _ints(user.inputs[2])
            axes = _ints(user.inputs[3]) if len(user.inputs) > 3 and user.inputs[3] is not None else [0]
            steps = _ints(user.inputs[4]) if len(user.inputs) > 4 and user.inputs[4] is not None else [1]
            if starts is None or ends is None or axes not in ([0], [-len(transpose.attributes["perm"].as_ints())]) \
                    or steps != [1] or len(starts) != 1 or len(ends) != 1:
                return None
            s, e = starts[0], ends[0]
            s = max(0, min(parts, s + parts if s < 0 else s))
            e = max(0, min(parts, e + parts if e < 0 else e))
            sq = _single_user(user.outputs[0])
            if e - s != 1 or sq is None or not _squeezed_axis0(sq) or sq.outputs[0].is_graph_output():
                return None
            picks.append((s, sq.outputs[0], [sq, user]))
        else:
            return None
    return picks or None


def _value_names(graph) -> set[str]:
    return {v.name for n in graph for v in n.outputs if v.name} | {v.name for v in graph.inputs if v.name}


def _unique(graph, name: str, taken: set[str]) -> str:
    base, k = name, 1
    while name in taken or name in graph.initializers:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def split_fused_qkv(model) -> int:
    """MatMul(x, DQ(W[K, N])) [+ Add(b[N])] -> Reshape(..., S, ...) -> Transpose(S axis first) -> per-part
    Slice+Squeeze / Gather  ==>  per part p: MatMul(x, DQ(W[:, p*N/S:(p+1)*N/S])) [+ Add(b slice)] ->
    Reshape -> Transpose, feeding the part's readers directly. Returns the number of GEMMs split."""
    import onnx_ir as ir

    graph = model.graph
    taken = _value_names(graph)

    def const(name: str, array: np.ndarray, dtype=None):
        return add_initializer(graph, _unique(graph, name, taken), array, dtype)

    n_split = 0
    for mm in list(graph):
        if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx") or mm.graph is not graph:
            continue
        x, wv = mm.inputs
        dq = wv.producer() if wv is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or _single_user(wv) is not mm:
            continue
        w_int = dq.inputs[0].const_value if dq.inputs[0] is not None else None
        scale = _const_array(dq.inputs[1])
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        zp = _const_array(zp_v) if zp_v is not None else None
        if w_int is None or len(w_int.shape) != 2 or scale is None or (zp_v is not None and zp is None):
            continue
        if "block_size" in dq.attributes and _attr_int(dq, "block_size", 0):
            continue
        n_cols = int(w_int.shape[1])
        per_channel = scale.size != 1
        if per_channel and (scale.ndim != 1 or scale.size != n_cols or _attr_int(dq, "axis", 1) not in (1, -1)):
            continue
        if zp is not None and zp.size != scale.size:
            continue
        known_shape = x.shape if x is not None and x.shape is not None else mm.outputs[0].shape
        rank = len(known_shape) if known_shape is not None else None
        if rank is None or rank < 2:
            continue
        # optional bias add
        cur = mm.outputs[0]
        add = _single_user(cur)
        bias = bias_v = None
        if add is not None and add.op_type == "Add":
            other = add.inputs[1] if add.inputs[0] is cur else add.inputs[0]
            b, bias_v = _const_array(other), other
            if b is not None and b.shape in ((n_cols,), (1,) * (b.ndim - 1) + (n_cols,)) and b.ndim <= rank:
                bias = b.reshape(n_cols)
                cur = add.outputs[0]
            else:
                add = None
        elif add is not None:
            add = None
        reshape = _single_user(cur)
        if reshape is None or reshape.op_type != "Reshape":
            continue
        shape = _ints(reshape.inputs[1])
        if shape is None or len(shape) < rank + 1:
            continue
        parts, rest = shape[rank - 1], list(shape[rank:])
        if parts < 2 or n_cols % parts or rest.count(-1) > 1 or any(d == 0 or d < -1 for d in rest):
            continue
        if -1 in rest:  # the inferred dim is in the split part: only if the prefix provably keeps the rows
            lead = list(known_shape)[: rank - 1]
            if not all(p == 0 or (isinstance(d, int) and d == p) for p, d in zip(shape[: rank - 1], lead)):
                continue
            known = -int(np.prod(rest))
            if (n_cols // parts) % known:
                continue
            rest[rest.index(-1)] = n_cols // parts // known
        if parts * int(np.prod(rest)) != n_cols:
            continue
        transpose = _single_user(reshape.outputs[0])
        if transpose is None or transpose.op_type != "Transpose" or "perm" not in transpose.attributes:
            continue
        perm = list(transpose.attributes["perm"].as_ints())
        if len(perm) != len(shape) or perm[0] != rank - 1:
            continue
        picks = _picks(transpose, parts)
        if picks is None:
            continue
        sub_perm = [p - (p > rank - 1) for p in perm[1:]]
        sub_shape = np.array(shape[: rank - 1] + rest, dtype=np.int64)
        width = n_cols // parts
        ints = w_int.numpy()
        labels = _LABELS3 if parts == 3 else tuple(str(i) for i in range(parts))
        allowzero = _attr_int(reshape, "allowzero", 0)
        base = mm.name or "MatMul"
        new_out: dict[int, Any] = {}
        for i in sorted({p for p, _, _ in picks}):
            lab = labels[i]
            cols = slice(i * width, (i + 1) * width)
            dq_in = [const(f"{dq.inputs[0].name}.{lab}", np.ascontiguousarray(ints[:, cols]), w_int.dtype),
                     const(f"{dq.inputs[1].name}.{lab}", np.ascontiguousarray(scale[cols])) if per_channel
                     else dq.inputs[1]]
            if zp_v is not None:
                dq_in.append(const(f"{zp_v.name}.{lab}", np.ascontiguousarray(zp[cols])) if per_channel else zp_v)
            new_dq = ir.node("DequantizeLinear", dq_in, attributes={k: v for k, v in dq.attributes.items()},
                             name=f"{dq.name}_{lab}", metadata_props=dict(dq.metadata_props))
            new_dq.outputs[0].name = _unique(graph, f"{wv.name}.{lab}", taken)
            new_dq.outputs[0].type = wv.type
            new_dq.outputs[0].shape = ir.Shape([int(w_int.shape[0]), width])
            nodes = [new_dq]
            new_mm = ir.node("MatMul", [x, new_dq.outputs[0]], name=f"{base}_{lab}",
                             metadata_props=dict(mm.metadata_props))
            nodes.append(new_mm)
            y = new_mm.outputs[0]
            if bias is not None:
                b_v = const(f"{bias_v.name}.{lab}", np.ascontiguousarray(bias[cols]))
                new_add = ir.node("Add", [y, b_v], name=f"{add.name or 'Add'}_{lab}",
                                  metadata_props=dict(add.metadata_props))
                nodes.append(new_add)
                y = new_add.outputs[0]
            new_rs = ir.node("Reshape", [y, const(f"{reshape.inputs[1].name}.{lab}", sub_shape)],
                             attributes={"allowzero": allowzero}, name=f"{reshape.name or 'Reshape'}_{lab}",
                             metadata_props=dict(reshape.metadata_props))
            nodes.append(new_rs)
            y = new_rs.outputs[0]
            if sub_perm != list(range(len(sub_perm))):
                new_tr = ir.node("Transpose", [y], attributes={"perm": ir.AttrInt64s("perm", sub_perm)},
                                 name=f"{transpose.name or 'Transpose'}_{lab}",
                                 metadata_props=dict(transpose.metadata_props))
                nodes.append(new_tr)
                y = new_tr.outputs[0]
            for nd, orig in zip(nodes[1:], [mm] + ([add] if bias is not None else []) + [reshape, transpose]):
                nd.outputs[0].name = _unique(graph, f"{orig.outputs[0].name}.{lab}", taken)
                nd.outputs[0].type = mm.outputs[0].type
            graph.insert_before(mm, nodes)
            new_out[i] = y
        for i, old, dead in picks:
            y = new_out[i]
            if y.shape is None:
                y.shape = old.shape
            old.replace_all_uses_with(y)
            for nd in dead:
                graph.remove(nd, safe=True)
        stale = (dq.inputs[0], dq.inputs[1], zp_v, bias_v)
        for nd in (transpose, reshape, add, mm, dq):
            if nd is not None:
                graph.remove(nd, safe=True)
        for v in stale:
            if v is not None and v.is_initializer() and not v.uses() and not v.is_graph_output():
                del graph.initializers[v.name]
        n_split += 1
    return n_split


def add_initializer(graph, name: str, array: np.ndarray, dtype=None):
    """Register `array` as an initializer called `name` and return its value."""
    import onnx_ir as ir

    t = ir.tensor(array, name=name, dtype=dtype)
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
    graph.register_initializer(v)
    return v


def replace_uses(old, new) -> None:
    """Every reader of `old` (graph outputs included) reads `new` instead."""
    for user, idx in list(old.uses()):
        user.replace_input_with(idx, new)
    graph = old.graph
    if graph is not None:
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new


def _is_act_dq(node) -> bool:
    """DequantizeLinear of a mixq activation quantizer: Q -> DQ with a constant per-tensor scale."""
    if node is None or node.op_type != "DequantizeLinear" or "mixq.quantizer" not in node.metadata_props:
        return False
    q = node.inputs[0].producer()
    sc = _const_array(node.inputs[1])
    return q is not None and q.op_type == "QuantizeLinear" and sc is not None and sc.size == 1


def _moves_codes(node) -> bool:
    """A node that only moves its first input's values (or pads it with zeros): on integer codes it means the
    same as on their dequantized values."""
    if node.op_type not in DATA_MOVE_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Pad":
        mode = node.attributes.get("mode")
        if mode is not None and mode.as_string() != "constant":
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            cv = _const_array(node.inputs[2])
            if cv is None or cv.size != 1 or float(cv.reshape(-1)[0]) != 0.0:
                return False
    return True


def sink_dequantize(model, quantizers: set[str] | frozenset[str]) -> int:
    """Q -> DQ -> data movement (slices, zero padding, reshapes, transposes) -> X  ==>  Q -> the same data
    movement on the integer codes -> DQ -> X (a Pad pads the codes with the zero point). A shared quantizer's
    Q/DQ sits on the tensor itself, ahead of a subsampling shortcut's Slice and Pad (`quant.graph.share_quantizers`);
    behind them, the engine slices INT8 codes, and onnxruntime's QDQ propagation has no DQ -> Slice to move
    (1.22 builds a QuantizeLinear with clashing types from one and refuses the graph). The values are the
    same: the data movement commutes with dequantization. Only the DQs of `quantizers` (by `mixq.quantizer`)
    move: the shared ones, so graphs without sharing stay as they were. Returns the number of chains moved."""
    import onnx_ir as ir

    graph = model.graph
    taken = _value_names(graph)
    n = 0
    for dq in list(graph):
        if not _is_act_dq(dq) or dq.graph is not graph or dq.metadata_props.get("mixq.quantizer") not in quantizers:
            continue
        q = dq.inputs[0].producer()
        for user, idx in list(dq.outputs[0].uses()):
            if idx != 0 or not _moves_codes(user) or user.graph is not graph:
                continue
            chain = [user]
            while True:
                nxt = _single_user(chain[-1].outputs[0])
                if nxt is None or not _moves_codes(nxt) or nxt.inputs[0] is not chain[-1].outputs[0]:
                    break
                chain.append(nxt)
            if any(c.outputs[0].is_graph_output() for c in chain[:-1]):
                continue
            src = q.outputs[0]
            zp = _const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            codes = ir.TensorType(ir.DataType.from_numpy(zp.dtype) if zp is not None else ir.DataType.UINT8)
            new_nodes = []
            for c in chain:
                ins = [src, *c.inputs[1:]]
                if c.op_type == "Pad":  # the codes pad with 0, the code of 0.0 when the zero point is 0
                    if zp is None or np.any(zp != 0):
                        break  # (TensorRT takes no integer pad value: leave an asymmetric grid's chain alone)
                    ins = [*ins[:2], None, *ins[3:]] if len(ins) > 3 else ins[:2]
                moved = ir.node(c.op_type, ins, attributes=dict(c.attributes.items()), name=f"{c.name}_codes",
                                metadata_props=dict(c.metadata_props))
                moved.outputs[0].name = _unique(graph, f"{c.outputs[0].name}.codes", taken)
                moved.outputs[0].type, moved.outputs[0].shape = codes, c.outputs[0].shape
                new_nodes.append(moved)
                src = moved.outputs[0]
            else:
                end = chain[-1].outputs[0]
                new_dq = ir.node("DequantizeLinear", [src, *dq.inputs[1:]], attributes=dict(dq.attributes.items()),
                                 name=f"{dq.name}_after_{chain[-1].op_type}", metadata_props=dict(dq.metadata_props))
                new_dq.outputs[0].name = _unique(graph, f"{end.name}.dq", taken)
                new_dq.outputs[0].type, new_dq.outputs[0].shape = end.type, end.shape
                graph.insert_after(chain[-1], [*new_nodes, new_dq])
                replace_uses(end, new_dq.outputs[0])
                for c in reversed(chain):
                    graph.remove(c, safe=True)
                n += 1
    return n


def _weight_channels(node, wdq) -> tuple[int, list[int]] | None:
    """(channel count, shape of the per-channel factor on the layer output) if wdq is a per-channel INT8
    weight DQ along the layer's output-channel axis, else None."""
    if wdq is None or wdq.op_type != "DequantizeLinear" or "mixq.quantizer" not in wdq.metadata_props:
        return None
    if _attr_int(wdq, "block_size", 0) or _single_user(wdq.outputs[0]) is not node:
        return None
    w, sc = _const_array(wdq.inputs[0]), _const_array(wdq.inputs[1])
    if w is None or sc is None or w.dtype.kind not in "iu" or w.dtype.itemsize != 1 or sc.ndim > 1:
        return None
    axis = _attr_int(wdq, "axis", 1)
    axis = axis + w.ndim if axis < 0 else axis
    if node.op_type == "Conv":
        want, shape = 0, [1, -1] + [1] * (w.ndim - 2)
    elif node.op_type == "Gemm":
        if _attr_int(node, "transA", 0) or any(
                a in node.attributes and node.attributes[a].as_float() != 1.0 for a in ("alpha", "beta")):
            return None
        want, shape = (0 if _attr_int(node, "transB", 0) else 1), [-1]
    else:  # MatMul with a 2-D weight [K, N]
        if w.ndim != 2:
            return None
        want, shape = 1, [-1]
    c = int(w.shape[want])
    if sc.size not in (1, c) or (sc.size == c and axis != want):
        return None
    return c, shape


def _codes_of(graph, dq, one, in_place: bool):
    """The integer codes a mixq activation DQ dequantizes: the DQ itself with scale 1 when `in_place` (every
    reader is being rewritten to read codes), else a new DQ(codes, 1) beside it. Returns the codes value."""
    import onnx_ir as ir

    if in_place and not dq.outputs[0].is_graph_output():
        dq.replace_input_with(1, one)
        return dq.outputs[0]
    new = ir.node("DequantizeLinear", [dq.inputs[0], one, *dq.inputs[2:]], name=f"{dq.name}_int",
                  metadata_props=dict(dq.metadata_props))
    graph.insert_after(dq, new)
    new.outputs[0].name = f"{dq.outputs[0].name}.int"
    new.outputs[0].type, new.outputs[0].shape = dq.outputs[0].type, dq.outputs[0].shape
    return new.outputs[0]


def integer_gemms(model) -> int:
    """Conv/Gemm/MatMul(DQ(q_x, s_x), DQ(W, s_w)) [+ b]  ==>  Conv/Gemm/MatMul(DQ(q_x, 1), DQ(W, 1))
    -> Mul(fp32(s_x * s_w)) [-> Add(b)]. Returns the number of layers rewritten."""
    import onnx_ir as ir

    graph = model.graph
    todo = []
    for node in graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            continue
        adq, wdq = node.inputs[0].producer(), node.inputs[1].producer()
        ch = _weight_channels(node, wdq)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if not _is_act_dq(adq) or ch is None or (bias is not None and _const_array(bias) is None):
            continue
        todo.append((node, adq, wdq, ch, bias))
    if not todo:
        return 0
    taken = _value_names(graph)

    def const(name: str, array: np.ndarray):
        return add_initializer(graph, _unique(graph, name, taken), array)

    one = const("mixq.unit_scale", np.array(1.0, np.float32))

    rewritten = {id(t[0]) for t in todo}
    int_dq: dict[int, Any] = {}
    act_scale = {id(t[1]): _const_array(t[1].inputs[1]).astype(np.float32).reshape(()) for t in todo}
    for node, adq, wdq, (c, shape), bias in todo:
        # the input codes: DQ with scale 1 (in place when every reader of the DQ is rewritten)
        if id(adq) not in int_dq:
            int_dq[id(adq)] = _codes_of(graph, adq, one, all(id(u) in rewritten and i == 0
                                                               for u, i in adq.outputs[0].uses()))
        if node.inputs[0] is not int_dq[id(adq)]:
            node.replace_input_with(0, int_dq[id(adq)])
        sx = act_scale[id(adq)]
        sw = _const_array(wdq.inputs[1]).astype(np.float32).reshape(-1)
        factor = (sx * np.broadcast_to(sw, (c,))).astype(np.float32)  # fp32 product, as the PyTorch layer
        wname = wdq.inputs[1].name
        wdq.replace_input_with(1, const(f"{wname}.unit", np.ones(sw.shape, np.float32)))
        base, _, op = (node.name or "gemm/Gemm").rpartition("/")
        tail = f"_{op.split('_', 1)[1]}" if "_" in op else ""  # split q/k/v GEMMs: MatMul_q -> _q
        base = base or op
        meta = {"mixq.rescale": f"{adq.metadata_props['mixq.quantizer']}.scale * "
                                f"{wdq.metadata_props['mixq.quantizer']}.scale"}
        out = node.outputs[0]
        mul = ir.node("Mul", [out, const(f"{base}{tail}.rescale", factor.reshape(shape))], name=f"{base}/Rescale{tail}",
                      metadata_props=meta)
        last = mul
        if bias is not None:
            b = _const_array(bias).astype(np.float32).reshape(shape)
            node.resize_inputs(2)
            last = ir.node("Add", [mul.outputs[0], const(f"{base}{tail}.bias", b)], name=f"{base}/Bias{tail}")
        graph.insert_after(node, [mul] + ([last] if last is not mul else []))
        for v in (mul.outputs[0], last.outputs[0]):
            v.type, v.shape = out.type, out.shape
        orig = out.name  # the layer's output keeps its name (graph outputs, readers); the sum is renamed
        out.name = f"{base}{tail}.acc"
        if last is not mul:
            mul.outputs[0].name = f"{base}{tail}.rescaled"
        last.outputs[0].name = orig
        replace_uses(out, last.outputs[0])
        mul.replace_input_with(0, out)  # the rescale itself still reads the sum
    return len(todo)


def _consumer_q(pool, name: str) -> tuple[list, Any, Any] | None:
    """From a pool's output: (data moves, Clip or None, QuantizeLinear of quantizer `name`) when that Q alone
    reads the pool through a chain of single-reader data moves (and its range Clip), else None."""
    chain: list = []
    cur = pool
    for _ in range(16):
        if cur.outputs[0].is_graph_output():
            return None
        nxt = _single_user(cur.outputs[0])
        if nxt is None or nxt.inputs[0] is not cur.outputs[0]:
            return None
        if _moves_codes(nxt) and nxt.op_type != "Pad":  # codes padded with 0 mean the zero point's value
            chain.append(nxt)
            cur = nxt
            continue
        clip = nxt if nxt.op_type == "Clip" else None
        q = _single_user(clip.outputs[0]) if clip is not None else nxt
        if q is None or q.op_type != "QuantizeLinear" or q.metadata_props.get("mixq.quantizer") != name \
                or (clip is not None and clip.outputs[0].is_graph_output()) or q.outputs[0].is_graph_output():
            return None
        return chain, clip, q
    return None


def integer_pools(model, pools: dict[str, str]) -> int:
    """pool(DQ(q_x, s_x)) -> data moves -> [Clip] -> Q(s_y)  ==>  pool(DQ(q_x, 1)) -> [Clip] -> Q(s_y / s_x) ->
    data moves (on INT8 codes), for each pool whose DQ belongs to a key of `pools` (the input quantizer of a
    `QuantPool`) and whose Q to its value (the consumer's input quantizer). That is `QuantPool`'s integer form:
    the mean of integer codes (exact fp32 sums) requantized straight onto the consumer's grid; with the Q
    right after the pool, TensorRT runs one INT8 pooling layer. Returns the number of pools rewritten."""
    import onnx_ir as ir

    graph = model.graph
    todo = []
    for node in graph:
        if node.op_type not in POOL_OPS or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        dq = node.inputs[0].producer() if node.inputs[0] is not None else None
        if not _is_act_dq(dq) or dq.metadata_props["mixq.quantizer"] not in pools:
            continue
        found = _consumer_q(node, pools[dq.metadata_props["mixq.quantizer"]])
        if found is not None and _const_array(found[2].inputs[1]) is not None:
            todo.append((node, dq, *found))
    if not todo:
        return 0
    taken = _value_names(graph)
    one = add_initializer(graph, _unique(graph, "mixq.pool_unit_scale", taken), np.array(1.0, np.float32))
    for node, dq, chain, clip, q in todo:
        s_in = np.float32(_const_array(dq.inputs[1]).reshape(()))
        s_out = np.float32(_const_array(q.inputs[1]).reshape(()))
        factor = np.float32(s_out / s_in)  # fp32 division, as QuantPool.requant_factor
        # the codes: DQ with scale 1 (in place when the pool alone reads it)
        codes = _codes_of(graph, dq, one, _single_user(dq.outputs[0]) is node)
        if node.inputs[0] is not codes:
            node.replace_input_with(0, codes)
        name = q.metadata_props["mixq.quantizer"]
        q.replace_input_with(1, add_initializer(graph, _unique(graph, f"{name}.requant_scale", taken), factor))
        q.metadata_props[REQUANT_KEY] = dq.metadata_props["mixq.quantizer"]
        if clip is not None:  # the grid's range on the pool's code scale: (lo - zp) * s_y -> (lo - zp) * factor
            for i in (1, 2):
                bound = float(_const_array(clip.inputs[i]).reshape(()))
                code = round(bound / float(s_out))
                clip.replace_input_with(i, add_initializer(
                    graph, _unique(graph, f"{name}.requant_clip", taken), np.array(code * float(factor), np.float32)))
        if chain:  # pool -> [Clip] -> Q -> data moves -> (the Q's readers)
            first = clip if clip is not None else q
            readers = list(q.outputs[0].uses())
            first.replace_input_with(0, node.outputs[0])
            for user, idx in readers:
                user.replace_input_with(idx, chain[-1].outputs[0])
            chain[0].replace_input_with(0, q.outputs[0])
            zp = q.inputs[2] if len(q.inputs) > 2 else None
            codes_type = ir.TensorType(zp.const_value.dtype if zp is not None and zp.const_value is not None
                                       else ir.DataType.UINT8)  # ONNX: no zero point means uint8
            for v in [q.outputs[0]] + [c.outputs[0] for c in chain]:
                v.type = codes_type
            moved = ([clip] if clip is not None else []) + [q]
            graph.remove(moved)
            graph.insert_after(node, moved)
    return len(todo)


# --------------------------------------------------------------------------- ModelProto rewrites
def convert_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 copy of a float ONNX graph for strongly typed builds (no FP16 builder flag exists there).

    Float initializers/constants become float16; Cast nodes at the graph inputs and outputs keep the
    float32 interface so the same input buffers feed both engines.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def to16(t: Any) -> Any:
        arr = numpy_helper.to_array(t).astype(np.float16)
        return numpy_helper.from_array(arr, t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == f32:
            g.initializer[i].CopyFrom(to16(t))
    for n in g.node:
        for a in n.attribute:
            if n.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == f32:
                a.t.CopyFrom(to16(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f16
            if n.op_type in ("EyeLike", "RandomNormal", "RandomUniform") and a.name == "dtype" and a.i == f32:
                a.i = f16
    renames = {}
    new_nodes = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == f32:
            renames[inp.name] = inp.name + ".fp16"
            new_nodes.append(helper.make_node("Cast", [inp.name], [inp.name + ".fp16"], to=f16,
                                              name=f"{inp.name}/CastToFp16"))
    for n in g.node:
        for k, x in enumerate(n.input):
            if x in renames:
                n.input[k] = renames[x]
    outs = []
    for o in g.output:
        if o.type.tensor_type.elem_type == f32:
            for n in g.node:
                for k, y in enumerate(n.output):
                    if y == o.name:
                        n.output[k] = o.name + ".fp16"
            for n in g.node:
                for k, x in enumerate(n.input):
                    if x == o.name:
                        n.input[k] = o.name + ".fp16"
            outs.append(helper.make_node("Cast", [o.name + ".fp16"], [o.name], to=f32, name=f"{o.name}/CastToFp32"))
    nodes = new_nodes + list(g.node) + outs
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    m.producer_name = PRODUCER  # this file is ours (a re-run of bench may replace it), whoever made `src`
    from .storage import write_graph

    return write_graph(m, Path(dst))  # atomic, never through a link: bench writes it beside the plan; a data file
    # beside it where the FP16 weights still pass protobuf's limit


def set_input_shapes(model: Any, input_shapes: dict[str, list[int]]) -> Any:
    """Pin the named graph inputs to static shapes (in place), so shape inference resolves every tensor."""
    for inp in model.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        for d, v in zip(inp.type.tensor_type.shape.dim, shape):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    return model


def expose_outputs(model: Any, names: list[str]) -> Any:
    """Make intermediate tensors graph outputs (in place; type left to the runtime), e.g. for onnxruntime
    to return them."""
    import onnx

    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


# ---------------------------------------------------------------- export clean-ups (moved from export.py)
#: Ops `fold_constant_moves` evaluates offline when every input is a constant: they only select, reorder or copy
#: values, so the folded initializer holds exactly what a runtime would compute.
CONSTANT_MOVE_OPS = (*DATA_MOVE_OPS, "Gather", "GatherND", "Concat", "Expand", "Shape")


def fold_constant_moves(model) -> int:
    """Replace each data-movement node whose inputs are all constants by an initializer holding its output (LeViT's
    attention biases: a GatherND of a parameter by constant indices, then a Transpose, per attention layer). The
    engine then reads one constant instead of running a gather and a transpose kernel per inference, whose float
    outputs `inspect` counted as hand-offs. Q/DQ nodes are never folded."""
    import onnx
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    opset = model.opset_imports.get("", 17)
    taken: set[str] | None = None  # value names, gathered at the first fold
    n = 0
    for node in list(model.graph):
        if node.op_type not in CONSTANT_MOVE_OPS or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        if any(o.is_graph_output() for o in node.outputs) or len(node.outputs) != 1:
            continue
        args = [None if v is None else _const_array(v) for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(args, node.inputs)):
            continue
        proto = ir.serde.serialize_node(node)
        feeds = {name: a for name, a in zip(proto.input, args) if name}
        try:
            graph = onnx.helper.make_graph([proto], "fold", [
                onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for k, a in feeds.items()], [onnx.helper.make_empty_tensor_value_info(proto.output[0])])
            (value,) = ReferenceEvaluator(onnx.helper.make_model(
                graph, opset_imports=[onnx.helper.make_opsetid("", opset)])).run(None, feeds)
        except Exception:  # noqa: BLE001 - an op the reference cannot evaluate stays in the graph
            continue
        value = np.asarray(value)
        out = node.outputs[0]
        taken = _value_names(model.graph) if taken is None else taken
        const = add_initializer(model.graph, _unique(model.graph, f"{out.name}.folded", taken), np.ascontiguousarray(value))
        replace_uses(out, const)
        model.graph.remove(node, safe=True)
        n += 1
    return n


def fold_weight_transposes(model) -> int:
    """DQ(int8 W) -> Transpose(perm 1,0) -> MatMul  ==>  DQ(int8 Wᵀ, axis 1) -> MatMul (TensorRT wants
    the DequantizeLinear directly on the GEMM input, and a constant transpose costs nothing offline)."""
    import onnx_ir as ir

    n = 0
    for node in list(model.graph):
        if node.op_type != "Transpose":
            continue
        src = node.inputs[0]
        dq = src.producer() if src is not None else None
        perm = node.attributes.get("perm")
        if dq is None or dq.op_type != "DequantizeLinear" or perm is None or list(perm.as_ints()) != [1, 0]:
            continue
        if len(list(src.uses())) != 1 or dq.inputs[0].const_value is None:
            continue
        tensor = dq.inputs[0].const_value
        ints = np.ascontiguousarray(tensor.numpy().T)
        name = dq.inputs[0].name
        new_int = add_initializer(model.graph, f"{name}.T", ints, tensor.dtype)
        dq.replace_input_with(0, new_int)
        sv = dq.inputs[1]
        if sv is not None and sv.const_value is not None and len(sv.shape or ()) == 2:  # block scales move too
            dq.replace_input_with(1, add_initializer(model.graph, f"{sv.name}.T",
                                            np.ascontiguousarray(sv.const_value.numpy().T)))
        axis = dq.attributes.get("axis")
        dq.attributes["axis"] = ir.AttrInt64("axis", 1 - (axis.as_int() if axis is not None else 1))
        out = dq.outputs[0]
        out.shape = node.outputs[0].shape
        replace_uses(node.outputs[0], out)
        model.graph.remove(node, safe=True)
        n += 1
    return n


def _average_pools(graph) -> list:
    """The graph's AveragePool nodes with an input (a list: the rewrites replace them while iterating)."""
    return [n for n in graph if n.op_type == "AveragePool" and n.domain in ("", "ai.onnx") and n.inputs]


def _unpadded(node) -> bool:
    """A pool without padding or dilation (auto_pad NOTSET or VALID): each window holds only input elements."""
    pads, dil, auto = (node.attributes.get(k) for k in ("pads", "dilations", "auto_pad"))
    return not ((pads is not None and any(pads.as_ints())) or (dil is not None and any(d != 1 for d in dil.as_ints()))
                or (auto is not None and auto.as_string() not in ("NOTSET", "VALID")))


def _pool_to_mean(graph, node, values, axes, keepdims: int) -> None:
    """Replace the pool `node` by ReduceMean(values, axes) under its name, metadata and output name."""
    import onnx_ir as ir

    mean = ir.node("ReduceMean", [values, axes], attributes={"keepdims": keepdims}, name=node.name,
                   metadata_props=dict(node.metadata_props))
    old, out = node.outputs[0], mean.outputs[0]
    out.shape, out.type = old.shape, old.type
    graph.insert_before(node, mean)
    replace_uses(old, out)
    graph.remove(node, safe=True)
    out.name = old.name


def global_average_pools(model) -> int:
    """AveragePool(kernel = the input's spatial size, no padding, no dilation) ==> ReduceMean(spatial axes,
    keepdims=1). The same mean of the same elements; returns the number of pools rewritten."""
    graph = model.graph
    n = 0
    for node in _average_pools(graph):
        x = node.inputs[0]
        shape = x.shape if x is not None else None
        kernel = node.attributes.get("kernel_shape")
        if shape is None or kernel is None or len(shape) < 3:
            continue
        spatial = [d if isinstance(d, int) else None for d in list(shape)[2:]]
        if None in spatial or spatial != list(kernel.as_ints()) or not _unpadded(node):
            continue
        taken = _value_names(graph)
        axes = add_initializer(graph, _unique(graph, f"{node.name or 'pool'}.axes", taken),
                               np.arange(2, len(shape), dtype=np.int64))
        _pool_to_mean(graph, node, x, axes, keepdims=1)
        n += 1
    return n


def _shape_through_qdq(value: Any) -> Any:
    """`value`'s shape, or that of the tensor its Q/DQ (or Clip) chain quantizes: a DequantizeLinear that
    `integer_pools` added gives codes of the same shape but carries none."""
    while value is not None and value.shape is None:
        p = value.producer()
        if p is None or p.op_type not in ("QuantizeLinear", "DequantizeLinear", "Clip") or not p.inputs:
            return None
        value = p.inputs[0]
    return value.shape if value is not None else None


def tiled_average_pools(model) -> int:
    """Q -> DQ -> AveragePool(2-D, kernel = strides, no padding, no dilation, static spatial sizes the kernel
    divides: whole windows that tile the input, as ResNet-D's 2x2 stride-2 shortcut pools)  ==>  Q -> Reshape
    [N, C, H/kh, kh, W/kw, kw] -> DQ -> ReduceMean(axes 3, 5, keepdims=0). The same mean of the same elements
    (a sum, then a division by kh*kw), so an integer pool stays exact; the window view moves INT8 codes, ahead of
    the DQ, where onnxruntime's QDQ propagation leaves it alone. TensorRT-RTX runs an AveragePool layer on float
    input, and fuses this mean into the kernel before it (ResNet-D at W8A8: 84 -> 81 engine layers, 6 -> 3 float
    hand-offs). Run after `integer_pools`, which looks for the pool right after its DQ. Returns the number of pools
    rewritten."""
    import onnx_ir as ir

    graph = model.graph
    n = 0
    for node in _average_pools(graph):
        x = node.inputs[0]
        dq = x.producer() if x is not None else None
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0] else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        shape = _shape_through_qdq(x)
        kernel, strides = node.attributes.get("kernel_shape"), node.attributes.get("strides")
        if shape is None or kernel is None or strides is None or len(shape) != 4:
            continue
        hw = [d if isinstance(d, int) else None for d in list(shape)[2:]]
        ks, ss = list(kernel.as_ints()), list(strides.as_ints())
        if None in hw or ks != ss or ks == hw or any(k < 1 or d % k for d, k in zip(hw, ks)) or not _unpadded(node):
            continue
        (h, w), (kh, kw) = hw, ks
        view = ir.Shape([shape[0], shape[1], h // kh, kh, w // kw, kw])
        taken = _value_names(graph)
        base = node.name or "pool"
        dims = add_initializer(graph, _unique(graph, f"{base}.windows", taken),
                               np.array([0, 0, h // kh, kh, w // kw, kw], dtype=np.int64))  # 0: N and C as they are
        axes = add_initializer(graph, _unique(graph, f"{base}.window_axes", taken), np.array([3, 5], dtype=np.int64))
        codes = dq.inputs[0]
        windows = ir.node("Reshape", [codes, dims], name=f"{base}/Windows")
        windows.outputs[0].name = _unique(graph, f"{codes.name}.windows", taken)
        zp = q.inputs[2] if len(q.inputs) > 2 else None
        windows.outputs[0].type = codes.type or ir.TensorType(  # ONNX: no zero point means uint8
            zp.const_value.dtype if zp is not None and zp.const_value is not None else ir.DataType.UINT8)
        windows.outputs[0].shape = view
        graph.insert_before(dq, windows)
        if _single_user(dq.outputs[0]) is node:  # the pool alone reads this DQ: it dequantizes the view
            dq.replace_input_with(0, windows.outputs[0])
            dq.outputs[0].shape = view
            values = dq.outputs[0]
        else:  # others read the DQ as it is: a DQ of the view beside it, same scale, zero point and quantizer
            own = ir.node("DequantizeLinear", [windows.outputs[0], *dq.inputs[1:]], name=f"{dq.name}_windows",
                          attributes=dict(dq.attributes), metadata_props=dict(dq.metadata_props))
            own.outputs[0].name = _unique(graph, f"{dq.outputs[0].name}.windows", taken)
            own.outputs[0].type, own.outputs[0].shape = x.type or ir.TensorType(ir.DataType.FLOAT), view
            graph.insert_before(node, own)
            values = own.outputs[0]
        _pool_to_mean(graph, node, values, axes, keepdims=0)
        n += 1
    return n


def fold_pads(model) -> int:
    """Pad(constant 0, spatial only) -> Conv  ==>  Conv with the pads folded in."""
    import onnx_ir as ir

    n = 0
    for node in list(model.graph):
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
            continue
        users = list(node.outputs[0].uses())
        if len(users) != 1 or users[0][0].op_type != "Conv" or users[0][1] != 0:
            continue
        conv = users[0][0]
        mode = node.attributes.get("mode")
        if mode is not None and mode.as_string() != "constant":
            continue
        pads_v = node.inputs[1]
        if pads_v is None or pads_v.const_value is None:
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            cv = node.inputs[2].const_value
            if cv is None or float(np.asarray(cv.numpy()).reshape(-1)[0]) != 0.0:
                continue
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            continue  # axes given: keep it simple
        pads = [int(v) for v in np.asarray(pads_v.const_value.numpy()).reshape(-1)]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if any(begin[:2]) or any(end[:2]) or any(p < 0 for p in pads):
            continue
        old = conv.attributes.get("pads")
        sp = rank - 2
        cur = list(old.as_ints()) if old is not None else [0] * (2 * sp)
        new = [cur[i] + begin[2 + i] for i in range(sp)] + [cur[sp + i] + end[2 + i] for i in range(sp)]
        conv.attributes["pads"] = ir.AttrInt64s("pads", new)
        if "auto_pad" in conv.attributes:
            conv.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
        conv.replace_input_with(0, node.inputs[0])
        model.graph.remove(node, safe=True)
        n += 1
    return n


def name_nodes(model) -> None:
    """Deterministic node names from the PyTorch module paths (Q/DQ nodes already carry theirs)."""
    seen: dict[str, int] = {}
    for node in model.graph:
        if node.name and "/" in node.name and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip") and \
                "mixq.quantizer" in node.metadata_props:
            continue
        path = node.metadata_props.get(FLOAT_LAYER_KEY) or node.metadata_props.get(UNQUANTIZED_KEY)  # a float layer
        if path is None and node.op_type in ("Conv", "Gemm", "MatMul"):  # a quantized layer: after its weight quantizer
            for v in node.inputs:
                p = v.producer() if v is not None else None
                q = p.metadata_props.get("mixq.quantizer", "") if p is not None else ""
                if q.endswith(".weight"):
                    path = q[: -len(".weight")]
        path = path or module_path(node) or "graph"
        base = f"{path}/{node.op_type}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        node.name = base if k == 0 else f"{base}_{k}"


def mark_float_layers(model, layers: dict[str, np.ndarray], key: str = FLOAT_LAYER_KEY) -> set[str]:
    """Tag the Conv/Gemm/MatMul of each module in `layers` (module path -> its float weight; left float by
    `--float-layers`) with `mixq.float_layer` = that path, so that `check` and `inspect` tell a float layer asked
    for from a missing Q/DQ, and `name_nodes` names it after its module. A node is its module's when its weight
    is the initializer the exporter names after the parameter (`<module>.weight`), or else a constant equal
    to the weight or, for a MatMul, to its transpose (a Linear on 3-D input, whose weight the exporter
    transposes into a new constant); a plain layer inside a traced block carries only the block in its
    namespace, so the namespace cannot tell. Returns the paths found."""
    found: set[str] = set()
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        path = (w.name or "")[: -len(".weight")] if (w.name or "").endswith(".weight") else None
        if path not in layers:
            arr = _const_array(w)
            path = next((p for p, ref in layers.items() if arr is not None and (
                (arr.shape == ref.shape and np.array_equal(arr, ref)) or
                (node.op_type == "MatMul" and ref.ndim == 2 and arr.shape == ref.T.shape and np.array_equal(arr, ref.T))
            )), None)
        if path is not None and not any(k in node.metadata_props for k in (FLOAT_LAYER_KEY, UNQUANTIZED_KEY)):
            node.metadata_props[key] = path
            found.add(path)
    return found


def module_path(node) -> str | None:
    """The innermost nn.Module path in the exporter's `namespace` ("path: type/path: type/fn: aten.op")."""
    ns = node.metadata_props.get("namespace")
    if not ns:
        return None
    best = None
    for seg in ns.split("/"):  # "path: Type/.../op_name: aten.op"; the root module has no segment
        name, _, typ = seg.partition(":")
        typ = typ.strip()
        if name.strip() and typ and not typ.startswith(("aten.", "<", "prims.")):
            best = name.strip()
    return best
