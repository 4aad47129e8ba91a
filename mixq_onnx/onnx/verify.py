"""`verify`: onnxruntime (exact QDQ semantics, and default optimisations) against the PyTorch fake-quant
model on the same images: top-1 agreement, output differences, and per-quantizer integer-code mismatch."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import MixqError
from .graph import REQUANT_KEY, GraphIndex, load_model, uses_external_data

TIE_RELATIVE = 1e-4  # a near tie's image differs by at most this fraction of its largest logit (of 1 if smaller)


def _near_ties(out: np.ndarray, ref: np.ndarray) -> int:
    """Images whose top-1 differs only because two of PyTorch's logits are closer than float rounding moved
    them (softmax, SiLU, LayerNorm run differently in each runtime): not an unfaithful graph."""
    a, b = out.argmax(1), ref.argmax(1)
    n = 0
    for i in np.nonzero(a != b)[0]:
        d = float(np.abs(out[i] - ref[i]).max())
        if d <= TIE_RELATIVE * max(float(np.abs(ref[i]).max()), 1.0) and ref[i, b[i]] - ref[i, a[i]] <= d:
            n += 1
    return n


UNFAITHFUL_STEPS = 0.5  # teacher-forced input difference, in steps, above which a segment is not PyTorch's
# teacher-forced network outputs: after the last quantizer both sides compute from the same codes, so they differ
# by float rounding only (about 1e-6 of the logits); a wrong rescale, bias or weight scale of the last layers (or
# of a weight-only graph, one segment from input to output) gives a sizeable fraction of them
UNFAITHFUL_OUTPUT = 1e-3


@dataclass
class VerifyReport:
    n: int
    top1_agreement: float  # % images whose top-1 matches PyTorch (exact run)
    max_abs_diff: float
    mean_abs_diff: float
    code_mismatch_fraction: float  # worst quantizer, same float input on both sides (Q/DQ faithfulness)
    propagated_code_mismatch: float  # worst quantizer end to end (float-rounding differences cascade)
    per_quantizer: dict[str, float] = field(default_factory=dict)
    per_quantizer_propagated: dict[str, float] = field(default_factory=dict)
    optimized_top1_agreement: float | None = None
    optimized_max_abs_diff: float | None = None
    # Teacher-forced run: every PyTorch quantizer outputs onnxruntime's integer codes (times its scale), so
    # each float input differs from the graph's only by the float ops of its own segment (the ops since
    # the previous quantizers), not by rounding flips cascading from upstream. A faithful graph gives
    # differences far below one quantization step and codes that differ only at isolated rounding ties;
    # a wrong op or a missing Q/DQ gives a sizeable fraction of a step.
    segment_step_diff: float = 0.0  # worst quantizer: max |x_onnx - x_torch| / scale
    segment_code_mismatch: float = 0.0  # worst quantizer: fraction of codes that differ
    forced_max_abs_diff: float = 0.0  # network outputs
    forced_output_scale: float = 1.0  # the largest |output| of the teacher-forced PyTorch run (at least 1)
    forced_top1_agreement: float = 0.0
    worst_segment: str | None = None
    first_divergence: str | None = None  # free run: first quantizer in graph order whose codes differ
    per_quantizer_step_diff: dict[str, float] = field(default_factory=dict)
    layout: str = "dq-scales"  # export layout recorded in the graph (integer: bit-exact by construction)
    nan_outputs: int = 0  # output values that are NaN or inf in either runtime (a verdict on its own)
    # disagreements at a float-rounding tie: PyTorch's two logits closer than the image's own max |diff|, itself
    # under TIE_RELATIVE of its logits (the verdict counts them as agreeing; a wrong graph's are not small)
    near_ties: int = 0
    warnings: list[str] = field(default_factory=list)
    subset: str | None = None  # which images (`verify_data`: all N, or the seeded sample `limit` drew)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self, min_agreement: float = 99.9, exact: bool = False) -> list[str]:
        """Why the graph is not a faithful export of the folder (empty when it is). Besides top-1 agreement, a
        quantizer whose input differs from PyTorch's by more than half a step in the teacher-forced run is a
        Q/DQ or an op that is not PyTorch's (float-op rounding stays far below a step), whatever the top-1 says.
        `exact`: also any output difference or differing integer code (the integer layout's promise)."""
        bad = []
        if self.nan_outputs:
            bad.append(f"{self.nan_outputs} output values are NaN or inf")
        beyond_ties = self.top1_agreement + 100.0 * self.near_ties / max(self.n, 1)
        if not beyond_ties >= min_agreement:
            bad.append(f"exact-run top-1 agreement {self.top1_agreement:.2f} % is below {min_agreement:g} %"
                       + (f" ({beyond_ties:.2f} % with its {self.near_ties} near-tie(s))" if self.near_ties else ""))
        if self.segment_step_diff > UNFAITHFUL_STEPS:
            bad.append(f"teacher-forced run: the input of {self.worst_segment} differs from PyTorch's by "
                       f"{self.segment_step_diff:.3g} of a quantization step (a Q/DQ or an op that is not PyTorch's)")
        if self.forced_max_abs_diff > UNFAITHFUL_OUTPUT * self.forced_output_scale:
            bad.append(f"teacher-forced run: the outputs differ from PyTorch's by {self.forced_max_abs_diff:.4g} "
                       f"(largest output {self.forced_output_scale:.4g}) after the last quantizer (from the input, "
                       "where the graph has no activation quantizer): the weights, scales or biases of the layers "
                       "after it are not PyTorch's")
        if self.code_mismatch_fraction > 0:
            worst = max(self.per_quantizer, key=self.per_quantizer.get)
            bad.append(f"the Q/DQ of {worst} is not PyTorch's: on the same float input, "
                       f"{100 * self.code_mismatch_fraction:.4f} % of its integer codes differ (grid, clip or "
                       "zero point)")
        if exact and (self.max_abs_diff > 0 or self.propagated_code_mismatch > 0):
            bad.append(f"not bit-exact: max |diff| {self.max_abs_diff:.4g}, integer codes differ in "
                       f"{100 * self.propagated_code_mismatch:.4f} % of the worst quantizer's values")
        return bad


def ort_session(path: Path | str, optimized: bool, extra_outputs: list[str] | None = None):
    """An onnxruntime CPU session: `optimized=False` is ORT_DISABLE_ALL (exact QDQ semantics, what `verify`
    judges); `extra_outputs` also returns those intermediate tensors (the integer codes `verify` compares)."""
    import onnxruntime as ort

    from .passes import expose_outputs

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    # onnxruntime's own pool would spin on every core beside torch's: it gets the threads torch was given
    # (--threads / the automatic count), and no inter-op pool
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    try:
        if extra_outputs:
            m = load_model(path, external_data=False)
            if uses_external_data(m):  # its weights stay in their file (a graph of 2 GiB cannot be serialized):
                # onnxruntime reads them from the graph's folder, as it would from the path
                so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                            str(Path(path).resolve().parent))
            m = expose_outputs(m, extra_outputs)
            return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except MixqError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's and onnx's own types (InvalidGraph, Fail, ValidationError)
        text = str(e).strip()
        first = text.splitlines()[0][:300] if text else "no message"
        raise MixqError(f"onnxruntime cannot load {path} ({type(e).__name__}: {first})") from None


def _nanmax(acc: float, d: np.ndarray) -> float:
    """max that propagates NaN (Python's max and np.max of a comparison silently drop it)."""
    m = float(d.max()) if d.size else 0.0  # np.max itself propagates NaN
    return math.nan if math.isnan(acc) or math.isnan(m) else max(acc, m)


def match_quantizers(graph: Any, qs: dict[str, Any], path: Path | str = "graph") -> None:
    """Refuse a graph that was exported from another result folder: every quantizer of the model must be in
    the graph with the same bits, activation scale and zero point, and the same integer weights (compared as
    count, sum and sum of squares, which the exporter's transposes and fused-QKV splits leave unchanged).
    `graph`: a ModelProto or its GraphIndex; Q/DQ nodes are found by their `mixq.quantizer` metadata."""
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    nodes = index.quantizer_nodes()
    for name, q in qs.items():
        if not q.enabled or not bool(q.initialized):
            continue
        found = nodes.get(name)
        if not found:
            raise MixqError(f"{path} does not match the quantized model: quantizer {name} has no Q/DQ in the graph")
        bits = {index.bits_of(n) for n in found} - {None}
        if bits and bits != {int(q.bits)}:
            raise MixqError(f"{path} does not match the quantized model: quantizer {name} is {q.bits}-bit, "
                            f"the graph's is {'/'.join(str(b) for b in sorted(bits))}-bit")
        if q.kind == "act":
            qn = next((n for n in found if n.op_type == "QuantizeLinear"), None)
            scale = index.value(qn.input[1]) if qn is not None else None
            if scale is None:
                raise MixqError(f"{path} does not match the quantized model: no QuantizeLinear for {name}")
            zp = index.value(qn.input[2]) if len(qn.input) > 2 else None
            g_scale = float(scale.reshape(-1)[0])
            g_zp = int(zp.reshape(-1)[0]) if zp is not None else 0
            want = np.float32(float(q.scale.detach()))
            src = index.meta(qn).get(REQUANT_KEY)
            if src is not None:  # an integer pool's requantization: the Q reads codes of `src`'s grid
                if src not in qs:
                    raise MixqError(f"{path} does not match the quantized model: {name} requantizes codes of "
                                    f"{src}, which the model does not have")
                want = np.float32(want / np.float32(float(qs[src].scale.detach())))
            if np.float32(g_scale) != want or g_zp != round(float(q.zero_point)):
                raise MixqError(f"{path} does not match the quantized model: quantizer {name} has scale "
                                f"{float(q.scale.detach()):.6g}, the graph's is {g_scale:.6g}")
        else:
            ints = [index.value(n.input[0]) for n in found if n.op_type == "DequantizeLinear"]
            ints = [a for a in ints if a is not None]
            if not ints:
                raise MixqError(f"{path} does not match the quantized model: no integer weights for {name}")
            g = np.concatenate([a.astype(np.int64).reshape(-1) for a in ints])
            w = q.int_weight.to(torch.int64).reshape(-1).numpy()
            if g.size != w.size or int(g.sum()) != int(w.sum()) or int((g * g).sum()) != int((w * w).sum()):
                raise MixqError(f"{path} does not match the quantized model: the integer weights of {name} differ")


def verify_data(onnx_path: str | os.PathLike, data: str | os.PathLike, *, quantized: str | os.PathLike,
                model: Any = None, trust_model_code: bool = False, limit: int | None = None, batch_size: int = 250,
                log: Callable[[str], None] | None = None, progress: bool = False) -> VerifyReport:
    """What `mixq-onnx verify` computes: the graph at `onnx_path` against the result folder `quantized` it was
    exported from (`model`: a `ModelOptions` replacing its recorded model, as `load_result` takes), on an npz or
    image folder read at the model's input size. `limit`: `pick_subset`'s seeded sample, named in the report's
    `subset`; `log` gets the `data:` / `preprocessing:` lines once the graph is accepted (a refused graph stays
    one error)."""
    from ..data import read_for_model
    from ..models import get_preprocessing
    from ..quant.io import load_result

    if not Path(onnx_path).is_file():
        raise MixqError(f"ONNX model not found: {onnx_path}")
    _, qmodel = load_result(quantized, model, trust_model_code)
    notes: list[str] = []
    d = read_for_model(data, get_preprocessing(qmodel), limit, log=notes.append, labelled=False)  # no labels read
    rep = verify_onnx(onnx_path, qmodel, d.images, batch_size, progress=progress)
    for line in notes if log is not None else ():
        log(line)
    rep.subset = d.subset
    return rep


def verify_onnx(path: str | os.PathLike, qmodel: nn.Module, images: torch.Tensor, batch_size: int = 250, *,
                progress: bool = False) -> VerifyReport:
    """images: uint8 NHWC; preprocessed with the model's own preprocessing. `progress`: a bar over the images
    (each batch runs two onnxruntime sessions and the model twice: thousands of images take minutes)."""
    from ..models import get_preprocessing
    from ..progress import progress_bar
    from ..quant.graph import quantizers
    from ..quant.modules import QUANT_LAYERS, QuantPool
    from ..quant.quantizer import ActQuantizer

    path = Path(path)
    index = GraphIndex.load(path)  # external data from the graph's folder, checked by onnx's loader
    layout = index.model_meta("mixq.layout", "dq-scales")
    q_nodes = [n for n in index.nodes if n.op_type == "QuantizeLinear" and index.quantizer_of(n) is not None]
    q_outputs = {n.output[0]: index.quantizer_of(n) for n in q_nodes}  # Q output -> its quantizer
    q_float_in = {n.output[0]: index.quantizer_input(n) for n in q_nodes}  # -> the float tensor it sees
    # an integer pool's requantization (passes.integer_pools): that tensor is a mean of codes; quantizer ->
    # the Q's scale, s_y / s_x, by which onnxruntime divides it
    requant = {index.quantizer_of(n): float(index.value(n.input[1]).reshape(-1)[0]) for n in q_nodes
               if REQUANT_KEY in index.meta(n)}
    # consumers of an integer pool: PyTorch hands them codes already requantized (QuantPool), so their input is
    # on the grid, not the float mean onnxruntime's Q may see; the pool's own quantizer is compared instead
    pool_out = {m.output_quantizer.name for m in qmodel.modules() if isinstance(m, QuantPool) and m.integer_mode()}
    match_quantizers(index, quantizers(qmodel), path)
    acts = {n: q for n, q in quantizers(qmodel).items() if isinstance(q, ActQuantizer) and q.enabled}
    missing = sorted(set(acts) - set(q_outputs.values()))
    if missing:
        raise MixqError(f"{path} does not match the quantized model: no Q/DQ for {', '.join(missing[:3])}")
    exact = ort_session(path, optimized=False, extra_outputs=list(q_outputs) + list(q_float_in.values()))
    opt = ort_session(path, optimized=True)
    pre = get_preprocessing(qmodel)
    graph_in = exact.get_inputs()
    if len(graph_in) != 1:
        raise MixqError(f"{path} does not match the quantized model: it has {len(graph_in)} inputs "
                        f"({', '.join(i.name for i in graph_in[:3])}), the model one")
    dims = list(graph_in[0].shape)
    if len(dims) != 1 + len(pre.input_size) or any(
            isinstance(d, int) and d != w for d, w in zip(dims[1:], pre.input_size)):
        raise MixqError(f"{path} does not match the quantized model: its input is {dims}, the model takes "
                        f"[N, {', '.join(str(v) for v in pre.input_size)}]")
    in_name = graph_in[0].name
    out_names = [o.name for o in exact.get_outputs()]
    order = [q_outputs[o] for o in q_outputs if q_outputs[o] in acts]  # graph (topological) order
    mism = {n: 0 for n in acts}
    mism_iso = {n: 0 for n in acts}
    mism_seg = {n: 0 for n in acts}
    total = {n: 0 for n in acts}
    step = {n: 0.0 for n in acts}
    by_q: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # quantizer -> (onnx codes, onnx float input)
    state = {"forced": False}

    def hook(m, args, out, name):
        # compared inside the hook (onnxruntime has run first): no activation is kept per quantizer
        if name not in by_q:
            return None
        ort_codes, ort_x = by_q[name]
        x_t = args[0].detach().float()
        tc = m.codes(x_t)
        if ort_codes.size != tc.numel():
            return None
        oc = torch.from_numpy(ort_codes).reshape(tc.shape).to(tc.dtype)
        differ = int((oc != tc).sum())
        if not state["forced"]:
            mism[name] += differ
            if name in requant:  # codes from the mean of the pool's codes, on the same input
                lo, hi = m.qrange
                zp = float(m.zero_point)
                iso = np.clip(np.rint(ort_x / np.float32(requant[name])) + zp, lo, hi)
            else:
                iso = m.codes(torch.from_numpy(ort_x)).numpy()
            mism_iso[name] += int((ort_codes != iso.reshape(ort_codes.shape)).sum())
            total[name] += tc.numel()
            return None
        mism_seg[name] += differ
        scale = m.scale.detach()
        if name not in pool_out:
            d = (torch.from_numpy(ort_x).reshape(x_t.shape) - x_t).abs().max() / scale
            step[name] = max(step[name], float(d))
        return ((oc - m.zero_point) * scale).to(out.dtype)  # continue from onnxruntime's codes

    hooks = [q.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, q in acts.items()]
    agree = agree_opt = agree_forced = ties = 0
    maxd = maxd_opt = maxd_forced = 0.0
    scale_forced = 1.0
    sumd = 0.0
    nel = nonfinite = 0
    bar = progress_bar(len(images), "verify", "image", enabled=progress)
    try:
        for s in range(0, len(images), batch_size):
            x = pre(images[s:s + batch_size])
            res = exact.run(out_names, {in_name: x.numpy()})
            out = res[0]
            by_name = dict(zip(out_names, res))
            by_q.clear()
            for qout, qname in q_outputs.items():
                if qname in acts:
                    by_q[qname] = (by_name[qout].astype(np.int32), by_name[q_float_in[qout]])
            del by_name, res
            with torch.no_grad():
                state["forced"] = False
                ref = qmodel(x).float().numpy()
                if ref.shape != out.shape:
                    raise MixqError(f"{path} does not match the quantized model: its output is "
                                    f"{list(out.shape)} on {len(x)} images, the model's {list(ref.shape)}")
                state["forced"] = True
                forced = qmodel(x).float().numpy()
            scale_forced = _nanmax(scale_forced, np.abs(forced))
            by_q.clear()
            o2 = opt.run(None, {in_name: x.numpy()})[0]
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            ties += _near_ties(out, ref)
            agree_opt += int((o2.argmax(1) == ref.argmax(1)).sum())
            d = np.abs(out - ref)
            nonfinite += int((~np.isfinite(out)).sum() + (~np.isfinite(ref)).sum())
            maxd = _nanmax(maxd, d)
            sumd += float(d.sum())
            nel += d.size
            maxd_opt = _nanmax(maxd_opt, np.abs(o2 - ref))
            maxd_forced = _nanmax(maxd_forced, np.abs(out - forced))
            agree_forced += int((out.argmax(1) == forced.argmax(1)).sum())
            bar.update(len(x))
    finally:
        bar.close()
        state["forced"] = False
        for h in hooks:
            h.remove()
    n = len(images)
    per = {k: (mism_iso[k] / total[k] if total[k] else 0.0) for k in acts}
    prop = {k: (mism[k] / total[k] if total[k] else 0.0) for k in acts}
    seg = {k: (mism_seg[k] / total[k] if total[k] else 0.0) for k in acts}
    worst = max(step, key=step.get) if step else None
    rep = VerifyReport(
        n=n, top1_agreement=100.0 * agree / n, near_ties=ties, max_abs_diff=maxd, mean_abs_diff=sumd / max(nel, 1),
        code_mismatch_fraction=max(per.values()) if per else 0.0,
        propagated_code_mismatch=max(prop.values()) if prop else 0.0,
        per_quantizer=per, per_quantizer_propagated=prop,
        optimized_top1_agreement=100.0 * agree_opt / n, optimized_max_abs_diff=maxd_opt,
        segment_step_diff=step[worst] if worst is not None else 0.0,
        segment_code_mismatch=max(seg.values()) if seg else 0.0,
        forced_max_abs_diff=maxd_forced, forced_output_scale=scale_forced, forced_top1_agreement=100.0 * agree_forced / n, worst_segment=worst,
        first_divergence=next((k for k in order if mism[k]), None), per_quantizer_step_diff=step, layout=layout,
        nan_outputs=nonfinite,
    )
    big = [m.name for m in qmodel.modules() if isinstance(m, QUANT_LAYERS) and m.integer_mode()
           and m.max_accumulator() >= 2**24]
    if big:
        rep.warnings.append(
            f"{len(big)} layer(s) ({', '.join(big[:3])}{', …' if len(big) > 3 else ''}) can accumulate beyond 2^24: "
            "fp32 sums of their integer products are exact only while partial sums stay below it")
    if agree_opt != agree or maxd_opt > 10 * max(maxd, 1e-6):
        rep.warnings.append(
            f"onnxruntime's default optimisations depart from exact QDQ semantics (top-1 agreement "
            f"{rep.optimized_top1_agreement:.2f} % vs {rep.top1_agreement:.2f} %, max diff {maxd_opt:.3g} vs {maxd:.3g}): "
            "its QDQ fusions requantize differently; deploy-time numbers come from the engine")
    return rep
