"""Rewriting a whole MoE layer into one `fusebackend::moe_experts` op (graph/moe_op.py).

Where the pattern finder saw a complete layer (pattern_moe_layer.py), its per-expert gathers, FFNs, weight
multiplies and scatter-adds -- and the data-dependent nonzero per expert that each one costs a device sync
for -- are replaced by one op reading the router's hidden input, top-k indices and routing weights, and
every expert's gate / up / down weight. The runtime binds the op to a hybrid CPU/GPU layer that decides per
call where each expert runs. What only the removed nodes read goes with them (their run-time assertions on
the removed sizes too); the expert weights stay graph inputs, now read only by the op, in host memory.
"""
from __future__ import annotations

import dataclasses

import torch

from ..graph import FusionGraph, Ref
from ..graph.moe_op import OP
from ..graph.fusion_graph import OpNode
from ..graph.registry import classify, is_ordered
from .pattern_moe_layer import MoELayer

_TO_COPY = torch.ops.aten._to_copy.default

_ASSERTS = ("_assert_scalar", "_assert_async", "_assert_tensor_metadata", "sym_constrain_range_for_size")


def _keeps_order(node) -> bool:
    if node.target is None or node.kind in ("placeholder", "output"):
        return False
    name = getattr(node.target, "__name__", "")
    return is_ordered(node.target) and not name.startswith(_ASSERTS)


def prune(fg: FusionGraph) -> set:
    """Remove every node no output and no ordered op (a write, a collective) depends on; returns the names.
    Placeholders stay (they are the call's arguments)."""
    live = set(fg.output_names())
    live |= {n.name for n in fg.nodes() if _keeps_order(n)}
    stack = list(live)
    while stack:
        for p in fg.producers(stack.pop()):
            if p not in live:
                live.add(p)
                stack.append(p)
    gone = {n.name for n in fg.nodes() if n.name not in live and n.kind not in ("placeholder", "symbol")}
    for name in gone:
        fg.g.remove_node(name)
    fg.symbol_sources = {s: src for s, src in fg.symbol_sources.items() if src[0] not in gone}
    return gone


def rewrite_layer(fg: FusionGraph, layer: MoELayer, key: int, host_weights: bool = True) -> str:
    """Replace `layer` by one moe_experts node (its `layer` argument: `key`); returns the node's name.
    host_weights: the expert weights become host inputs (placement: the op's runtime stages them); False
    leaves them where they are (passes/moe_rewrite.py)."""
    out = fg.node(layer.output)
    weights = list(dict.fromkeys(Ref(u.input) for trio in layer.expert_weights for u in trio))
    if layer.layout == 0 and any(u.expert_index is not None for trio in layer.expert_weights for u in trio):
        raise ValueError("moe_experts layout 0 reads whole 2-D expert weights; layer %d slices a 3-D one"
                         % layer.layer)
    name = "moe_experts_layer%d" % layer.layer
    hidden_meta = fg.meta_of(layer.hidden)
    # the op returns hidden's dtype; a layer summed in float32 (transformers 5.17's float32 routing weights)
    # gets its dtype back through a cast kernels fuse, so the op's metadata is what it returns
    cast = out.meta is not None and hidden_meta is not None and hidden_meta.dtype != out.meta.dtype
    meta = dataclasses.replace(out.meta, dtype=hidden_meta.dtype) if cast else out.meta
    node = OpNode(name, "opaque", OP, (layer.hidden, layer.idx, layer.weights, weights, key, layer.layout), {},
                  meta, device=out.device)
    node.stack_trace = out.stack_trace
    deps = sorted({layer.hidden.name, layer.idx.name, layer.weights.name} | {w.name for w in weights})
    fg.add(node, deps)
    node.index = out.index + 0.5                       # where the last scatter-add was: after all it reads
    if cast:
        args, kwargs = (Ref(name),), {"dtype": out.meta.dtype}
        conv = OpNode(name + "_cast", classify(_TO_COPY, args, kwargs, fg.meta_of, out.meta), _TO_COPY, args,
                      kwargs, out.meta, device=out.device)
        fg.add(conv, [name])
        conv.index = out.index + 0.75
        name = conv.name
    for user in fg.users(layer.output):
        u = fg.node(user)
        mapping = {layer.output: Ref(name)}
        u.args = _swap(u.args, mapping)
        u.kwargs = _swap(u.kwargs, mapping)
        fg.g.remove_edge(layer.output, user)
        fg.g.add_edge(name, user)
    fg.outputs = [Ref(name, o.item) if isinstance(o, Ref) and o.name == layer.output else o for o in fg.outputs]
    for w in weights if host_weights else ():           # homed in host memory: the op's runtime stages them
        p = fg.node(w.name)
        if p.meta is not None:
            p.meta = dataclasses.replace(p.meta, device="cpu")
        p.device = "cpu"
    prune(fg)
    return name


def _swap(v, mapping):
    if isinstance(v, Ref):
        return mapping.get(v.name, v) if v.item is None else v
    if isinstance(v, (list, tuple)):
        return type(v)(_swap(x, mapping) for x in v)
    if isinstance(v, dict):
        return {k: _swap(x, mapping) for k, x in v.items()}
    return v
