"""Turn a float network into a fake-quantized one, with quantizers exactly where the QDQ export puts
Q/DQ (TensorRT's placement rules):

- BatchNorm folded into the preceding convolution;
- every Conv2d/Linear -> QuantConv2d/QuantLinear (per-channel weight quantizer + input quantizer);
- MatMul inputs (attention q·kᵀ and attn·v) quantized;
- a residual add gets a quantizer on its identity input only, never between a conv and the add it
  feeds (TensorRT fuses that add into the conv's epilogue);
- an average pool whose output a quantized layer reads (the global pool before a classifier) gets a
  quantizer on its input, at that layer's bits (`quantize_pools`): the pool then averages integer codes,
  exactly in every runtime, and TensorRT runs it in INT8 (DQ -> pool -> Q);
- one quantizer per tensor and grid (`share_quantizers`, on unless the config says otherwise): where one
  tensor feeds several quantized consumers with the same grid (a block input feeding its first conv and
  the residual add, or two convs), they share one `ActQuantizer`, so the export writes one Q/DQ whose
  integer tensor every consumer reads, instead of the same tensor twice (once in INT8, once in float).

Reconstruction units (residual blocks, transformer blocks) are traced with torch.fx one at a time,
so each unit stays a callable submodule the reconstruction loop can run alone.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MixqError
from ..registry import Registry, resolve
from .config import QuantConfig
from .modules import QUANT_LAYERS, QuantConv2d, QuantLinear, QuantPool, layer_weight
from .quantizer import ActQuantizer, WeightQuantizer
from .tracing import run_with_pre_hooks, trace, trace_leaves

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_SHAPE_METHODS = {"reshape", "view", "permute", "transpose", "contiguous", "flatten", "squeeze", "unsqueeze"}
# with `x.reshape_as(y)` / `x.view_as(y)`: args[0] is the data, args[1] only gives its shape (placement 3)
_SHAPE_METHODS_AS = _SHAPE_METHODS | {"reshape_as", "view_as"}
# data movement only (torch.roll: Swin's shifted windows, so shifted and plain blocks get the same placements)
_SHAPE_FUNCS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.squeeze, torch.unsqueeze, torch.roll}


#: Module classes reconstructed as one unit (BRECQ/QDrop blocks), as "package.module:Class", imported when a
#: model is prepared; a module or class the installed timm lacks is skipped. Add one with
#: `register_block_type("package.module:Class")` or `@register_block_type` on the class itself.
BLOCK_TYPES: Registry[str | type] = Registry("block type")


def register_block_type(target: str | type) -> str | type:
    """Register a block class (or its "package.module:Class" name); usable as a class decorator."""
    name = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
    BLOCK_TYPES.register(name, target)
    return target


for _t in ("mixq_onnx.models.cifar_resnet:BasicBlock", "mixq_onnx.models.mlperf_resnet8:Stage",
           "timm.models.resnet:BasicBlock", "timm.models.resnet:Bottleneck", "timm.models.regnet:Bottleneck",
           "timm.models._efficientnet_blocks:InvertedResidual",
           "timm.models._efficientnet_blocks:DepthwiseSeparableConv",
           "timm.models._efficientnet_blocks:EdgeResidual", "timm.models.vision_transformer:Block",
           "timm.models.swin_transformer:SwinTransformerBlock"):
    register_block_type(_t)
del _t


def block_types() -> tuple[type, ...]:
    """The classes of `BLOCK_TYPES` that this environment has."""
    out: list[type] = []
    for target in BLOCK_TYPES.values():
        try:
            out.append(resolve(target))
        except (ImportError, AttributeError):  # pragma: no cover  (an older or newer timm)
            continue
    return tuple(out)


def _transparent_modules() -> tuple[type, ...]:
    out: list[type] = [nn.Identity, nn.Dropout]
    try:
        from timm.layers import DropPath, LayerScale

        out += [DropPath, LayerScale]
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def _get(gm: nn.Module, target: str) -> nn.Module:
    return gm.get_submodule(target)


def _set(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def _disable_fused_attn(model: nn.Module) -> None:
    """Explicit q·kᵀ and attn·v matmuls (quantizable) instead of fused SDPA."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


# ----------------------------------------------------------------------------- BN folding
def _bn_affine(bn: _BatchNorm, channels: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ, k, β) of `channels`: the BatchNorm in evaluation is (x − μ)·k + β per channel, k = γ/σ."""
    std = torch.sqrt(bn.running_var[channels] + bn.eps)
    gamma = bn.weight.detach()[channels] if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach()[channels] if bn.affine else torch.zeros_like(std)
    return bn.running_mean[channels], gamma / std, beta


def fold_bn(conv: nn.Conv2d | nn.Linear, bn: _BatchNorm, channels: slice = slice(None)) -> None:
    """Fold `bn` (its `channels`: a conv that makes part of a concatenation the BN normalises) into `conv` (or a
    Linear whose output features it normalises)."""
    w = conv.weight.detach()
    mean, k, beta = _bn_affine(bn, channels)
    conv.weight = nn.Parameter(w * k.view(-1, *([1] * (w.ndim - 1))))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    conv.bias = nn.Parameter((b - mean) * k + beta)


def fold_input_bn(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """Fold `bn`, applied to `layer`'s input, into `layer`: W' = W·k over input features (k = γ/σ) and
    b' = b + W·(β − μ·k). Exact for a Linear and for a conv without padding (a padded conv would pad with zeros
    where the BatchNorm made β − μ·k)."""
    w = layer.weight.detach()
    mean, k, beta = _bn_affine(bn)
    shift = beta - mean * k
    view = (1, -1, *([1] * (w.ndim - 2)))
    b = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    layer.bias = nn.Parameter(b + (w * shift.view(view)).flatten(1).sum(1))
    layer.weight = nn.Parameter(w * k.view(view))


def _foldable(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    """The plain Conv2d `node` runs, read by one user only, else None (a weight-standardised conv standardises
    a folded weight again: its BN stays)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1):
        return None
    conv = _get(gm, node.target)
    return conv if isinstance(conv, nn.Conv2d) and layer_weight(conv) is conv.weight else None


def _concat_parts(gm: fx.GraphModule, node: fx.Node) -> list[nn.Conv2d] | None:
    """The convs a channel concatenation (torch.cat along dim 1, read only by the BN) joins, in order, when every
    part is one (MixNet's MixedConv2d: split, a conv per group, cat, then BN), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.cat
            and len(node.users) == 1):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim not in (1, -3) or not isinstance(parts, (list, tuple)):
        return None
    convs = [_foldable(gm, p) for p in parts]
    return None if any(c is None for c in convs) else convs  # type: ignore[return-value]


def bn1d_on_rows(model: nn.Module) -> set[int]:
    """The ids of the BatchNorm1d modules that read a 2-D (rows, features) tensor on every call in one forward
    of an example input. Only those fold into a Linear before them (LeViT's LinearNorm: linear, flatten(0, 1),
    BN1d, reshape back): a BN1d on (N, C, L) normalises another axis than the Linear's features."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    if not bns:
        return set()
    ndims: dict[int, set[int]] = {}

    def seen(mod: nn.Module, args: tuple) -> None:
        ndims.setdefault(id(mod), set()).add(args[0].ndim if args and isinstance(args[0], torch.Tensor) else -1)

    hooks = [m.register_forward_pre_hook(seen) for m in bns]
    try:
        with torch.no_grad():
            model(example_input(model))
    except Exception:  # noqa: BLE001 - the model refuses the example input: prepare says so later; fold none
        return set()
    finally:
        for h in hooks:
            h.remove()
    return {i for i, d in ndims.items() if d == {2}}


_RESHAPE_METHODS = {"flatten", "reshape", "view"}


def _is_reshape(node: fx.Node) -> bool:
    """A row-major reshape (no permutation): an element's flat index, so its innermost index, is kept."""
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or \
        (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))


def _shape_only(user: fx.Node, node: fx.Node) -> bool:
    """`user` reads only `node`'s shape (LeViT's `.reshape_as(x)` of the linear output it normalised)."""
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
    if user.op == "call_method" and user.target in ("size", "dim"):
        return True
    return user.op == "call_function" and user.target is getattr and user.args[1:2] in (("shape",), ("ndim",))


def _linear_rows(gm: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
    """The plain Linear (called once) whose output `node` is through row-major reshapes read by nothing else,
    and whose output nothing else reads but for its shape; else None."""
    while isinstance(node, fx.Node) and _is_reshape(node) and len(node.users) == 1:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    lin = _get(gm, node.target)
    if not (isinstance(lin, nn.Linear) and layer_weight(lin) is lin.weight):
        return None
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
        return None
    return lin if sum(1 for u in node.users if not _shape_only(u, node)) == 1 else None


def _fold_graph_bn(gm: fx.GraphModule, rows: set[int] = frozenset()) -> int:
    """Fold each BatchNorm into the conv (or the parts of a channel concatenation) before it, and each
    BatchNorm1d of `rows` (`bn1d_on_rows`) into the Linear whose features it normalises."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(_get(gm, node.target), _BatchNorm):
            continue
        prev = node.args[0]
        bn = _get(gm, node.target)
        if bn.running_mean is None or bn.running_var is None:
            continue  # track_running_stats=False: batch statistics even in eval, no constant affine map to fold
        conv = _foldable(gm, prev)
        parts = _concat_parts(gm, prev) if conv is None else None
        lin = _linear_rows(gm, prev) if conv is None and parts is None and id(bn) in rows else None
        if conv is not None and conv.out_channels == bn.num_features:
            fold_bn(conv, bn)
        elif lin is not None and lin.out_features == bn.num_features:
            fold_bn(lin, bn)
        elif parts is not None and sum(c.out_channels for c in parts) == bn.num_features:
            start = 0
            for c in parts:
                fold_bn(c, bn, slice(start, start + c.out_channels))
                start += c.out_channels
        else:
            continue
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        tail = [m for m in tail if not isinstance(m, nn.Identity)]
        if tail:  # timm BatchNormAct2d: keep its activation
            _set(gm, node.target, tail[0] if len(tail) == 1 else nn.Sequential(*tail))
        else:
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
        n += 1
    return n


def _input_layer(gm: fx.GraphModule, bn_node: fx.Node, bn: _BatchNorm, rows: set[int]) -> fx.Node | None:
    """The call of the layer `bn_node`'s output feeds, when the BatchNorm folds into it exactly (placement 6): the
    output read by that one layer alone, through exact identities; a Linear (called once, its features what a
    BatchNorm1d of `rows` normalises) or a conv without padding and groups; a BatchNorm with no activation or
    dropout of its own."""
    if any(m is not None and not isinstance(m, nn.Identity) for m in (getattr(bn, "drop", None),
                                                                        getattr(bn, "act", None))):
        return None
    node = bn_node
    while len(node.users) == 1:
        (user,) = node.users
        if not _is_identity(gm, user):
            break
        node = user
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
        return None
    layer = _get(gm, user.target)
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target) != 1:
        return None
    if isinstance(layer, nn.Linear) and layer_weight(layer) is layer.weight:
        ok = id(bn) in rows and layer.in_features == bn.num_features
    elif isinstance(layer, nn.Conv2d) and layer_weight(layer) is layer.weight:
        ok = (isinstance(bn, nn.BatchNorm2d) and layer.groups == 1 and layer.in_channels == bn.num_features
              and not isinstance(layer.padding, str) and all(p == 0 for p in _pair(layer.padding)))
    else:
        ok = False
    return user if ok else None


def _fold_input_bns(gm: fx.GraphModule, rows: set[int] = frozenset()) -> int:
    """Placement 6: each BatchNorm left after `_fold_graph_bn` whose output a Linear or an unpadded conv alone
    reads is folded into that layer's weights (`fold_input_bn`): LeViT's and RepViT's classifier heads
    (BatchNorm1d, dropout, Linear), whose float BatchNormalization sat between two INT8 kernels."""
    n = 0
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(_get(gm, node.target), _BatchNorm) or calls[node.target] != 1:
            continue
        bn = _get(gm, node.target)
        if bn.running_mean is None or bn.running_var is None or not node.args:
            continue
        user = _input_layer(gm, node, bn, rows)
        if user is None:
            continue
        fold_input_bn(_get(gm, user.target), bn)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        n += 1
    return n


# ----------------------------------------------------------------------------- graph analysis
def _activation_nodes(graph: fx.Graph) -> set[fx.Node]:
    act: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            act.add(node)
        elif any(isinstance(a, fx.Node) and a in act for a in node.all_input_nodes):
            act.add(node)
    return act


def _of_parameters(node: fx.Node, depth: int = 8) -> bool:
    """`node` is computed from the module's own tensors alone (a parameter, or a reshape of one), never from the
    input: a layer scale's gamma, not an activation."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_method", "call_function") or depth == 0 or not node.all_input_nodes:
        return False
    return all(_of_parameters(a, depth - 1) for a in node.all_input_nodes)


def _from_layer(gm: fx.GraphModule, node: fx.Node, transparent: tuple[type, ...], shape_as: bool = False) -> bool:
    """True if `node` is (through transparent and shape-only ops, with `shape_as` `x.reshape_as(y)` too) the output
    of a conv/linear."""
    shapes = _SHAPE_METHODS_AS if shape_as else _SHAPE_METHODS
    for _ in range(64):
        if node.op == "call_module":
            m = _get(gm, node.target)
            if isinstance(m, QUANT_LAYERS):
                return True
            if isinstance(m, transparent) and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            return False
        if node.op == "call_method" and node.target in shapes:
            node = node.args[0]
            continue
        if _is_mul(node):  # layer scale: x * gamma (ViT), x.mul(gamma.reshape(...)) (ConvNeXt)
            acts = [a for a in node.args if isinstance(a, fx.Node) and not _of_parameters(a)]
            if len(acts) == 1:
                node = acts[0]
                continue
        if node.op == "call_function":
            fname = getattr(node.target, "__name__", "")
            if node.target in _SHAPE_FUNCS or fname.startswith("window_reverse"):
                node = node.args[0]
                continue
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            if node.target is torch.cat:  # MixNet's MixedConv2d: a channel concatenation of conv outputs
                parts = node.args[0] if node.args else node.kwargs.get("tensors")
                return isinstance(parts, (list, tuple)) and bool(parts) and all(
                    isinstance(p, fx.Node) and _from_layer(gm, p, transparent, shape_as) for p in parts)
        return False
    return False


def _sum_of_layer(gm: fx.GraphModule, node: fx.Node, transparent: tuple[type, ...], depth: int = 16,
                  shape_as: bool = False) -> bool:
    """True if `node` is an add that sums a conv/linear output (directly, or through an earlier such add):
    TensorRT fuses the chain into that layer's epilogue (HRNet's fuse layers: conv + identity + identity)."""
    if depth <= 0 or not _is_add(node):
        return False
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return any(_from_layer(gm, a, transparent, shape_as) or _sum_of_layer(gm, a, transparent, depth - 1, shape_as)
               for a in args)


def _insert_quantizer(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, q: ActQuantizer, attr: str) -> None:
    gm.add_submodule(attr, q)
    with gm.graph.inserting_before(user):
        qn = gm.graph.call_module(attr, (arg,))
    user.replace_input_with(arg, qn)


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm"))


def is_float_layer(name: str, cfg: QuantConfig) -> bool:
    """`name` (a module path) matches one of `cfg.float_layers` (exact names or fnmatch patterns)."""
    return any(fnmatch.fnmatchcase(name, p) for p in cfg.float_layers)


def _check_float_layers(model: nn.Module, cfg: QuantConfig) -> None:
    """A pattern that matches no Conv2d/Linear is a typo: say so, with the layer names, before any work."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for p in cfg.float_layers:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            few = ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")
            raise MixqError(f"--float-layers {p!r} matches no Conv2d/Linear layer of {type(model).__name__} "
                            f"(its layers: {few})")


def _transform(module: nn.Module, prefix: str, leaves: Iterable[nn.Module], cfg: QuantConfig,
               rows: set[int] = frozenset()) -> fx.GraphModule:
    gm = trace(module, leaves)
    _fold_graph_bn(gm, rows)
    if cfg.placement >= 6:
        _fold_input_bns(gm, rows)
    abits = None if cfg.weight_only else cfg.abits
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = _get(gm, node.target)
        name = prefix + node.target
        if calls[node.target] > 1 and isinstance(m, (nn.Conv2d, nn.Linear)):
            continue  # one layer applied to two inputs would need two input quantizers: float (`unquantized_layers`)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and is_float_layer(name, cfg):
            continue  # --float-layers: stays the float module, with no quantizer
        if isinstance(m, (nn.Conv2d, nn.Linear)) and layer_weight(m) is None:
            continue  # a subclass whose forward is not a plain conv/linear's: float (`unquantized_layers`)
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not cfg.block_size:
            _set(gm, node.target, QuantConv2d(m, name, cfg.wbits, abits, cfg.symmetric))
        elif isinstance(m, nn.Linear) and not (cfg.block_size and m.in_features % cfg.block_size):
            _set(gm, node.target, QuantLinear(m, name, cfg.wbits, abits, cfg.symmetric, cfg.block_size))
    if abits is not None:
        act = _activation_nodes(gm.graph)
        transparent = _transparent_modules()
        for node in list(gm.graph.nodes):
            args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if _is_add(node) and len(args) == 2 and all(a in act for a in args) and args[0] is not args[1]:
                shape_as = cfg.placement >= 3
                side = [_from_layer(gm, a, transparent, shape_as) for a in args]
                if not any(side) and cfg.placement >= 2:  # a later term of a sum a layer started: the other input
                    side = [_sum_of_layer(gm, a, transparent, shape_as=shape_as) for a in args]
                if side.count(True) == 1:
                    ident = args[side.index(False)]
                    q = ActQuantizer(f"{prefix}{node.name}.identity", abits, cfg.symmetric, placement="residual")
                    _insert_quantizer(gm, node, ident, q, f"mixq_{node.name}_identity")
            elif _is_matmul(node) and len(args) == 2:
                for role, a in zip("ab", args):
                    if a in act:
                        q = ActQuantizer(f"{prefix}{node.name}.{role}", abits, cfg.symmetric, placement="matmul")
                        _insert_quantizer(gm, node, a, q, f"mixq_{node.name}_{role}")
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    return gm


# ----------------------------------------------------------------------------- integer pools
class SpatialMean(nn.Module):
    """`x.mean(dims, keepdim)` over the last two axes, as a module (a `QuantPool` wraps modules)."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool):
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}"


_SPATIAL_DIMS = ({2, 3}, {-1, -2})


def _spatial_mean(node: fx.Node) -> SpatialMean | None:
    """A `mean` over the two spatial axes of an NCHW tensor (`x.mean((2, 3))`, `torch.mean(x, (-2, -1))`)."""
    if not ((node.op == "call_method" and node.target == "mean") or
            (node.op == "call_function" and node.target is torch.mean)):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(dims, (tuple, list)) or set(dims) not in _SPATIAL_DIMS or len(dims) != 2 \
            or not isinstance(keepdim, bool) or "dtype" in node.kwargs:
        return None
    return SpatialMean(tuple(dims), keepdim)


def _exact_pool(m: nn.Module, shape: tuple[int, ...] | None = None) -> bool:
    """An average pool whose every output is (sum of codes) / (window size): no padding, and no ceil mode unless
    `shape` (the pool's input, seen in an example forward) shows that ceil mode adds no partial window there."""
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return m.output_size in (1, (1, 1), [1, 1])
    if isinstance(m, nn.AvgPool2d):
        if m.padding not in (0, (0, 0)) or m.divisor_override is not None:
            return False
        return not m.ceil_mode or (shape is not None and _whole_windows(m, shape))
    return False


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _whole_windows(m: nn.AvgPool2d, shape: tuple[int, ...]) -> bool:
    """Ceil mode changes nothing on this input: each spatial size less the kernel is a multiple of the stride (so
    floor and ceil give the same output size and no window runs past the edge). ResNet-D's and NF-RegNet's
    downsampling shortcuts (2x2, stride 2, ceil mode) on even sizes."""
    if len(shape) < 2:
        return False
    k, st = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    return all(size >= kk and (size - kk) % ss == 0 for size, kk, ss in zip(shape[-2:], k, st))


def _ceil_pool_shapes(model: nn.Module) -> dict[int, tuple[int, ...]]:
    """Input shape of each ceil-mode nn.AvgPool2d (by id), from one example forward (revision 5)."""
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.AvgPool2d) and m.ceil_mode}
    shapes: dict[int, tuple[int, ...]] = {}
    if pools:
        run_with_pre_hooks(model, example_input(model), pools, lambda n, a, _kw: shapes.setdefault(
            id(pools[n]), tuple(a[0].shape)) if a and isinstance(a[0], torch.Tensor) else None)
    return shapes


def _pool_consumer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The quantized layer that alone reads `node`'s output (through data movement and nn.Flatten)."""
    cur = node
    for _ in range(16):
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if nxt.op == "call_module" and nxt.args and nxt.args[0] is cur:
            m = _get(gm, nxt.target)
            if isinstance(m, QUANT_LAYERS):
                return m if isinstance(m.input_quantizer, ActQuantizer) else None
            if isinstance(m, nn.Flatten) or _moves_data(gm, nxt):
                cur = nxt
                continue
            return None
        if nxt.args and nxt.args[0] is cur and _moves_data(gm, nxt) and nxt.target is not F.pad:
            cur = nxt  # (no padding: the exporter requantizes ahead of reshapes only, passes.integer_pools)
            continue
        return None
    return None


def quantize_pools(model: nn.Module, ceil_mode: bool = False) -> int:
    """The placement rule "pools average integer codes", applied to a prepared model in place: an average pool
    (`nn.AdaptiveAvgPool2d(1)`, `nn.AvgPool2d` without padding, or a `mean` over the two spatial axes, which
    becomes a `SpatialMean` module) whose output a quantized layer alone reads
    becomes a `QuantPool` with an input quantizer (placement "pool") at that layer's bits and symmetry, which
    requantizes onto the layer's own input quantizer. Call it after the bit policy has set the layer's bits and
    after `share_quantizers` has settled the layer's quantizer, and `share_quantizers` again after it (a pool's
    input quantizer then joins an equal one on the same tensor). With `ceil_mode` (placement revision 5), a
    ceil-mode `nn.AvgPool2d` qualifies where its input, in one example forward, leaves no partial window.
    Returns how many pools it quantized."""
    n = 0
    shapes = _ceil_pool_shapes(model) if ceil_mode else {}
    for path, gm in list(model.named_modules()):
        if not isinstance(gm, fx.GraphModule):
            continue
        prefix = f"{path}." if path else ""
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        changed = False
        for node in list(gm.graph.nodes):
            mean = _spatial_mean(node)
            if mean is None and (node.op != "call_module" or calls[node.target] != 1):
                continue
            if mean is None and not _exact_pool(pool := _get(gm, node.target), shapes.get(id(pool))):
                continue
            layer = _pool_consumer(gm, node)
            if layer is None:
                continue
            iq = layer.input_quantizer
            target = node.target if mean is None else f"mixq_{node.name}"
            name = f"{prefix}{target}"
            q = ActQuantizer(f"{name}.input", iq.bits, iq.symmetric, placement="pool")
            pool = QuantPool(_get(gm, node.target) if mean is None else mean, name, q, layer.name, iq)
            if mean is None:
                _set(gm, node.target, pool)
            else:  # the method call becomes a call of the module
                gm.add_submodule(target, pool)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(target, (node.args[0],))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed = True
            n += 1
        if changed:
            gm.graph.lint()
            gm.recompile()
    return n


# ----------------------------------------------------------------------------- quantizer sharing
def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An exact identity in training and evaluation alike: Identity, and Dropout / DropPath with p = 0."""
    if node.op != "call_module":
        return False
    m = _get(gm, node.target)
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return float(m.p) == 0.0
    return type(m).__name__ == "DropPath" and float(getattr(m, "drop_prob", 1.0) or 0.0) == 0.0


def _slices(index: object) -> bool:
    """A tensor index with at least one slice, made only of slices, integers, Ellipsis and None."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, slice) for p in parts) and all(
        isinstance(p, (slice, int)) or p is Ellipsis or p is None for p in parts)


def _moves_data(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does `node` only move its first input's values (or add zeros)? Per-tensor quantization commutes
    with it exactly: q(f(x)) = f(q(x)) for slicing, reshapes, transposes, rolls and zero padding (0 is on
    every grid)."""
    if _is_identity(gm, node):
        return True
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_FUNCS:
        return True
    if node.target is operator.getitem:
        return len(node.args) == 2 and _slices(node.args[1])
    if node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return mode == "constant" and value in (None, 0, 0.0)
    return False


def _alias_root(gm: fx.GraphModule, node: fx.Node, moves: bool, single_user: bool = True,
                shape_readers: bool = False) -> tuple[fx.Node, list[fx.Node]]:
    """(root, chain): the tensor `node` is, through exact identities (and, with `moves`, data movement), and
    the nodes between them, root's reader first. With `single_user`, only nodes read by the next one alone
    join the chain (it is then rewired without changing what any other reader sees); with `shape_readers`
    (placement 4), readers of a node's shape alone do not count (EfficientViT's `B, _, H, W = x.shape` of the
    Identity its qkv conv reads: the rewiring leaves every shape as it was)."""
    chain: list[fx.Node] = []
    cur = node
    for _ in range(64):
        if not cur.args or not isinstance(cur.args[0], fx.Node):
            break
        if single_user and sum(1 for u in cur.users if not (shape_readers and _shape_only(u, cur))) != 1:
            break
        if not (_moves_data(gm, cur) if moves else _is_identity(gm, cur)):
            break
        chain.append(cur)
        cur = cur.args[0]
    chain.reverse()
    return cur, chain


@dataclass
class _Use:
    """One quantized reading of a tensor: a layer's input quantizer, or a quantizer node of the graph.

    A block's reading of its own input, seen from the graph that calls the block (`_block_uses`), has `block`
    set: `node` is then the block's call, `chain` the identities between the tensor and that call, and `path`
    the quantizer's path from the calling graph."""

    node: fx.Node
    quantizer: ActQuantizer
    layer: bool
    root: fx.Node
    chain: list[fx.Node]
    pool: bool = False
    path: str = ""
    block: fx.GraphModule | None = None


def _uses(gm: fx.GraphModule, single_user: bool = True, shape_readers: bool = False) -> list[_Use]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        m = _get(gm, node.target)
        if isinstance(m, (*QUANT_LAYERS, QuantPool)) and isinstance(m.input_quantizer, ActQuantizer):
            # a layer (or an integer pool) quantizes its own input: only exact identities may stand between it
            # and the tensor
            root, chain = _alias_root(gm, node.args[0], moves=False, single_user=single_user,
                                      shape_readers=shape_readers)
            out.append(_Use(node, m.input_quantizer, True, root, chain, isinstance(m, QuantPool),
                            f"{node.target}.input_quantizer"))
        elif isinstance(m, ActQuantizer):
            root, chain = _alias_root(gm, node.args[0], moves=True, single_user=single_user,
                                      shape_readers=shape_readers)
            out.append(_Use(node, m, False, root, chain, path=str(node.target)))
    return out


def _block_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.GraphModule, dict[fx.Node, fx.Node]]]:
    """(call, block, {block placeholder: the node of `gm` it receives}) for each traced block `gm` calls once
    (a block called twice has no single input tensor); only inputs passed as tensors are mapped."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(_get(gm, node.target), fx.GraphModule):
            calls.setdefault(str(node.target), []).append(node)
    out = []
    for target, nodes in calls.items():
        if len(nodes) != 1:
            continue
        node, block = nodes[0], _get(gm, target)
        inputs: dict[fx.Node, fx.Node] = {}
        for i, ph in enumerate(n for n in block.graph.nodes if n.op == "placeholder"):
            a = node.args[i] if i < len(node.args) else node.kwargs.get(str(ph.target))
            if isinstance(a, fx.Node):
                inputs[ph] = a
        out.append((node, block, inputs))
    return out


def _block_uses(gm: fx.GraphModule, single_user: bool = True, shape_readers: bool = False) -> list[_Use]:
    """The quantizers of the blocks `gm` calls that read a block input itself (a layer through exact identities,
    a quantizer node directly), as readings of the tensor of `gm` the block receives."""
    out = []
    for call, block, inputs in _block_calls(gm):
        for u in _uses(block, single_user=False):
            if u.root not in inputs or (u.chain and not u.layer):
                continue  # not an input, or an input moved (sliced, padded) before its quantizer reads it
            root, chain = _alias_root(gm, inputs[u.root], moves=False, single_user=single_user,
                                      shape_readers=shape_readers)
            out.append(_Use(call, u.quantizer, u.layer, root, chain, u.pool, f"{call.target}.{u.path}", block))
    return out


def _swap_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered under `root`."""
    for parent in list(root.modules()):
        for attr, child in list(parent.named_children()):
            if child is old:
                setattr(parent, attr, new)


def _grid_key(q: ActQuantizer) -> tuple[int, bool]:
    """What must agree for two activation quantizers to be one: bits and symmetry (both are per tensor; the
    sign is chosen later, from what the one quantizer observes)."""
    return q.bits, q.symmetric


def _share_graph(gm: fx.GraphModule, across_blocks: bool = False, shape_readers: bool = False) -> int:
    """Merge the quantizers of each tensor (per grid) of one traced graph, and with `across_blocks` those of the
    blocks it calls that read the tensor as their input; returns how many were merged."""
    groups: dict[tuple[fx.Node, tuple[int, bool]], list[_Use]] = {}
    for u in _uses(gm, shape_readers=shape_readers) + (
            _block_uses(gm, shape_readers=shape_readers) if across_blocks else []):
        groups.setdefault((u.root, _grid_key(u.quantizer)), []).append(u)
    merged = 0
    drop: set[str] = set()
    for (root, _), uses in groups.items():
        if len({id(u.quantizer) for u in uses}) < 2:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # afresh: earlier groups inserted nodes
        uses.sort(key=lambda u: order[u.node])
        # a layer's input quantizer keeps its name (a pool's only where no layer reads the tensor)
        first = next((u for u in uses if u.layer and not u.pool), next((u for u in uses if u.layer), uses[0]))
        canon, path = first.quantizer, first.path
        others = [q for q in dict.fromkeys(u.quantizer for u in uses) if q is not canon]
        names = [n for q in others for n in (q.name, *q.shared_with)]
        canon.shared_with = tuple(canon.shared_with) + tuple(n for n in dict.fromkeys(names)
                                                             if n not in canon.shared_with)
        merged += len(others)
        for u in uses:
            if u.block is not None:  # the block holds the one quantizer wherever it held its own
                if u.quantizer is not canon:
                    _swap_module(u.block, u.quantizer, canon)
            elif u.layer:
                _get(gm, u.node.target).input_quantizer = canon
            if (u.layer or u.block is not None) and u.chain:  # read the tensor itself, not an identity of it
                u.node.replace_input_with(u.chain[-1], root)  # (one marker, one Q/DQ)
                for c in reversed(u.chain):
                    if not c.users:
                        gm.graph.erase_node(c)
        nodes = [u for u in uses if not u.layer and u.block is None]
        if not nodes:
            continue
        # one call of the shared quantizer on the tensor itself; data movement after it (q(f(x)) = f(q(x)))
        readers = [r for u in nodes for r in (u.chain[:1] or list(u.node.users))]
        with gm.graph.inserting_before(min(readers, key=lambda r: order[r])):
            qn = gm.graph.call_module(path, (root,))
        for u in nodes:
            if u.chain:
                u.node.replace_all_uses_with(u.chain[-1])
                u.chain[0].replace_input_with(root, qn)
            else:
                u.node.replace_all_uses_with(qn)
            gm.graph.erase_node(u.node)
            if u.node.target != path:
                drop.add(str(u.node.target))
    if merged:
        gm.graph.lint()
        gm.recompile()
        for target in drop:
            gm.delete_submodule(target)
    return merged


def share_quantizers(model: nn.Module, across_blocks: bool = True, shape_readers: bool = True) -> int:
    """The placement rule "one quantizer per tensor and grid", applied to a prepared model in place: where
    one tensor (itself, through exact identities, or for a quantizer node of the graph through data movement
    alone: slicing, reshapes, zero padding) feeds several activation quantizers with the same bits and
    symmetry, they become one `ActQuantizer` module. A layer's input quantizer is kept (and keeps its name);
    the others are recorded in its `shared_with`, and a graph quantizer moves onto the tensor itself, ahead
    of the data movement. Each traced block is merged first on its own; then, with `across_blocks`, a block's
    quantizer of its own input joins those of the graph that calls it (HRNet: one tensor feeds a branch's
    block and a transition conv). With `shape_readers` (placement 4) a reader of a tensor's shape alone does not
    keep an identity between the tensor and a quantizer from counting as the tensor. Returns how many quantizers
    were merged away."""
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    return sum(_share_graph(m, shape_readers=shape_readers) for m in graphs) + (
        sum(_share_graph(m, across_blocks=True, shape_readers=shape_readers) for m in graphs) if across_blocks else 0)


def tensor_quantizers(model: nn.Module) -> dict[str, list[ActQuantizer]]:
    """Every tensor read by activation quantizers (through exact identities and data movement), by
    "graph path:node name", with the distinct quantizers that read it: after `share_quantizers`, at most
    one per grid (bits, symmetry). A block's input is the tensor of the graph calling the block."""
    out: dict[str, list[ActQuantizer]] = {}
    key: dict[tuple[int, fx.Node], str] = {}  # (graph, node) -> the tensor's name, where it is a block input
    for path, m in model.named_modules():  # parents before the blocks they call
        if not isinstance(m, fx.GraphModule):
            continue
        for _, block, inputs in _block_calls(m):
            for ph, a in inputs.items():
                root, _ = _alias_root(m, a, moves=False, single_user=False)
                key[(id(block), ph)] = key.get((id(m), root), f"{path}:{root.name}")
        for u in _uses(m, single_user=False):
            qs = out.setdefault(key.get((id(m), u.root), f"{path}:{u.root.name}"), [])
            if all(q is not u.quantizer for q in qs):
                qs.append(u.quantizer)
    return out


def shared_quantizers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Shared activation quantizers: name -> the other placements it serves."""
    return {m.name: tuple(m.shared_with) for m in model.modules() if isinstance(m, ActQuantizer) and m.shared_with}


# ----------------------------------------------------------------------------- public
@dataclass
class Unit:
    """A reconstruction unit: a block (several layers, optimised on its output) or a single layer.

    `inherited`: ids of activation quantizers an earlier unit owns (a quantizer shared by layers of several
    units belongs to the first of them, which learns it; later ones use it as it was left)."""

    name: str
    module: nn.Module
    kind: str  # "block" | "layer"
    inherited: frozenset[int] = frozenset()

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, WeightQuantizer)]

    def act_quantizers(self) -> list[ActQuantizer]:
        """The activation quantizers this unit owns (and learns)."""
        return [m for m in self.module.modules() if isinstance(m, ActQuantizer) and id(m) not in self.inherited]

    def layers(self) -> list[nn.Module]:
        if isinstance(self.module, QUANT_LAYERS):
            return [self.module]
        return [m for m in self.module.modules() if isinstance(m, QUANT_LAYERS)]


def assign_owners(all_units: list[Unit]) -> list[Unit]:
    """Give each activation quantizer to the first unit (in the given order) that contains it; returns the
    units with `inherited` set."""
    seen: set[int] = set()
    out = []
    for u in all_units:
        ids = {id(m) for m in u.module.modules() if isinstance(m, ActQuantizer)}
        out.append(Unit(u.name, u.module, u.kind, frozenset(ids & seen)))
        seen |= ids
    return out


def _find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    types = block_types()
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name and isinstance(m, types) and not any(name.startswith(p + ".") for p in out):
            out[name] = m
    return out


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    from ..models import get_preprocessing

    c, h, w = get_preprocessing(model).input_size
    p = next(model.parameters(), None)
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0)).to(
        p.device if p is not None else "cpu")


def execution_order(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    run_with_pre_hooks(model, x, modules, lambda n, _a, _kw: order.append(n) if n not in order else None)
    return order


def output_layers(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """The layers of `modules` whose output reaches the model's output through no other of them: the classifier,
    and both heads of a distilled network (LeViT, RepViT, DeiT-distilled average a head and a distillation head),
    found by walking the autograd graph of one forward back from the output and stopping at each layer's output.
    In call order; empty when the output is not differentiable."""
    outputs: dict[Any, str] = {}

    def hook(name: str) -> Callable[..., None]:
        def post(_m: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                outputs.setdefault(out.grad_fn, name)
        return post

    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            y = model(x.clone().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    roots = [t.grad_fn for t in (y if isinstance(y, (tuple, list)) else (y,))
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found: set[str] = set()
    seen: set[Any] = set()
    while roots:
        fn = roots.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in outputs:
            found.add(outputs[fn])
            continue
        roots.extend(nxt for nxt, _ in fn.next_functions)
    return [n for n in dict.fromkeys(outputs.values()) if n in found]


def prepare(model: nn.Module, cfg: QuantConfig) -> fx.GraphModule:
    """Fold BN and insert (uninitialised) quantizers; the returned model computes in float until
    scales are set. Raises MixqError for a model with no quantizable layer."""
    cfg.validate()
    _check_float_layers(model, cfg)
    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())),
               None)
    if bad is not None:  # it would quantize to an all-zero channel with scale 1 and pass every later check
        raise MixqError(f"parameter {bad} of {type(model).__name__} holds NaN or inf: fix the checkpoint first")
    original, model = model, copy.deepcopy(model).eval()
    _disable_fused_attn(model)
    blocks = _find_blocks(model)  # tracing a leaf keeps its submodules and their paths, blocks included
    traced_leaves: list[str] = []
    if cfg.placement >= 4:  # see inside the modules timm keeps opaque to torch.fx (quant.tracing)
        traced_leaves, _ = trace_leaves(model, example_input(model), blocks.values())
    rows = bn1d_on_rows(model) if cfg.placement >= 3 else set()
    gm = _transform(model, "", blocks.values(), cfg, rows)
    for path in blocks:
        try:
            sub = _get(gm, path)
        except AttributeError:
            continue  # a block the forward never calls
        _set(gm, path, _transform(sub, path + ".", (), cfg, rows))
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, QUANT_LAYERS)}
    if not layers:
        raise MixqError(f"model {type(model).__name__} has no quantizable layer (Conv2d/Linear)")
    floats = {n: m for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and is_float_layer(n, cfg)}
    gm.mixq_float_layers = tuple(floats)  # type: ignore[attr-defined]
    # the first/last policy is about the network's first and last layers: a float one takes it with it
    x = example_input(gm)
    try:
        every = execution_order(gm, {**layers, **floats}, x)
    except Exception as e:  # noqa: BLE001 - the model's own code refusing its input (a fixed-size ViT, ...)
        raise MixqError(f"{type(model).__name__} fails on a {'x'.join(map(str, x.shape[1:]))} input "
                        f"({' '.join(str(e).split())[:200]}): give an --input-size it accepts") from None
    order = [n for n in every if n in layers]
    gm.mixq_first_last = ()  # type: ignore[attr-defined]  # layers the first/last-layer policy set (QAT keeps them fixed)
    if cfg.first_last_bits is not None and every and not cfg.block_size:
        last = (output_layers(gm, {**layers, **floats}, x) if cfg.placement >= 6 else []) or [every[-1]]
        ends = [n for n in dict.fromkeys((every[0], *last)) if n in layers]
        gm.mixq_first_last = tuple(ends)  # type: ignore[attr-defined]
        for n in set(ends):
            layer = layers[n]
            layer.weight_quantizer.bits = cfg.first_last_bits
            if layer.input_quantizer is not None:
                layer.input_quantizer.bits = cfg.first_last_bits
    if cfg.share_quantizers and not cfg.weight_only:  # after the bit policy: only equal grids merge
        share_quantizers(gm, across_blocks=cfg.placement >= 2, shape_readers=cfg.placement >= 4)
    if cfg.integer_pools and not cfg.weight_only:  # after both: a pool takes its consumer's bits and quantizer
        if quantize_pools(gm, ceil_mode=cfg.placement >= 5) and cfg.share_quantizers:
            share_quantizers(gm, across_blocks=cfg.placement >= 2, shape_readers=cfg.placement >= 4)  # a pool's input quantizer joins an equal one on the same tensor (a conv's)
    gm.mixq_units = _units(gm, blocks, order)  # type: ignore[attr-defined]
    gm.mixq_unquantized = _unquantized_layers(gm, cfg)  # type: ignore[attr-defined]
    gm.mixq_traced_leaves = tuple(traced_leaves)  # type: ignore[attr-defined]
    _check_float_equivalence(original, gm, example_input(gm))
    return gm


UNQUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
                 nn.MultiheadAttention)


def _unquantized_layers(gm: nn.Module, cfg: QuantConfig) -> tuple[str, ...]:
    """Conv/linear-like modules that stay float without the user asking (--float-layers): transposed or
    reflect-padded convs, subclasses with their own forward, attention modules, layers inside modules torch.fx
    does not trace into. Reported, so that low INT8 coverage is never silent (`build --require-int8` judges it)."""
    out = []
    for n, m in gm.named_modules():
        if not isinstance(m, UNQUANTIZABLE) or is_float_layer(n, cfg):
            continue
        if cfg.block_size and not isinstance(m, nn.Linear):
            continue  # INT4 weight-only: only Linear layers are quantized, by design
        if any(n.startswith(o + ".") for o in out):
            continue  # inside one already listed (an attention module's projections)
        out.append(n)
    return tuple(out)


FLOAT_TOLERANCE = 1e-2  # of the outputs' largest magnitude: BN folding and unfused attention stay far below


def _check_float_equivalence(original: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    """Before any scale is set the prepared model computes in float and must be the user's model: a layer whose
    forward it does not reproduce (a weight transform, a padding, a custom op) would otherwise be quantized as
    another network, and every later stage, verify included, would agree with that other network."""
    was = original.training
    original.eval()
    try:
        with torch.no_grad():
            ref, out = original(x), gm(x)
    finally:
        original.train(was)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)) or ref.shape != out.shape \
            or not bool(torch.isfinite(ref).all()):
        return  # several outputs, or an untrained net that overflows: nothing to compare on
    top = float(ref.abs().max())
    err = float((out.float() - ref.float()).abs().max())
    if not err <= FLOAT_TOLERANCE * top + 1e-6:
        raise MixqError(f"{type(original).__name__}: the prepared model differs from the float model by {err:.3g} "
                        f"(outputs up to {top:.3g}) before any quantization: a layer whose forward mixq-onnx does "
                        "not reproduce; leave it float with --float-layers")


def _units(gm: nn.Module, blocks: dict[str, nn.Module], layer_order: list[str]) -> list[str]:
    """Unit names in execution order: blocks, and layers outside any block."""
    out: list[str] = []
    for n in layer_order:
        owner = next((b for b in blocks if n.startswith(b + ".")), None)
        name = owner or n
        if name not in out:
            out.append(name)
    return out


def units(gm: nn.Module) -> list[Unit]:
    out = []
    for name in gm.mixq_units:  # type: ignore[attr-defined]
        m = _get(gm, name)
        out.append(Unit(name, m, "layer" if isinstance(m, QUANT_LAYERS) else "block"))
    return assign_owners(out)


def quantizers(model: nn.Module) -> dict[str, WeightQuantizer | ActQuantizer]:
    """Every quantizer by placement name, in module order."""
    return {m.name: m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))}


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.enabled = acts

