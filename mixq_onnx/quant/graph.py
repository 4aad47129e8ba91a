"""Turn a float network into a fake-quantized one, with quantizers exactly where the QDQ export puts
Q/DQ (TensorRT's placement rules):

- BatchNorm folded into the preceding convolution;
- every Conv2d/Linear -> QuantConv2d/QuantLinear (per-channel weight quantizer + input quantizer);
- MatMul inputs (attention q·kᵀ and attn·v) quantized;
- a residual add gets a quantizer on its identity input only, never between a conv and the add it
  feeds (TensorRT fuses that add into the conv's epilogue).

Reconstruction units (residual blocks, transformer blocks) are traced with torch.fx one at a time,
so each unit stays a callable submodule the reconstruction loop can run alone.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MixqError
from ..registry import Registry, resolve
from .config import QuantConfig
from .modules import QUANT_LAYERS, QuantConv2d, QuantLinear
from .quantizer import ActQuantizer, WeightQuantizer

KEEP_ATTRS = ("mixq_preprocessing", "mixq_source", "num_classes", "pretrained_cfg", "default_cfg")

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_SHAPE_METHODS = {"reshape", "view", "permute", "transpose", "contiguous", "flatten", "squeeze", "unsqueeze"}
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


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Iterable[nn.Module] = ()):
        try:
            from timm.layers._fx import _autowrap_functions, _leaf_modules

            autowrap, self._timm_leaves = tuple(_autowrap_functions), tuple(_leaf_modules)
        except ImportError:  # pragma: no cover
            autowrap, self._timm_leaves = (), ()
        super().__init__(autowrap_functions=autowrap)
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaf_ids:
            return True
        if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm, ActQuantizer, *QUANT_LAYERS)):
            return True
        if self._timm_leaves and isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module, leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot trace {type(module).__name__} with torch.fx: {type(e).__name__}: {str(e)[:160]}") from None
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    for a in KEEP_ATTRS:
        if hasattr(module, a):
            setattr(gm, a, getattr(module, a))
    return gm


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
def fold_bn(conv: nn.Conv2d, bn: _BatchNorm) -> None:
    w = conv.weight.detach()
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(std)
    k = gamma / std
    conv.weight = nn.Parameter(w * k.view(-1, *([1] * (w.ndim - 1))))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((b - bn.running_mean) * k + beta)


def _fold_graph_bn(gm: fx.GraphModule) -> int:
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(_get(gm, node.target), _BatchNorm):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        conv = _get(gm, prev.target)
        bn = _get(gm, node.target)
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != bn.num_features:
            continue
        fold_bn(conv, bn)
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        tail = [m for m in tail if not isinstance(m, nn.Identity)]
        if tail:  # timm BatchNormAct2d: keep its activation
            _set(gm, node.target, tail[0] if len(tail) == 1 else nn.Sequential(*tail))
        else:
            node.replace_all_uses_with(prev)
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


def _from_layer(gm: fx.GraphModule, node: fx.Node, transparent: tuple[type, ...]) -> bool:
    """True if `node` is (through transparent and shape-only ops) the output of a conv/linear."""
    for _ in range(64):
        if node.op == "call_module":
            m = _get(gm, node.target)
            if isinstance(m, QUANT_LAYERS):
                return True
            if isinstance(m, transparent) and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            return False
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            node = node.args[0]
            continue
        if node.op == "call_function":
            fname = getattr(node.target, "__name__", "")
            if node.target in _SHAPE_FUNCS or fname.startswith("window_reverse"):
                node = node.args[0]
                continue
            if node.target in (operator.mul, torch.mul):  # layer scale: x * gamma
                acts = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
                if len(acts) == 1:
                    node = acts[0]
                    continue
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
        return False
    return False


def _insert_quantizer(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, q: ActQuantizer, attr: str) -> None:
    gm.add_submodule(attr, q)
    with gm.graph.inserting_before(user):
        qn = gm.graph.call_module(attr, (arg,))
    user.replace_input_with(arg, qn)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm"))


def _transform(module: nn.Module, prefix: str, leaves: Iterable[nn.Module], cfg: QuantConfig) -> fx.GraphModule:
    gm = trace(module, leaves)
    _fold_graph_bn(gm)
    abits = None if cfg.weight_only else cfg.abits
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = _get(gm, node.target)
        name = prefix + node.target
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
                side = [_from_layer(gm, a, transparent) for a in args]
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


# ----------------------------------------------------------------------------- public
@dataclass
class Unit:
    """A reconstruction unit: a block (several layers, optimised on its output) or a single layer."""

    name: str
    module: nn.Module
    kind: str  # "block" | "layer"

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, WeightQuantizer)]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, ActQuantizer)]

    def layers(self) -> list[nn.Module]:
        if isinstance(self.module, QUANT_LAYERS):
            return [self.module]
        return [m for m in self.module.modules() if isinstance(m, QUANT_LAYERS)]


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
    hooks = [m.register_forward_pre_hook(lambda _m, _i, n=n: order.append(n) if n not in order else None)
             for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def prepare(model: nn.Module, cfg: QuantConfig) -> fx.GraphModule:
    """Fold BN and insert (uninitialised) quantizers; the returned model computes in float until
    scales are set. Raises MixqError for a model with no quantizable layer."""
    cfg.validate()
    model = copy.deepcopy(model).eval()
    _disable_fused_attn(model)
    blocks = _find_blocks(model)
    gm = _transform(model, "", blocks.values(), cfg)
    for path in blocks:
        try:
            sub = _get(gm, path)
        except AttributeError:
            continue  # a block the forward never calls
        _set(gm, path, _transform(sub, path + ".", (), cfg))
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, QUANT_LAYERS)}
    if not layers:
        raise MixqError(f"model {type(model).__name__} has no quantizable layer (Conv2d/Linear)")
    order = execution_order(gm, layers, example_input(gm))
    gm.mixq_first_last = ()  # type: ignore[attr-defined]  # layers the first/last-layer policy set (QAT keeps them fixed)
    if cfg.first_last_bits is not None and order and not cfg.block_size:
        gm.mixq_first_last = tuple(dict.fromkeys((order[0], order[-1])))  # type: ignore[attr-defined]
        for n in {order[0], order[-1]}:
            layer = layers[n]
            layer.weight_quantizer.bits = cfg.first_last_bits
            if layer.input_quantizer is not None:
                layer.input_quantizer.bits = cfg.first_last_bits
    gm.mixq_units = _units(gm, blocks, order)  # type: ignore[attr-defined]
    return gm


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
    return out


def quantizers(model: nn.Module) -> dict[str, WeightQuantizer | ActQuantizer]:
    """Every quantizer by placement name, in module order."""
    return {m.name: m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))}


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.enabled = acts

