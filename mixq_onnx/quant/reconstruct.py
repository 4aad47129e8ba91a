"""Post-training quantization that learns rounding and step sizes: RTN, AdaRound, BRECQ, QDrop, Genie-M.

Every method starts from the same initialisation (per-channel Lp weight scales, per-tensor Lp
activation scales) and then reconstructs unit by unit, in execution order, from the inputs the
already-quantized prefix produces:

- adaround: every layer alone; learns rounding (rectified sigmoid h(V)) on the layer output.
- brecq:    blocks; learns rounding on the block output (activations float), then LSQ step sizes. The loss
            is the squared error, as BRECQ's official code runs it (`opt_mode='mse'`), not the paper's
            Fisher-weighted one.
- qdrop:    blocks; rounding and LSQ step sizes jointly, QDrop (p) on the block input and inside.
- genie:    qdrop plus a learned per-channel weight scale on the integer base frozen at init.

What each method learns in which phase is declared in `mixq_onnx.methods` (the registry); this module runs it.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import MixqError
from ..methods import METHODS, Method, Phase
from ..progress import Progress, progress_bar
from ..threads import tick
from ..utils import full_fp32, model_device
from .config import QuantConfig
from .graph import (
    Unit,
    assign_owners,
    example_input,
    execution_order,
    prepare,
    quantizers,
    set_quant_state,
    units,
)
from .modules import QUANT_LAYERS
from .quantizer import ActQuantizer, WeightQuantizer, keep_mask, search_act_scale, search_weight_scale


@dataclass
class UnitReport:
    name: str
    kind: str
    iters: int
    loss_before: float
    loss_after: float
    holdout_before: float
    holdout_after: float
    gen_gap: float  # holdout loss minus optimised-slice loss, after
    grad_round: dict[str, float] = field(default_factory=dict)
    grad_wscale: dict[str, float] = field(default_factory=dict)
    grad_ascale: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    iters_per_s: float = 0.0


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    tail = t[int(len(t) * 0.8):]
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "last20_mean": float(tail.mean())}


def _batched(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, bs: int = 256) -> None:
    for s in range(0, len(x), bs):
        fn(x[s:s + bs])


def _capture(model: nn.Module, module: nn.Module, data: torch.Tensor, bs: int = 256,
             want_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and outputs) of `module` when `model` runs on `data`."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def hook(_m, args, out):
        ins.append(args[0].detach())
        if want_out:
            outs.append(out.detach())
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, len(data), bs):
                try:
                    model(data[s:s + bs])
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(ins), (torch.cat(outs) if want_out else None)


class _ResumedCapture:
    """`_capture` for quantize's unit loop without re-running the network's prefix for every unit.

    Between two captures of the same kind the prefix does not change: the float pass (every quantizer off)
    never does, and the quantized pass changes only at the unit just reconstructed. So each batch's live
    values are kept where the last capture stopped (after the unit's output for the float pass, at its input for
    the quantized pass, since that unit has been finalized since) and the next capture resumes there: the same
    modules on the same batch slices in the same order, so the same tensors, bit for bit
    (`tests/test_quantize.py`). Each resume first checks that nothing before it changed since (the state of every
    enabled quantizer, every other parameter's version); a unit that is not a node of the top-level graph (a
    layer inside a block) falls back to `_capture`. Memory: the live values at one point per batch and kind."""

    def __init__(self, gm: nn.Module, data: torch.Tensor, bs: int = 256):
        import torch.fx as fx

        self.gm, self.data, self.bs = gm, data, bs
        self.graph = gm if isinstance(gm, fx.GraphModule) else None
        self.interp = fx.Interpreter(gm, garbage_collect_values=False) if self.graph is not None else None
        self.nodes = list(self.graph.graph.nodes) if self.graph is not None else []
        self.last_use: dict[Any, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        # want_out -> (resume index, env per batch, fingerprint of the prefix before it)
        self.saved: dict[bool, tuple[int, list[dict[Any, Any]], tuple]] = {}

    def _fingerprint(self, stop: int) -> tuple:
        """What the nodes before `stop` compute with: every quantizer's on/off state (and, when on, its tensors'
        identities and versions), and every other parameter's and buffer's."""
        out: list[Any] = []
        for n in self.nodes[:stop]:
            if n.op not in ("call_module", "get_attr"):
                continue
            m = self.interp.fetch_attr(n.target)  # type: ignore[union-attr]
            if not isinstance(m, nn.Module):
                out.append((n.target, id(m), getattr(m, "_version", None)))
                continue
            for sub in m.modules():
                if isinstance(sub, (ActQuantizer, WeightQuantizer)):
                    on = bool(sub.enabled) and bool(sub.initialized)
                    out.append((id(sub), on, getattr(sub, "mode", None) if on else None))
                    if on:
                        out.extend((id(t), t._version) for t in (*sub.parameters(), *sub.buffers(),
                                                                 *([sub.int_weight] if isinstance(getattr(sub, "int_weight", None), torch.Tensor) else [])))
                    continue
                out.extend((id(t), t._version) for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)))
        return tuple(out)

    def _index(self, module: nn.Module) -> int | None:
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and self.interp.fetch_attr(n.target) is module:  # type: ignore[union-attr]
                return i
        return None

    def __call__(self, module: nn.Module, want_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = self._index(module) if self.interp is not None else None
        if k is None or self.nodes[0].op != "placeholder" or sum(n.op == "placeholder" for n in self.nodes) != 1:
            self.saved.clear()  # the next resumable capture starts from the input again
            return _capture(self.gm, module, self.data, self.bs, want_out)
        interp, node = self.interp, self.nodes[k]
        assert interp is not None
        prev = self.saved.get(want_out)
        if prev is not None and (prev[0] > k or prev[2] != self._fingerprint(prev[0])):
            prev = None  # something before the saved point changed: run from the input
        ins: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        envs: list[dict[Any, Any]] = []
        with torch.no_grad():
            for b, s in enumerate(range(0, len(self.data), self.bs)):
                if prev is not None:
                    start, env = prev[0], dict(prev[1][b])
                else:
                    start, env = 1, {self.nodes[0]: self.data[s:s + self.bs]}
                interp.env = env
                for n in self.nodes[start:k]:
                    env[n] = interp.run_node(n)
                args = interp.map_nodes_to_values(node.args, node)
                kwargs = interp.map_nodes_to_values(node.kwargs, node)
                ins.append(args[0].detach())
                keep_from = k
                if want_out:
                    out = module(*args, **kwargs)
                    outs.append(out.detach())
                    env[node] = out
                    keep_from = k + 1
                envs.append({n: v for n, v in env.items() if self.last_use.get(n, -1) >= keep_from})
        self.saved[want_out] = (keep_from, envs, self._fingerprint(keep_from))
        return torch.cat(ins), (torch.cat(outs) if want_out else None)


def _rec_loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dim 1 and averaged over everything else, as QDrop's and BRECQ's lp_loss:
    channels of an NCHW output, but the tokens of a [B, N, C] one (a ViT unit's loss then weighs N/C against
    the rounding regulariser, where features would weigh 1)."""
    d = (out - tgt).pow(2)
    return d.sum(1).mean() if d.ndim > 1 else d.mean()


@torch.no_grad()
def _eval_loss(module: nn.Module, x: torch.Tensor, tgt: torch.Tensor, bs: int = 256) -> float:
    if len(x) == 0:
        return float("nan")
    tot = 0.0
    for s in range(0, len(x), bs):
        tot += float(_rec_loss(module(x[s:s + bs]), tgt[s:s + bs])) * len(x[s:s + bs])
    return tot / len(x)


# activation ranges are observed on up to this many images, in batches; each quantizer keeps a bounded sample of
# 2^16 values (`ActQuantizer.observe`), drawn from the first batches that fill it: a large tensor's sample comes
# from the first batch of 128 images alone (the caches' own seeded order makes those a mixed sample), its minimum
# from all of them
_OBSERVE_SAMPLES, _OBSERVE_BATCH = 512, 128


def init_steps(gm: nn.Module, n_calib: int) -> int:
    """How many steps `init_scales` reports to its bar: one per weight-scale search, observation batch and
    activation-scale search (so the setup bar has a total and an ETA)."""
    layers = sum(isinstance(m, QUANT_LAYERS) for m in gm.modules())
    acts = sum(isinstance(m, ActQuantizer) for m in gm.modules())
    batches = -(-min(n_calib, _OBSERVE_SAMPLES) // _OBSERVE_BATCH) if acts else 0
    return layers + batches + acts


def init_scales(gm: nn.Module, calib: torch.Tensor, cfg: QuantConfig, bar: Progress | None = None) -> None:
    """Lp-optimal per-channel weight scales and per-tensor activation scales (the RTN starting point).
    `bar` advances by `init_steps` steps: on a large network these searches take minutes."""
    bar = bar if bar is not None else progress_bar(None, "", enabled=False)
    bar.set_postfix_str("weight scales")
    for m in gm.modules():
        if isinstance(m, QUANT_LAYERS):
            search_weight_scale(m.weight, m.weight_quantizer, p=cfg.p_norm, grid=cfg.scale_grid)
            bar.update(1)
    acts = [m for m in gm.modules() if isinstance(m, ActQuantizer)]
    if not acts:
        return
    set_quant_state(gm, weights=False, acts=False)
    for q in acts:
        q.observing = True
    bar.set_postfix_str("activation ranges")

    def observe(b: torch.Tensor) -> None:
        gm(b)
        bar.update(1)

    try:
        _batched(observe, calib[: min(len(calib), _OBSERVE_SAMPLES)], _OBSERVE_BATCH)
    finally:
        for q in acts:
            q.observing = False
    bar.set_postfix_str("activation scales")
    for q in acts:
        search_act_scale(q, p=cfg.p_norm)
        bar.update(1)
    set_quant_state(gm, weights=True, acts=True)


def _set_units_enabled(all_units: list[Unit], upto: int, outside: Sequence[ActQuantizer] = ()) -> None:
    """Quantizers on for units [0, upto), off for the rest (a shared activation quantizer goes with the unit
    that owns it, the first that uses it: `Unit.act_quantizers` leaves it out of the later ones), and the
    activation quantizers of no unit (`outside`) on: a unit's quantized input is captured from the prefix as
    the deployed network computes it, as QDrop's reference captures it (the pool's quantizer before the
    classifier; with layer units, also the residual and MatMul quantizers). The capture stops at the unit's
    input, so those after it change nothing."""
    for i, u in enumerate(all_units):
        for q in u.weight_quantizers() + u.act_quantizers():
            q.enabled = i < upto
    for q in outside:
        q.enabled = True


def outside_units(gm: nn.Module, all_units: list[Unit]) -> list[ActQuantizer]:
    """The activation quantizers that no reconstruction unit contains: they keep their initial (Lp-searched)
    step, which no unit learns."""
    inside = {id(m) for u in all_units for m in u.module.modules() if isinstance(m, ActQuantizer)}
    return [m for m in gm.modules() if isinstance(m, ActQuantizer) and id(m) not in inside]


def _finalize_unit(unit: Unit) -> None:
    for layer in unit.layers():
        layer.weight_quantizer.finalize(layer.weight)
    for q in unit.act_quantizers():
        q.learning = False
        q.drop_prob = 0.0
        q.scale.requires_grad_(False)


def _grad_norm(params: list[torch.Tensor]) -> float | None:
    gs = [p.grad for p in params if p.grad is not None]
    if not gs:
        return None
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))


def _reconstruct(unit: Unit, q_in: torch.Tensor, fp_in: torch.Tensor, fp_out: torch.Tensor, cfg: QuantConfig,
                 n_train: int, *, learn_round: bool, learn_act: bool, learn_wscale: bool, drop: float,
                 acts_on: bool, iters: int, gen: torch.Generator) -> dict[str, list[float]]:
    layers = unit.layers()
    wqs = [layer.weight_quantizer for layer in layers]
    aqs = unit.act_quantizers()
    for q in aqs:
        q.enabled = acts_on
    groups: list[dict[str, Any]] = []
    round_params: list[torch.Tensor] = []
    if learn_round:
        for layer in layers:
            if layer.weight_quantizer.mode != "soft":
                layer.weight_quantizer.init_adaround(layer.weight)
            round_params.append(layer.weight_quantizer.alpha)
        groups.append({"params": round_params, "lr": cfg.lr_round})
    # Scales (Genie-M's weight scales, LSQ's activation steps) learn under one cosine decay, as Genie's and
    # QDrop's references anneal them; the rounding logits keep a constant rate.
    scale_groups: list[dict[str, Any]] = []
    ws_params: list[torch.Tensor] = []
    if learn_wscale:
        for q in wqs:
            q.scale.requires_grad_(True)
            ws_params.append(q.scale)
        scale_groups.append({"params": ws_params, "lr": cfg.lr_wscale})
    a_params: list[torch.Tensor] = []
    if learn_act and acts_on:
        for q in aqs:
            q.scale.requires_grad_(True)
            q.learning = True
            q.drop_prob = drop
            a_params.append(q.scale)
    if a_params:
        scale_groups.append({"params": a_params, "lr": cfg.lr_act})
    hist: dict[str, list[float]] = {"round": [], "wscale": [], "ascale": []}
    if not groups and not scale_groups:
        return hist
    opt = torch.optim.Adam(groups) if groups else None
    s_opt = torch.optim.Adam(scale_groups) if scale_groups else None
    s_sched = torch.optim.lr_scheduler.CosineAnnealingLR(s_opt, T_max=iters, eta_min=0.0) if s_opt else None
    warm = int(cfg.warmup * iters)
    b_hi, b_lo = cfg.beta
    for it in range(iters):
        tick()  # follow the machine's load (auto thread mode only)
        idx = torch.randint(0, n_train, (min(cfg.batch_size, n_train),), generator=gen)
        x = q_in[idx]
        if drop > 0:  # QDrop on the block input: element-wise mix of quantized and float activations
            x = x + keep_mask(x, drop, gen) * (fp_in[idx] - x)
        out = unit.module(x)
        loss = _rec_loss(out, fp_out[idx])
        if learn_round and it >= warm:
            t = (it - warm) / max(1, iters - warm)
            beta = b_lo + (b_hi - b_lo) * max(0.0, 1.0 - t)
            loss = loss + cfg.round_weight * sum(q.round_loss(beta) for q in wqs)
        if opt:
            opt.zero_grad(set_to_none=True)
        if s_opt:
            s_opt.zero_grad(set_to_none=True)
        loss.backward()
        for key, ps in (("round", round_params), ("wscale", ws_params), ("ascale", a_params)):
            g = _grad_norm(ps)
            if g is not None:
                hist[key].append(g)
        if opt:
            opt.step()
        if s_opt:
            s_opt.step()
            s_sched.step()
        with torch.no_grad():
            for p in ws_params + a_params:
                p.clamp_(min=1e-8)
    for q in aqs:
        q.learning = False
        q.drop_prob = 0.0
        q.scale.requires_grad_(False)
    for q in wqs:
        q.scale.requires_grad_(False)
    return hist


def _units_for(gm: nn.Module, method: Method) -> list[Unit]:
    """The units `method` reconstructs, in execution order."""
    if method.granularity == "block":
        return units(gm)
    layers = [Unit(n, m, "layer") for n, m in gm.named_modules() if isinstance(m, QUANT_LAYERS)]
    order = execution_order(gm, {u.name: u.module for u in layers}, example_input(gm))
    return assign_owners(sorted(layers, key=lambda u: order.index(u.name) if u.name in order else 1 << 30))


def _run_phases(unit: Unit, phases: list[Phase], q_in: torch.Tensor, fp_in: torch.Tensor, fp_out: torch.Tensor,
                cfg: QuantConfig, n_train: int, gen: torch.Generator) -> tuple[dict[str, list[float]], int]:
    """Run `phases` on `unit` in order; the gradient-norm histories of all phases and the iterations done."""
    hist: dict[str, list[float]] = {"round": [], "wscale": [], "ascale": []}
    done = 0
    for ph in phases:
        iters = max(1, cfg.iters // ph.iters_div)
        h = _reconstruct(unit, q_in, fp_in, fp_out, cfg, n_train, learn_round=ph.learn_round,
                         learn_act=ph.learn_act, learn_wscale=ph.learn_wscale,
                         drop=cfg.drop_prob if ph.drop else 0.0, acts_on=ph.acts_on, iters=iters, gen=gen)
        for k in hist:
            hist[k] += h[k]
        done += iters
        if ph.finalize_weights:
            for layer in unit.layers():
                layer.weight_quantizer.finalize(layer.weight)
    return hist, done


@full_fp32()
def quantize(model: nn.Module, cfg: QuantConfig, calib: Any, *, progress: bool = True) -> nn.Module:
    """Return a fake-quantized copy of `model` with learned rounding/scales.

    `calib`: a preprocessed input tensor, a `CalibrationSet` (its first `num_samples` images are used,
    and its provenance, cache path, recipe hash and image count, goes into `quant.json`), or a cache's path
    (as `make_calibration_cache` returns it), loaded here with `load_calibration` for `model`.

    The method (`cfg.method`) comes from the registry `mixq_onnx.methods.METHODS`. The result carries
    `mixq_config` and `mixq_report` (per-unit diagnostics).
    """
    cfg = cfg.validate().resolved()
    method = METHODS.lookup(cfg.method)
    if isinstance(calib, (str, os.PathLike)):
        from ..calib import load_calibration

        calib = load_calibration(calib, model)
    elif not isinstance(calib, torch.Tensor) and not hasattr(calib, "provenance"):
        raise MixqError(f"quantize: calib must be a preprocessed float tensor, a CalibrationSet or a cache path, "
                        f"got {type(calib).__name__}")
    elif not isinstance(calib, torch.Tensor):  # a CalibrationSet: the checks a cache path gets
        from ..calib import check_calibration
        from ..models import get_preprocessing

        if calib.preprocessing != get_preprocessing(model):
            raise MixqError(f"quantize: the CalibrationSet of {calib.path} preprocesses for another model "
                            f"({calib.preprocessing}) than the one given ({get_preprocessing(model)}): build it "
                            "with CalibrationSet(cache, model)")
        check_calibration(calib)
    elif isinstance(calib, torch.Tensor) and not calib.is_floating_point():
        raise MixqError(f"quantize: calib is {calib.dtype}; it takes preprocessed float inputs (the model's own "
                        "preprocessing applied), or a CalibrationSet, which applies it")
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    provenance = None
    name = f"{cfg.method} W{cfg.wbits}A{cfg.abits}"
    # The setup before the first unit (images, BN folding, scale searches, observation passes) has its own
    # bar: on a large network or a busy machine it takes minutes.
    with progress_bar(2, f"{name} setup", "step", enabled=progress) as setup:
        setup.set_postfix_str("calibration images")
        if not isinstance(calib, torch.Tensor):  # a CalibrationSet
            provenance = calib.provenance(min(len(calib), cfg.num_samples))
            calib = calib.tensor(cfg.num_samples)
        dev = model_device(model)
        calib = calib[: cfg.num_samples].to(dev)
        setup.update(1)
        t_start = time.perf_counter()
        setup.set_postfix_str("prepare (fold BN, place quantizers)")
        gm = prepare(model, cfg)
        setup.total = 2 + init_steps(gm, len(calib))
        setup.update(1)
        init_scales(gm, calib, cfg, setup)
    n_hold = int(len(calib) * cfg.holdout) if len(calib) >= 20 else 0
    n_train = len(calib) - n_hold
    reports: list[UnitReport] = []
    phases = method.phases_for(cfg.weight_only)
    if not method.phases:  # rtn: the scale search and round to nearest
        for u in units(gm):
            _finalize_unit(u)
    else:
        all_units = _units_for(gm, method)
        outside = [] if cfg.weight_only else outside_units(gm, all_units)
        capture = _ResumedCapture(gm, calib)
        with progress_bar(len(all_units), name, "unit", enabled=progress) as bar:
            for i, unit in enumerate(all_units):
                t0 = time.perf_counter()
                bar.set_postfix_str(unit.name)
                set_quant_state(gm, weights=False, acts=False)
                fp_in, fp_out = capture(unit.module, want_out=True)
                _set_units_enabled(all_units, i, outside)
                q_in, _ = capture(unit.module)
                for q in unit.weight_quantizers() + unit.act_quantizers():
                    q.enabled = True
                if cfg.weight_only:
                    for q in unit.act_quantizers():
                        q.enabled = False
                tr = slice(0, n_train)
                ho = slice(n_train, len(calib))
                before = _eval_loss(unit.module, q_in[tr], fp_out[tr])
                hold_before = _eval_loss(unit.module, q_in[ho], fp_out[ho])
                hist, iters_done = _run_phases(unit, phases, q_in, fp_in, fp_out, cfg, n_train, gen)
                _finalize_unit(unit)
                after = _eval_loss(unit.module, q_in[tr], fp_out[tr])
                hold_after = _eval_loss(unit.module, q_in[ho], fp_out[ho])
                dt = time.perf_counter() - t0
                reports.append(UnitReport(
                    name=unit.name, kind=unit.kind, iters=iters_done, loss_before=before, loss_after=after,
                    holdout_before=hold_before, holdout_after=hold_after,
                    gen_gap=(hold_after - after) if n_hold else float("nan"),
                    grad_round=_stats(hist["round"]), grad_wscale=_stats(hist["wscale"]),
                    grad_ascale=_stats(hist["ascale"]), seconds=round(dt, 2), iters_per_s=round(iters_done / dt, 2),
                ))
                bar.update(1)
    set_quant_state(gm, weights=True, acts=not cfg.weight_only)
    for q in quantizers(gm).values():
        if isinstance(q, WeightQuantizer) and q.mode != "int":
            raise RuntimeError(f"weight quantizer {q.name} was not finalized")
    gm.mixq_config = cfg  # type: ignore[attr-defined]
    gm.mixq_calibration = provenance  # type: ignore[attr-defined]
    gm.mixq_report = {  # type: ignore[attr-defined]
        "method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "num_samples": len(calib),
        "holdout": n_hold, "seconds": round(time.perf_counter() - t_start, 2),
        "units": [asdict(r) for r in reports],
    }
    if getattr(gm, "mixq_float_layers", ()):  # only then: reports without float layers keep their keys
        gm.mixq_report["float_layers"] = list(gm.mixq_float_layers)  # type: ignore[attr-defined]
    if getattr(gm, "mixq_unquantized", ()):
        gm.mixq_report["unquantized_layers"] = list(gm.mixq_unquantized)  # type: ignore[attr-defined]
    if getattr(gm, "mixq_traced_leaves", ()):  # modules timm keeps opaque that placement 4 traced into
        gm.mixq_report["traced_leaves"] = list(gm.mixq_traced_leaves)  # type: ignore[attr-defined]
    return gm.eval()


def summarize(report: dict[str, Any]) -> str:
    lines = [f"{report['method']} W{report['wbits']}A{report['abits']}: {report['num_samples']} samples "
             f"({report['holdout']} held out), {report['seconds']:.1f} s"]
    if report.get("float_layers"):
        lines.append(f"left float (--float-layers): {', '.join(report['float_layers'])}")
    if report.get("traced_leaves"):
        n = len(report["traced_leaves"])
        lines.append(f"traced into {n} module{'s' * (n != 1)} timm keeps opaque to torch.fx "
                     f"({', '.join(report['traced_leaves'][:3])}{', ...' * (n > 3)}): their layers are quantized")
    if report["units"]:
        def num(v: Any, width: int, fmt: str) -> str:  # a number, or a dash where none was measured (NaN)
            return f"{v:{width}{fmt}}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'–':>{width}}"

        lines.append(f"{'unit':24} {'loss before':>12} {'after':>10} {'gap':>9} {'|g_round|':>10} {'|g_act|':>9} {'it/s':>7}")
        for u in report["units"]:
            gr = u["grad_round"].get("mean", float("nan"))
            ga = u["grad_ascale"].get("mean", float("nan"))
            lines.append(f"{u['name'][:24]:24} {num(u['loss_before'], 12, '.4g')} {num(u['loss_after'], 10, '.4g')} "
                         f"{num(u['gen_gap'], 9, '.3g')} {num(gr, 10, '.3g')} {num(ga, 9, '.3g')} "
                         f"{num(u['iters_per_s'], 7, '.1f')}")
        if not report["holdout"]:
            lines.append("gap –: no images held out (fewer than 20 calibration images), so no generalisation gap")
    return "\n".join(lines)

