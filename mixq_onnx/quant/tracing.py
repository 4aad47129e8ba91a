"""torch.fx tracing for `quant.graph`, including into the modules timm keeps opaque.

timm registers some modules as fx leaves (`timm.layers._fx`): ConViT's GPSA, NFNet's NormFreeBlock, MobileViT's
block, TinyViT's block, EfficientViT's LiteMLA, VGG's ConvMlp. A leaf is one opaque call in a traced graph, so
every Conv/Linear/MatMul inside it stayed float. `trace_leaves` (placement revision 4) replaces each such leaf
that holds a Conv2d or Linear with a traced copy of itself (same submodules, same paths), so the placement
rules see inside it like any other code:

- a leaf that traces as it is (NormFreeBlock) becomes its fx graph;
- a leaf whose forward branches on its input's shape (`if H == self.window_size`, `if new_h != H`) is traced
  once on the tensors it received in one example forward (`ConcreteTracer`): each proxy carries that real
  value, a branch or an int() takes the value's answer, and the graph keeps the branch that ran. Shapes
  stay symbolic in the ops, so the batch size may change; only a decision is frozen. Such a leaf is replaced
  only when it was called once and its graph gives the leaf's own output on that input and on the input
  with the batch doubled; otherwise it stays a float leaf (`unquantized_layers` lists its layers).
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MixqError
from .modules import QUANT_LAYERS
from .quantizer import ActQuantizer

KEEP_ATTRS = ("mixq_preprocessing", "mixq_source", "num_classes", "pretrained_cfg", "default_cfg")


def timm_leaf_types() -> tuple[type, ...]:
    try:
        from timm.layers._fx import _leaf_modules
    except ImportError:  # pragma: no cover  (no timm, or one without the registry)
        return ()
    return tuple(_leaf_modules)


def _timm_autowrap() -> tuple:
    try:
        from timm.layers._fx import _autowrap_functions
    except ImportError:  # pragma: no cover
        return ()
    return tuple(_autowrap_functions)


#: the buffers of the modules `trace_concrete` traced: every later trace hands out a proxy for them (only them: a
#: proxy for every buffer would turn a check on a buffer's shape elsewhere into a trace error)
_PROXIED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


class Tracer(fx.Tracer):
    """Stops at Conv/Linear/BatchNorm/quantizer modules, at timm's registered leaves, and at `leaves`."""

    def __init__(self, leaves: Iterable[nn.Module] = ()):
        super().__init__(autowrap_functions=_timm_autowrap())
        self._timm_leaves = timm_leaf_types()
        self._leaf_ids = {id(m) for m in leaves}

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if isinstance(attr_val, torch.Tensor) and _PROXIED.get(id(attr_val)) is attr_val:
            was, self.proxy_buffer_attributes = self.proxy_buffer_attributes, True  # a traced leaf's tensor attribute
            try:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            finally:
                self.proxy_buffer_attributes = was
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaf_ids:
            return True
        if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm, ActQuantizer, *QUANT_LAYERS)):
            return True
        if self._timm_leaves and isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _graph_module(tracer: fx.Tracer, graph: fx.Graph, module: nn.Module) -> fx.GraphModule:
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    for a in KEEP_ATTRS:
        if hasattr(module, a):
            setattr(gm, a, getattr(module, a))
    return gm


def trace(module: nn.Module, leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    tracer = Tracer(leaves)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot trace {type(module).__name__} with torch.fx: {type(e).__name__}: {str(e)[:160]}") from None
    return _graph_module(tracer, graph, module)


# ----------------------------------------------------------------------------- tracing on example values
def _value(a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda v: v.value if isinstance(v, ConcreteProxy) else v)


#: attribute values a proxy hands out as they are: they describe the tensor, they do not flow through the graph
_PLAIN_ATTRS = (torch.device, torch.dtype, str, bool, int, type(None))


class ConcreteProxy(fx.Proxy):
    """A proxy that also holds the real value its node computed on the example input."""

    value: Any = None

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k == "value":
            raise AttributeError(k)
        v = getattr(self.value, k)
        if isinstance(v, _PLAIN_ATTRS):  # x.device, x.dtype, x.ndim: the example's (they do not depend on the batch)
            return v
        a = ConcreteAttribute(self, k)
        a.value = v
        return a

    # a decision or a Python number taken from a traced value: the example's answer, frozen into the graph
    # (no __index__ or __len__: torch's argument parser would then take a proxy for an int or a size list and never
    # dispatch the call to the proxy, so `t.expand(B, -1)` would not be recorded)
    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __ceil__(self) -> int:
        return math.ceil(self.value)

    def __floor__(self) -> int:
        return math.floor(self.value)


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    pass


class ConcreteTracer(Tracer):
    """`Tracer` that runs every op on the example values as it records it (`ConcreteProxy.value`)."""

    def __init__(self, args: tuple, kwargs: dict[str, Any], leaves: Iterable[nn.Module] = ()):
        super().__init__(leaves)
        self._args, self._kwargs, self._next = list(args), dict(kwargs), 0
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._evaluating = True  # torch.fx patches Module.__call__/__getattr__ while it traces: run them plainly
        try:
            p.value = self._evaluate(kind, target, _value(args), _value(kwargs))
        finally:
            self._evaluating = False
        return p

    def _evaluate(self, kind: str, target: Any, a: Any, kw: Any) -> Any:
        if kind == "placeholder":
            if target in self._kwargs:
                v = self._kwargs[target]
            elif self._next < len(self._args):
                v, self._next = self._args[self._next], self._next + 1
            else:
                v = a[0] if a else None  # the parameter's default
        elif kind == "get_attr":
            v = functools.reduce(getattr, target.split("."), self.root)
        elif kind == "call_function":
            v = target(*a, **kw)
        elif kind == "call_method":
            v = getattr(a[0], target)(*a[1:], **kw)
        elif kind == "call_module":
            v = self.root.get_submodule(target)(*a, **kw)
        else:  # pragma: no cover
            v = None
        return v

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(obj.value)

    def iter(self, obj: fx.Proxy):  # noqa: ANN201 - whatever the value iterates as
        return (obj[i] for i in range(len(obj.value)))


def _proxy_buffers(module: nn.Module) -> None:
    """The module's buffers, and its plain tensor attributes made non-persistent buffers, are handed out as
    proxies by every later trace (ConViT's `self.rel_indices`): torch.fx does so only for parameters, and a real
    tensor meeting a proxy (`rel_indices.expand(B, -1, -1, -1)`) is an error, not a recorded op."""
    for m in module.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                delattr(m, k)
                m.register_buffer(k, v, persistent=False)
    for b in module.buffers():
        _PROXIED[id(b)] = b


def trace_concrete(module: nn.Module, args: tuple, kwargs: dict[str, Any],
                   leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    """Trace `module` on one example call: the branches its forward takes on that input are kept. Plain tensor
    attributes of `module` become non-persistent buffers (same values, same names)."""
    _proxy_buffers(module)
    clone = functools.partial(fx.node.map_aggregate, fn=lambda v: v.clone() if isinstance(v, torch.Tensor) else v)
    tracer = ConcreteTracer(clone(args), clone(kwargs), leaves)  # an in-place op in the forward edits the copies
    with torch.no_grad():
        graph = tracer.trace(module)
    return _graph_module(tracer, graph, module)


# ----------------------------------------------------------------------------- timm's leaves
def _has_layer(m: nn.Module) -> bool:
    return any(isinstance(c, (nn.Conv2d, nn.Linear)) for c in m.modules())


def _doubled(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, a]) if a.dim() else a
    if isinstance(a, (tuple, list)):
        return type(a)(_doubled(x) for x in a)
    if isinstance(a, dict):
        return {k: _doubled(v) for k, v in a.items()}
    return a


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _reproduces(traced: nn.Module, leaf: nn.Module, args: tuple, kwargs: dict) -> bool:
    try:
        with torch.no_grad():
            return all(_same(traced(*a, **kw), leaf(*a, **kw))
                       for a, kw in ((args, kwargs), (_doubled(args), _doubled(kwargs))))
    except Exception:  # noqa: BLE001 - a graph that fails where the leaf does not is a graph that is wrong
        return False


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def run_with_pre_hooks(model: nn.Module, x: torch.Tensor, modules: dict[str, nn.Module],
                       seen: Callable[[str, tuple, dict], Any]) -> None:
    """One no-grad forward of `model` on `x` that calls `seen(name, args, kwargs)` before each call of
    `modules[name]` (what it returns is dropped: a pre-hook's return value would replace the arguments)."""
    def hook(name: str) -> Callable[..., None]:
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen(name, args, kwargs)
        return pre

    hooks = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def trace_leaves(model: nn.Module, x: torch.Tensor, leaves: Iterable[nn.Module] = (),
                 types: tuple[type, ...] | None = None) -> tuple[list[str], list[str]]:
    """Replace, in place, every module of `types` (default: timm's fx leaves) in `model` that holds a
    Conv2d/Linear with its traced graph (innermost first, so an outer leaf's trace already sees through the inner
    ones); `leaves` (the reconstruction blocks) stay opaque inside the traced graphs. `x` is the example input
    the leaves' example calls come from. Returns (traced, kept): the paths replaced and the paths that stay
    leaves because no faithful graph of them was found."""
    types = timm_leaf_types() if types is None else types
    ours = (nn.Conv2d, nn.Linear, _BatchNorm, ActQuantizer, *QUANT_LAYERS)
    found = {n: m for n, m in model.named_modules()
             if n and types and isinstance(m, types) and not isinstance(m, ours) and _has_layer(m)}
    if not found:
        return [], []
    calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in found}
    run_with_pre_hooks(model, x, found, lambda n, a, kw: calls[n].append((a, kw)))
    traced, kept = [], []
    for name in sorted(found, key=lambda n: -n.count(".")):
        leaf = found[name]
        if not calls[name]:
            continue  # the forward never calls it
        args, kwargs = calls[name][0]
        gm = None
        try:
            gm = trace(leaf, leaves)
        except MixqError:
            if len(calls[name]) == 1:  # a graph frozen to one call's branches serves that call only
                try:
                    gm = trace_concrete(leaf, args, kwargs, leaves)
                except Exception:  # noqa: BLE001 - a forward this tracer cannot follow stays a leaf
                    gm = None
        if gm is not None and all(_reproduces(gm, leaf, a, kw) for a, kw in calls[name][:1]):
            _set(model, name, gm)
            traced.append(name)
        else:
            kept.append(name)
    return sorted(traced), sorted(kept)
