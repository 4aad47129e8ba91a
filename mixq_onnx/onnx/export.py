"""QDQ ONNX export: torch.onnx (dynamo) exports the float graph with placement markers, then onnx-ir
replaces each marker by the Q/DQ of its quantizer record (the same objects `quant.json` holds).

- weights: INT8 initializers holding the learned integers -> DequantizeLinear (per-channel FP32 scale,
  axis 0, no zero point). Never Q->DQ on float weights: TensorRT must not re-round.
- activations: QuantizeLinear -> DequantizeLinear per tensor (INT8, zero point 0); a grid narrower than
  8 bits (or unsigned) gets a float Clip(lo*s, hi*s) right before the Q, so kernels only see b-bit codes.
- TensorFlow-style explicit Pad(0) in front of a Conv is folded into the Conv's pads (Q/DQ sit
  directly on the Conv input, as TensorRT's fusions need).
- layout "integer" (default, `passes.integer_gemms`): the quantized Conv/Gemm/MatMul reads DQ(scale 1)
  codes and weights and is followed by Mul(s_x*s_w) per output channel and the bias Add, so
  onnxruntime's fp32 accumulation is exact and equals the PyTorch layer's integer mode bit for bit;
  a quantized average pool (`passes.integer_pools`) averages DQ(scale 1) codes and requantizes them onto
  its consumer's grid, Q(s_y / s_x), before any data movement: one INT8 pooling layer in TensorRT.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import MixqError
from ..utils import check_output_file, make_parent
from .graph import PRODUCER, UNQUANTIZED_KEY, written_by_mixq
from .markers import DOMAIN, marker_mode, translation_table
from .passes import (
    add_initializer,
    fold_constant_moves,
    fold_pads,
    fold_weight_transposes,
    global_average_pools,
    integer_gemms,
    integer_pools,
    mark_float_layers,
    name_nodes,
    replace_uses,
    sink_dequantize,
    split_fused_qkv,
    tiled_average_pools,
)

OPSET = 21
IR_VERSION = 10


def _example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    from ..models import get_preprocessing

    c, h, w = get_preprocessing(model).input_size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))


def torch_export(model: nn.Module, with_markers: bool):
    """torch.onnx.export (dynamo) with a dynamic batch; returns the ONNXProgram's onnx-ir model."""
    x = _example(model)
    kwargs: dict[str, Any] = dict(
        dynamo=True, opset_version=OPSET, input_names=["input"], output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
    )
    ctx = marker_mode(model) if with_markers else contextlib.nullcontext()
    sink = io.StringIO()
    try:
        with ctx, contextlib.redirect_stdout(sink), torch.no_grad():
            if with_markers:
                kwargs["custom_translation_table"] = translation_table()
            prog = torch.onnx.export(model.eval(), (x,), **kwargs)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        m = re.search(r"(aten::\w+|torch\.ops\.[\w.]+)", msg)
        if m:
            op = m.group(1).replace("torch.ops.", "").removesuffix(".default")
            raise MixqError(f"ONNX export failed: operator {op} is not supported by torch.onnx at opset {OPSET}; "
                            "replace it in the model or register a custom translation") from None
        first = msg.strip().splitlines()[0][:160] if msg.strip() else type(e).__name__
        raise MixqError(f"ONNX export failed: {first}") from None
    return prog.model


def _preprocessing(model: nn.Module) -> dict[str, Any]:
    from ..models import get_preprocessing

    return get_preprocessing(model).to_dict()


def insert_qdq(model, qs: dict[str, Any]) -> dict[str, int]:
    """Replace every mixq::Marker with its Q/DQ (or weight DQ); returns counts."""
    import onnx_ir as ir

    graph = model.graph
    counts = {"weight_dq": 0, "act_qdq": 0, "clip": 0}
    done: dict[str, tuple[Any, Any]] = {}  # quantizer -> (its input, its DQ output): a shared one gets one Q/DQ
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type != "Marker":
            continue
        name = node.attributes["name"].as_string()
        q = qs.get(name)
        if q is None:
            raise MixqError(f"exported graph has a marker for {name!r} that the quantized model does not know")
        x = node.inputs[0]
        if name in done:  # a shared quantizer called by each of its consumers: they all read the one DQ
            if done[name][0] is not x:
                raise MixqError(f"quantizer {name} quantizes two different tensors in the exported graph; "
                                "a shared quantizer must read one tensor")
            replace_uses(node.outputs[0], done[name][1])
            graph.remove(node, safe=True)
            continue
        safe = name
        spec = q.spec  # the one record of this quantizer's grid
        bits_meta = {"mixq.bits": str(spec.bits), "mixq.quantizer": spec.name}
        if spec.kind == "weight":
            ints = q.int_weight.cpu().numpy()
            zp = q.zero_point.detach().cpu().numpy().reshape(-1)
            attrs: dict[str, Any] = {"axis": spec.axis}
            if spec.block_size:  # INT4 weight-only GEMM: block scales [out, in / B] along the input axis
                if not spec.symmetric:
                    raise MixqError(f"{name}: block-scaled INT4 weights must be symmetric")
                ints_v = add_initializer(graph, f"{safe}.int4", ints.astype(np.int8), ir.DataType.INT4)
                scale_v = add_initializer(graph, f"{safe}.scale", q.scale.detach().cpu().numpy().astype(np.float32))
                attrs = {"axis": 1, "block_size": spec.block_size}
                counts["int4_weight_dq"] = counts.get("int4_weight_dq", 0) + 1
            else:
                ints_v = add_initializer(graph, f"{safe}.int8", ints.astype(np.int8 if spec.container()[0] < 0 else np.uint8))
                scale_v = add_initializer(graph, f"{safe}.scale", q.scale.detach().cpu().numpy().reshape(-1).astype(np.float32))
            inputs = [ints_v, scale_v]
            if not spec.symmetric:
                inputs.append(add_initializer(graph, f"{safe}.zero_point", zp.astype(np.uint8)))
            dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{safe}/DequantizeLinear",
                         metadata_props=dict(bits_meta))
            graph.insert_before(node, dq)
            out = dq.outputs[0]
            out.name = f"{safe}.dq"
            counts["weight_dq"] += 1
        else:
            s = float(q.scale.detach())
            lo, hi = spec.grid()
            zp = int(round(float(q.zero_point)))
            qtype = np.int8 if spec.container()[0] < 0 else np.uint8
            scale_v = add_initializer(graph, f"{safe}.scale", np.array(s, dtype=np.float32))
            zp_v = add_initializer(graph, f"{safe}.zero_point", np.array(zp, dtype=qtype))
            src = x
            if spec.needs_clip():
                lo_v = add_initializer(graph, f"{safe}.clip_lo", np.array((lo - zp) * s, dtype=np.float32))
                hi_v = add_initializer(graph, f"{safe}.clip_hi", np.array((hi - zp) * s, dtype=np.float32))
                clip = ir.node("Clip", [x, lo_v, hi_v], name=f"{safe}/Clip", metadata_props=dict(bits_meta))
                graph.insert_before(node, clip)
                src = clip.outputs[0]
                src.name = f"{safe}.clipped"
                counts["clip"] += 1
            qn = ir.node("QuantizeLinear", [src, scale_v, zp_v], name=f"{safe}/QuantizeLinear",
                         metadata_props=dict(bits_meta))
            graph.insert_before(node, qn)
            qn.outputs[0].name = f"{safe}.q"
            dq = ir.node("DequantizeLinear", [qn.outputs[0], scale_v, zp_v], name=f"{safe}/DequantizeLinear",
                         metadata_props=dict(bits_meta))
            graph.insert_before(node, dq)
            out = dq.outputs[0]
            out.name = f"{safe}.dq"
            counts["act_qdq"] += 1
        out.shape = node.outputs[0].shape
        out.type = node.outputs[0].type
        replace_uses(node.outputs[0], out)
        graph.remove(node, safe=True)
        done[name] = (x, out)
    return counts


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def finalize_model(model, meta: dict[str, Any]) -> None:
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    RemoveUnusedNodesPass()(model)
    model.opset_imports.pop(DOMAIN, None)
    RemoveUnusedOpsetsPass()(model)
    model.opset_imports[""] = OPSET
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    from .. import __version__

    model.producer_version = __version__
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        # torch.onnx's Python stack per node: absolute source paths and a per-process FX counter, so the same
        # folder exported twice in one process gave different bytes (and a built plan's graph hash no longer
        # matched a re-export). Nothing reads it; the module names (name_scopes, class_hierarchy) stay.
        node.metadata_props.pop(STACK_TRACE_KEY, None)
    for k, v in meta.items():
        model.metadata_props[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    del ir


OTHER_KINDS = (".plan", ".json", ".safetensors", ".npz", ".npy", ".th", ".pt", ".pth")  # never an ONNX graph's name


GRAPH_OURS = ("an ONNX graph", written_by_mixq)  # `check_output_file(ours=...)` of every graph writer


def save_model(model, out: str | os.PathLike, overwrite: bool = False, external_data: bool | None = None) -> Path:
    """Check and write an exported graph (`storage.write_graph`): with its weights in a data file beside it when
    `external_data`, or (None) when they pass `graph.EXTERNAL_DATA_ABOVE`, as protobuf's 2 GiB limit needs."""
    from .storage import write_graph

    out = check_output_file(out, refuse_suffixes=OTHER_KINDS, ours=GRAPH_OURS, overwrite=overwrite)
    make_parent(out)
    return write_graph(model, out, external_data)


LAYOUTS = ("integer", "dq-scales")


def export_qdq(qmodel: nn.Module, out: str | os.PathLike, layout: str = "integer", *, overwrite: bool = False,
               external_data: bool | None = None) -> Path:
    """Write the QDQ ONNX graph of a quantized model (from `quantize` or `load_quantized`).

    layout "integer" (default): quantized Conv/Gemm/MatMul read their codes and integer weights through
    DQ scale 1 and rescale by s_x * s_w afterwards, bit-identical to PyTorch in onnxruntime and the same
    INT8 kernels in TensorRT. "dq-scales": the scales sit on the DQ nodes (the ModelOpt layout), and
    float summation order makes near-ties differ between runtimes. `external_data`: see `save_model`."""
    from ..quant.graph import quantizers
    from ..quant.io import validate_quantized_model
    from ..quant.modules import QuantPool

    if layout not in LAYOUTS:
        raise MixqError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")

    validate_quantized_model(qmodel)  # the loader's checks: never write a graph with a bad scale or grid
    qs = quantizers(qmodel)
    cfg = getattr(qmodel, "mixq_config", None)
    model = torch_export(qmodel, with_markers=True)
    counts = insert_qdq(model, qs)
    fold_weight_transposes(model)
    fold_pads(model)
    moved = fold_constant_moves(model)
    if moved:  # only then: graphs without constant data movement keep their counts (and bytes) as before
        counts["constant_moves"] = moved
    means = global_average_pools(model)
    if means:  # only then: graphs without such pools keep their counts (and bytes) as before
        counts["global_average_pools"] = means
    split_fused_qkv(model)
    sunk = sink_dequantize(model, {n for n, q in qs.items() if getattr(q, "shared_with", ())})
    if sunk:  # only then: graphs without shared quantizers keep their counts (and bytes) as before
        counts["dq_after_moves"] = sunk
    floats = getattr(qmodel, "mixq_float_layers", ())
    unasked = [n for n in getattr(qmodel, "mixq_unquantized", ()) if n not in floats]
    mods = dict(qmodel.named_modules()) if floats or unasked else {}
    if floats:  # only then: graphs without float layers keep their counts (and bytes) as before
        found = mark_float_layers(model, {f: mods[f].weight.detach().cpu().float().numpy() for f in floats})
        lost = [f for f in floats if f not in found]
        if lost:  # never write a graph whose float layers `check` would take for missing Q/DQ
            raise MixqError(f"export: no Conv/Gemm/MatMul in the graph computes the float layer(s) {', '.join(lost)}")
        counts["float_layers"] = len(found)
    if unasked:  # layers quantize could not quantize (it said so): tagged, so check reads them as the folder's float
        weights = {n: mods[n].weight.detach().cpu().float().numpy() for n in unasked
                   if isinstance(getattr(mods.get(n), "weight", None), torch.Tensor)}
        found = mark_float_layers(model, weights, key=UNQUANTIZED_KEY)
        if found:  # one whose weight the graph does not hold as is (a custom forward) stays untagged: check says so
            counts["unquantized_layers"] = len(found)
    name_nodes(model)
    if layout == "integer":
        counts["integer_gemms"] = integer_gemms(model)
        pools = integer_pools(model, {m.input_quantizer.name: m.output_quantizer.name
                                      for m in qmodel.modules() if isinstance(m, QuantPool)})
        if pools:  # only then: graphs without pool quantizers keep their counts (and bytes) as before
            counts["integer_pools"] = pools
    tiled = tiled_average_pools(model)
    if tiled:  # only then: graphs without such pools keep their counts (and bytes) as before
        counts["tiled_pools"] = tiled
    finalize_model(model, {
        "mixq.layout": layout,
        "mixq.preprocessing": _preprocessing(qmodel),
        "mixq.quant_config": cfg.to_dict() if cfg is not None else {},
        "mixq.deployable": str(bool(cfg.symmetric) if cfg is not None else True).lower(),
        "mixq.counts": counts,
    })
    return save_model(model, out, overwrite, external_data)


def export_int4_weight_only(model: nn.Module, out: str | os.PathLike, block_size: int = 128,
                            log: Any = None, *, overwrite: bool = False, external_data: bool | None = None) -> Path:
    """W4A16 graph for TensorRT's INT4 weight-only GEMMs: Linear weights rounded to nearest on Lp-searched
    block scales (no data needed), convolutions and activations float. Layers whose input features the
    block size does not divide stay float (reported through `log`)."""
    from ..quant import QuantConfig, quantize
    from ..quant.graph import example_input

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise MixqError(f"model {type(model).__name__} has no Linear layer: INT4 weight-only applies to MatMul/Gemm")
    skipped = [n for n, m in linears.items() if m.in_features % block_size]
    if len(skipped) == len(linears):
        raise MixqError(f"block size {block_size} divides the input features of no Linear layer; try --block-size 32")
    if skipped and log is not None:
        log(f"{len(skipped)} of {len(linears)} Linear layers stay float: block size {block_size} does not divide "
            f"their input features ({', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''})")
    qmodel = quantize(model, QuantConfig.int4_weight_only(block_size), example_input(model), progress=False)
    return export_qdq(qmodel, out, overwrite=overwrite, external_data=external_data)


def export_fp(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False,
              external_data: bool | None = None) -> Path:
    """The plain float model (baselines)."""
    m = torch_export(model, with_markers=False)
    global_average_pools(m)
    name_nodes(m)
    finalize_model(m, {"mixq.fp": "true", "mixq.preprocessing": _preprocessing(model)})
    return save_model(m, out, overwrite, external_data)


def export_onnx(out: str | os.PathLike, *, quantized: str | os.PathLike | None = None, model: Any = None,
                fp: bool = False, int4_weight_only: bool = False, block_size: int = 128, layout: str = "integer",
                trust_model_code: bool = False, log: Any = None, overwrite: bool = False,
                external_data: bool | None = None) -> Path:
    """What `mixq-onnx export` writes. A result folder (`quantized`) gives its QDQ graph (its float graph with
    `fp`); a `model` alone (nn.Module or `ModelOptions`) gives the float graph (`fp`) or a round-to-nearest
    W4A16 graph (`int4_weight_only`). An existing `out` is replaced only if it is a graph mixq-onnx exported,
    or with `overwrite`. `external_data`: the weights in a data file beside `out` (True), in the graph file
    (False), or (None) in a data file exactly when protobuf's 2 GiB limit needs it (`save_model`)."""
    from ..models import ModelOptions, load_model
    from ..quant.io import load_result, load_source_model, read_quant_json

    def user_model() -> nn.Module:
        return load_model(model) if isinstance(model, ModelOptions) else model

    if quantized is None and not ((fp or int4_weight_only) and model is not None):
        raise MixqError("export needs --quantized DIR (or --model with --fp or --int4-weight-only)")
    if quantized is not None and not Path(quantized).is_dir():
        raise MixqError(f"--quantized {quantized} " + ("is a file, not a result folder" if Path(quantized).exists()
                                                       else "does not exist"))
    if fp and int4_weight_only:
        raise MixqError("--fp and --int4-weight-only exclude each other")
    if quantized is not None:
        read_quant_json(quantized)  # not a result folder: that is the error, before any about --out
    check_output_file(out, inputs=(quantized,), refuse_suffixes=OTHER_KINDS, ours=GRAPH_OURS, overwrite=overwrite)
    if fp:
        return export_fp(user_model() if model is not None else load_source_model(quantized, trust_model_code), out,
                         overwrite=overwrite, external_data=external_data)
    if int4_weight_only and quantized is None:
        return export_int4_weight_only(user_model(), out, block_size=block_size, log=log, overwrite=overwrite,
                                       external_data=external_data)
    if int4_weight_only and not read_quant_json(quantized)["config"].get("block_size"):
        raise MixqError(f"{quantized} is not block-quantized weight-only (quantize --wbits 4 --abits 16 "
                        "--block-size N), so it cannot be exported --int4-weight-only; or pass --model instead")
    _, qmodel = load_result(quantized, model, trust_model_code)
    return export_qdq(qmodel, out, layout=layout, overwrite=overwrite, external_data=external_data)
