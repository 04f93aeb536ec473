"""Order edges: what a graph's data edges do not say about when an op may run.

Every pass schedules groups by the FusionGraph's edges (vertical fusion refuses merges that would make a cycle
through them, the schedule and the horizontal pass order groups by them). Data edges alone let a pass move
 - a collective or its wait past another one (each rank must issue collectives in one order: the passes
   would reorder them alike on every rank, but the program would no longer be the graph's, and a wait could
   run before the collective of another group it was meant to follow),
 - a write (copy_, set_, resize_, an in-place collective, fsdp.copy_) before an earlier reader of the
   buffer it writes (write after read), or a later reader that names the buffer, not the write's result,
   before the write (read after write).
`order_side_effects` adds those edges (edge data `order=True`), so no pass needs to know about effects. Each
edge follows the graph's own (topological) order, so the graph stays acyclic.
"""
from __future__ import annotations

from . import registry
from .fusion_graph import FusionGraph, Ref, ref_names_in


def _arg(node, key):
    if isinstance(key, str):
        return node.kwargs.get(key)
    return node.args[key] if key < len(node.args) else None


def _add(fg: FusionGraph, a: str, b: str) -> None:
    if a != b and not fg.g.has_edge(a, b):
        fg.g.add_edge(a, b, order=True)


def order_side_effects(fg: FusionGraph) -> list:
    """Add the order edges (in place); returns the ordered ops' names in graph order."""
    root = {}                          # value -> the buffer it aliases (itself for a fresh value)
    readers: dict = {}                 # buffer -> nodes that read it so far
    writer: dict = {}                  # buffer -> the last op that wrote it
    ordered = []
    for node in fg.nodes():
        name = node.name
        if node.target is None or node.kind in ("placeholder", "symbol", "constant"):
            root[name] = name
            continue
        key = registry.aliased_arg(node.target) if hasattr(node.target, "_schema") else None
        if key is None and node.kind == "view" and node.args and isinstance(node.args[0], Ref):
            key = 0
        src = _arg(node, key) if key is not None else None
        root[name] = root.get(src.name, src.name) if isinstance(src, Ref) else name
        bufs = {root.get(r, r) for r in ref_names_in((node.args, node.kwargs), [])}
        for b in bufs:                                     # read after write
            if b in writer:
                _add(fg, writer[b], name)
        if registry.is_ordered(node.target):
            if ordered:
                _add(fg, ordered[-1], name)
            for k in registry.written_args(node.target):
                ref = _arg(node, k)
                for r in ref_names_in(ref, []):
                    b = root.get(r, r)
                    for reader in readers.get(b, ()):       # write after read
                        _add(fg, reader, name)
                    writer[b] = name
            ordered.append(name)
        for b in bufs:
            readers.setdefault(b, []).append(name)
    return ordered
