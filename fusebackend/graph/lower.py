"""Lowering: an FX graph of ATen ops (from AOT autograd) -> FusionGraph."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import effects, foreach, pools, registry, splits
from .meta_rules import real_multi_meta
from .fusion_graph import FusionGraph, OpNode, Ref, TensorMeta, ref_names_in


def _meta_of(val):
    if isinstance(val, torch.Tensor):
        return TensorMeta.of(val), None
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) or v is None for v in val):
        return None, tuple(TensorMeta.of(v) if v is not None else None for v in val)
    return None, None


def _refs(value, alias):
    """Replace fx.Nodes inside args by Refs (getitem nodes become Ref(parent, item))."""
    if isinstance(value, fx.Node):
        return alias.get(value.name, Ref(value.name))
    if isinstance(value, (list, tuple)):
        return type(value)(_refs(v, alias) for v in value)
    if isinstance(value, dict):
        return {k: _refs(v, alias) for k, v in value.items()}
    return value


def _cost(kind, meta, target, args, fg):
    if meta is None:
        return 0, 0
    numel = meta.numel if meta.is_static else 0
    itemsize = meta.dtype.itemsize
    name = getattr(target, "__name__", "")
    if name.startswith(("mm.", "addmm.", "bmm.")) and meta.is_static:
        a = fg.node(args[1].name if name.startswith("addmm") else args[0].name).meta
        k = a.shape[-1] if a and a.is_static else 0
        return 2 * numel * k, numel * itemsize
    return numel * (1 if kind != "opaque" else 0), numel * itemsize


class TensorConstant:
    """A tensor the graph holds (get_attr: a lifted constant, e.g. torch.tensor(-inf) inside the model);
    the node's target, so running the node returns it without a launch."""

    __name__ = "constant"

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self) -> torch.Tensor:
        return self.value


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def lower(gm: fx.GraphModule) -> FusionGraph:
    if pools.rewrite_max_pools(gm):
        gm.recompile()       # the module itself stays runnable (an ATen fallback runs it)
    fg = FusionGraph()
    alias: dict[str, Ref] = {}
    pieces: dict[str, list] = {}          # split node -> (view target, args) of each item (graph/splits.py)
    items: dict[str, list] = {}           # foreach node -> node name of each item (graph/foreach.py)
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            meta, _ = _meta_of(val)
            kind = "placeholder" if meta is not None else "symbol"
            node = fg.add(OpNode(n.name, kind, meta=meta, device=meta.device if meta else "cpu",
                                 sym_expr=_sym_expr(val)))
            if kind == "symbol" and isinstance(val, torch.SymInt):
                fg.symbols[str(val)] = n.name
            fg.inputs.append(n.name)
        elif n.op == "call_function" and n.target is operator.getitem and getattr(n.args[0], "name", None) in pieces:
            target, args = pieces[n.args[0].name][n.args[1]]
            meta, _ = _meta_of(val)
            kind = registry.classify(target, args, {})
            node = OpNode(n.name, kind, target, args, {}, meta, device=meta.device)
            node.flops, node.bytes = _cost(kind, meta, target, args, fg)
            fg.add(node, [args[0].name])
        elif n.op == "call_function" and n.target is operator.getitem and getattr(n.args[0], "name", None) in items:
            alias[n.name] = Ref(items[n.args[0].name][n.args[1]])
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            alias[n.name] = Ref(n.args[0].name, n.args[1])
        elif n.op == "call_function" and foreach.is_foreach(n.target) and \
                _expand_foreach(fg, n, _refs(n.args, alias), _refs(dict(n.kwargs), alias), items):
            pass
        elif n.op == "call_function" and splits.as_views(n, None) is not None:
            pieces[n.name] = splits.as_views(n, _refs(n.args[0], alias))
        elif n.op == "call_function":
            args = _refs(n.args, alias)
            kwargs = _refs(dict(n.kwargs), alias)
            meta, multi = _meta_of(val)
            multi = real_multi_meta(n.target, args, multi, fg.meta_of)
            kwargs = _drop_same_device(n, kwargs)
            kind = registry.classify(n.target, args, kwargs, fg.meta_of, meta) if meta is not None else "opaque"
            deps = sorted(set(ref_names_in(args, []) + ref_names_in(kwargs, [])))
            device = meta.device if meta else _first_device(fg, deps)
            node = OpNode(n.name, kind, n.target, args, kwargs, meta, multi, device=device,
                          sym_expr=_sym_expr(val) if meta is None and multi is None else None)
            node.flops, node.bytes = _cost(kind, meta, n.target, args, fg)
            fg.add(node, deps)
        elif n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.Tensor):
            value = _attr(gm, n.target)
            meta = TensorMeta.of(value)
            fg.add(OpNode(n.name, "constant", TensorConstant(value), (), {}, meta, device=meta.device))
        elif n.op == "output":
            outs = n.args[0]
            fg.outputs = list(_refs(tuple(outs) if isinstance(outs, (list, tuple)) else (outs,), alias))
        else:
            raise NotImplementedError("FX node kind %r (%s) is not supported" % (n.op, n.format_node()))
        if n.name in fg.g:
            fg.node(n.name).stack_trace = n.meta.get("stack_trace") or ""
    _unbacked_sources(fg)
    effects.order_side_effects(fg)       # collectives and writes keep the graph's order
    return fg


def _sym_expr(val):
    """The text of a symbolic int value (a SymInt input, sym_size, arithmetic on sizes), else None: such a
    value reaches a kernel as a scalar argument."""
    if isinstance(val, torch.SymInt):
        return str(val)
    if isinstance(val, int) and not isinstance(val, bool):
        return str(val)
    return None


def _expand_foreach(fg: FusionGraph, n: fx.Node, args, kwargs, items: dict) -> bool:
    def add(name, target, a, kw, meta):
        kind = registry.classify(target, a, kw, fg.meta_of, meta)
        node = OpNode(name, kind, target, a, kw, meta, device=meta.device)
        node.flops, node.bytes = _cost(kind, meta, target, a, fg)
        fg.add(node, sorted(set(ref_names_in(a, []) + ref_names_in(kw, []))))
    names = foreach.expand(n.name, n.target, args, kwargs, n.meta.get("val"), fg.meta_of, add)
    if names is not None:
        items[n.name] = names
    return names is not None


def _drop_same_device(n: fx.Node, kwargs: dict) -> dict:
    """A cast that names the device its input is already on (HF rotary: x.to(dtype, device=x.device)) is a
    cast, not a transfer: the device argument goes."""
    if "device" not in kwargs or getattr(n.target, "__name__", "").split(".")[0] != "_to_copy":
        return kwargs
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    val = src.meta.get("val") if src is not None else None
    if not isinstance(val, torch.Tensor) or kwargs["device"] is None or torch.device(kwargs["device"]) != val.device:
        return kwargs
    return {k: v for k, v in kwargs.items() if k != "device"}


def _unbacked_sources(fg: FusionGraph) -> None:
    """Symbols no input provides (data-dependent sizes, e.g. after nonzero): read off the first value
    whose shape has that symbol as a dim, once it exists at run time."""
    for node in fg.nodes():
        metas = [(None, node.meta)] if node.meta is not None else list(enumerate(node.multi_meta or ()))
        for item, meta in metas:
            if meta is None:
                continue
            for d, size in enumerate(meta.shape):
                if isinstance(size, str) and size.isidentifier() and size not in fg.symbols:
                    fg.symbol_sources.setdefault(size, (node.name, item, d))


def _first_device(fg, deps):
    for d in deps:
        node = fg.node(d)
        if node.meta is not None:
            return node.meta.device
        if node.multi_meta:
            return next((m.device for m in node.multi_meta if m is not None), "cpu")
    return "cpu"
