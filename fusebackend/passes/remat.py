"""Rematerialisation: a value computed from indices and constants alone (an attention mask built from
arange, full and where) is recomputed in each kernel that reads it, instead of being written once and read
back by every layer. Reading it back costs a kernel and its bytes; computing it costs a few instructions.

A pass: FusionGraph -> FusionGraph. The value's cone (the node and its producers, all index- or constant-
generated) is copied once per fusable reader and the original dropped; the vertical pass then fuses each
copy into its reader's kernel. Values a graph output or an ATen call reads stay as they are.
"""
from __future__ import annotations

from ..graph.fusion_graph import FusionGraph, OpNode, Ref
from .groups import FUSABLE

MAX_CONE = 48       # nodes: a larger generated value is written once rather than copied into every reader


def generated(fg: FusionGraph) -> set:
    """Pointwise and view nodes whose every operand is itself generated (or a size symbol, or arithmetic on
    sizes: a symbolic int the kernel takes as an argument)."""
    gen = set()
    for node in fg.nodes():
        if node.kind not in ("pointwise", "view") or node.meta is None:
            continue
        if all(p in gen or fg.node(p).kind == "symbol" or fg.node(p).sym_expr is not None
               for p in fg.producers(node.name)):
            gen.add(node.name)
    return gen


def _cone(fg: FusionGraph, name: str, gen: set) -> list:
    seen, stack = set(), [name]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(p for p in fg.producers(n) if p in gen)
    return sorted(seen, key=lambda n: fg.node(n).index)


def _remap(x, mapping: dict):
    if isinstance(x, Ref):
        return Ref(mapping.get(x.name, x.name), x.item)
    if isinstance(x, (list, tuple)):
        return type(x)(_remap(v, mapping) for v in x)
    if isinstance(x, dict):
        return {k: _remap(v, mapping) for k, v in x.items()}
    return x


def _copy_cone(fg: FusionGraph, cone: list, tag: str, before: float, order: dict) -> dict:
    mapping = {}
    for k, n in enumerate(cone):
        node = fg.node(n)
        copy = OpNode("%s_%s" % (n, tag), node.kind, node.target, _remap(node.args, mapping),
                      _remap(node.kwargs, mapping), node.meta, node.multi_meta, flops=node.flops,
                      bytes=node.bytes, device=node.device)
        fg.add(copy, [mapping.get(p, p) for p in fg.producers(n)])
        order[copy.name] = (before, k)
        mapping[n] = copy.name
    return mapping


def rematerialize(fg: FusionGraph, max_cone: int = MAX_CONE) -> FusionGraph:
    """Copy each generated value into every kernel that reads it (in place), where that saves a kernel: the
    value has several readers, or its cone shares nodes with another's (a bool mask turned into one float
    mask per layer: written together, they would be one kernel with an output per layer)."""
    gen = generated(fg)
    outputs = fg.output_names()
    order = {n.name: (n.index, 0) for n in fg.nodes()}
    # values an ATen call or the graph's output needs, with their cones, stay written: copying a cone that
    # shares them saves no kernel, and the copies could split the kernel that writes them (HF Llama's
    # position ids, read by `index` and by the mask, on the GPU)
    pinned = set()
    for n in gen:
        if n in outputs or any(u not in gen and fg.node(u).kind not in FUSABLE for u in fg.users(n)):
            pinned.update(_cone(fg, n, gen))
    plans = []
    for f in sorted(gen, key=lambda n: fg.node(n).index):
        readers = sorted((u for u in fg.users(f) if u not in gen), key=lambda u: fg.node(u).index)
        if f in outputs or not readers or any(fg.node(u).kind not in FUSABLE for u in readers):
            continue
        cone = _cone(fg, f, gen)
        if len(cone) <= max_cone and not pinned.intersection(cone):
            plans.append((f, readers, cone))
    shared = {}
    for _, _, cone in plans:
        for n in cone:
            shared[n] = shared.get(n, 0) + 1
    copies = 0
    for f, readers, cone in plans:
        if len(readers) == 1 and all(shared[n] == 1 for n in cone):
            continue                             # one reader, nothing shared: the vertical pass fuses it as is
        for u in readers:
            copies += 1
            mapping = _copy_cone(fg, cone, "r%d" % copies, fg.node(u).index - 0.5, order)
            reader = fg.node(u)
            reader.args, reader.kwargs = _remap(reader.args, {f: mapping[f]}), _remap(reader.kwargs, {f: mapping[f]})
            fg.g.remove_edge(f, u)
            fg.g.add_edge(mapping[f], u)
    if copies:
        _drop_dead(fg, gen, outputs, order)
        for i, name in enumerate(sorted(order, key=order.get)):   # copies sit just before their reader
            fg.node(name).index = i
    return fg


def _drop_dead(fg: FusionGraph, gen: set, outputs: set, order: dict) -> None:
    """Originals whose every reader now reads a copy."""
    dead = [n for n in gen if not fg.users(n) and n not in outputs]
    while dead:
        n = dead.pop()
        producers = fg.producers(n)
        fg.g.remove_node(n)
        del order[n]
        dead.extend(p for p in producers if p in gen and p in order and not fg.users(p) and p not in outputs)
