"""Scalars recomputed in their readers: a one-element value computed from one-element values alone is
recomputed in every bigger kernel that reads it, instead of being written by a kernel of its own and read
back.

An optimizer step computes, per parameter, its bias corrections (1 - beta ** step, their square roots and
reciprocals) from the step counter, and clip_grad_norm_ one clip coefficient from the total norm: a few scalar
ops each, read by the parameter's update. Written by a kernel of their own they are one more launch per
horizontal batch and, per call, one small output each (400 for AdamW over 200 tensors) that the runtime has to
allocate and hand over. Recomputed, each costs a few instructions per element of a kernel that is
memory-bound anyway, and that kernel reads the step counter itself.

A pass: FusionGraph -> FusionGraph (in place), after passes/remat.py. The cone of one-element pointwise and
view nodes a reader needs is copied once per reader (a pointwise node of more than one element) and the
originals nothing reads any more are dropped. A copy keeps the order edges of its original (graph/effects.py):
one that reads the step counter still runs before the store that advances it; a reader that would have to run
after such a store is left as it was. The cone's leaves are one-element values of any kind (inputs, constants,
ATen results, symbolic ints); copies never include a store (passes/inplace.py) or an op that draws random
numbers (only pointwise and view nodes are copied).
"""
from __future__ import annotations

import networkx as nx
import torch

from ..graph.effects import buffer_roots, buffer_writers
from ..graph.fusion_graph import FusionGraph, OpNode, Ref, ref_names_in
from ..graph.registry import is_store

MAX_CONE = 48      # nodes copied into one reader; a larger scalar computation is written once
HALF = (torch.float16, torch.bfloat16)


def _one(meta) -> bool:
    return meta is not None and meta.is_static and meta.numel == 1


def _refs(value, out):
    if isinstance(value, Ref):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _refs(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _refs(v, out)
    return out


def _reads(node) -> list:
    return ref_names_in((node.args, node.kwargs), [])


def scalar_values(fg: FusionGraph) -> set:
    """Pointwise and view nodes of one element whose every operand is a one-element value (or a symbolic int).
    Not of a half type: a kernel keeps the values it computes in float32, where eager rounds each op's result
    (a half value read back from memory is the rounded one, as eager's)."""
    scal = set()
    for node in fg.nodes():
        if node.kind not in ("pointwise", "view") or is_store(node) or not _one(node.meta) \
                or node.meta.dtype in HALF:
            continue
        ok = True
        for ref in _refs((node.args, node.kwargs), []):
            if ref.name in scal:
                continue
            src = fg.node(ref.name)
            if src.kind == "symbol" or (src.sym_expr is not None and src.meta is None):
                continue
            if not _one(fg.meta_of(ref)):
                ok = False
                break
        if ok:
            scal.add(node.name)
    return scal


def _cone(fg: FusionGraph, tips, scal: set) -> list:
    seen, stack = set(), list(tips)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(r for r in _reads(fg.node(n)) if r in scal)
    return sorted(seen, key=lambda n: fg.node(n).index)


def _remap(x, mapping: dict):
    if isinstance(x, Ref):
        return Ref(mapping[x.name], x.item) if x.name in mapping else x
    if isinstance(x, (list, tuple)):
        return type(x)(_remap(v, mapping) for v in x)
    if isinstance(x, dict):
        return {k: _remap(v, mapping) for k, v in x.items()}
    return x


def _must_precede(fg: FusionGraph, name: str, roots: dict, writers: dict) -> set:
    """What a copy of `name` has to run before: the targets of its order edges, and every later writer of a
    buffer it reads (a data edge to that writer -- the step counter's add, read by the copy_ that stores it --
    hides the write after read from graph/effects.py's order edges)."""
    out = {s for s in fg.users(name) if fg.g.edges[name, s].get("order")}
    at = fg.node(name).index
    for r in _reads(fg.node(name)):
        out.update(w for w in writers.get(roots.get(r, r), ()) if fg.node(w).index > at)
    return out


def rematerialize_scalars(fg: FusionGraph, max_cone: int = MAX_CONE) -> FusionGraph:
    scal = scalar_values(fg)
    if not scal:
        return fg
    outputs = fg.output_names()
    roots = buffer_roots(fg)
    writers = buffer_writers(fg, roots)
    order = {n.name: (n.index, 0) for n in fg.nodes()}
    readers = [n for n in fg.nodes() if n.kind == "pointwise" and n.name not in scal and n.meta is not None
               and not _one(n.meta) and any(r in scal for r in _reads(n))]
    copies = 0
    for reader in readers:
        tips = sorted({r for r in _reads(reader) if r in scal}, key=lambda n: fg.node(n).index)
        cone = _cone(fg, tips, scal)
        if len(cone) > max_cone:
            continue
        precede = {n: _must_precede(fg, n, roots, writers) for n in cone}
        if any(nx.has_path(fg.g, s, reader.name) for n in cone for s in precede[n]):
            continue                    # the reader runs after a write its copy would have to precede
        copies += 1
        mapping = {}
        for k, n in enumerate(cone):
            node = fg.node(n)
            copy = OpNode("%s_s%d" % (n, copies), node.kind, node.target, _remap(node.args, mapping),
                          _remap(node.kwargs, mapping), node.meta, node.multi_meta, flops=node.flops,
                          bytes=node.bytes, device=node.device, sym_expr=node.sym_expr,
                          stack_trace=node.stack_trace)
            fg.add(copy)
            for p in fg.producers(n):
                fg.g.add_edge(mapping.get(p, p), copy.name, **fg.g.edges[p, n])
            for s in precede[n]:
                fg.g.add_edge(copy.name, s, order=True)
            order[copy.name] = (reader.index - 0.5, k)
            mapping[n] = copy.name
        reader.args, reader.kwargs = _remap(reader.args, mapping), _remap(reader.kwargs, mapping)
        for t in tips:
            fg.g.remove_edge(t, reader.name)
            fg.g.add_edge(mapping[t], reader.name)
    if not copies:
        return fg
    _drop_unread(fg, scal, outputs, order)
    for i, name in enumerate(sorted(order, key=order.get)):    # copies sit just before their reader
        fg.node(name).index = i
    return fg


def _drop_unread(fg: FusionGraph, scal: set, outputs: set, order: dict) -> None:
    """Originals whose value nothing reads any more (order edges alone keep nothing alive)."""
    def unread(n):
        return n in fg.g and n not in outputs and not any(n in _reads(fg.node(u)) for u in fg.users(n))
    stack = [n for n in scal if unread(n)]
    while stack:
        n = stack.pop()
        if not unread(n):
            continue
        producers = [p for p in _reads(fg.node(n)) if p in scal]
        fg.g.remove_node(n)
        del order[n]
        stack.extend(p for p in producers if unread(p))
