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

A plain `aten.copy_` (what AOT autograd leaves at the end of a graph for every input it mutates, when the
mutations stay in the graph) is ordered only against the readers and writers of the buffer it writes, not
against the other ordered ops: an optimizer step ends in one copy_ per parameter and state tensor, and one
chain through them all would put every parameter's kernel at its own depth (no horizontal batch) and refuse
each copy_ into its value's kernel (passes/inplace.py) as a cycle.
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


def _root(node, root: dict) -> str:
    """The buffer node's value aliases: its aliased argument's buffer (views, copy_, set_), else itself."""
    if node.target is None or node.kind in ("placeholder", "symbol", "constant"):
        return node.name
    key = registry.aliased_arg(node.target) if hasattr(node.target, "_schema") else None
    if key is None and node.kind == "view" and node.args and isinstance(node.args[0], Ref):
        key = 0
    src = _arg(node, key) if key is not None else None
    return root.get(src.name, src.name) if isinstance(src, Ref) else node.name


def buffer_roots(fg: FusionGraph) -> dict:
    """value name -> the name of the buffer it aliases (a placeholder, or the op that made the storage)."""
    root = {}
    for node in fg.nodes():
        root[node.name] = _root(node, root)
    return root


def buffer_writers(fg: FusionGraph, roots: dict | None = None) -> dict:
    """buffer name -> the ops that write it (copy_ and stores, in-place collectives, ...), in graph order. A pass
    that copies a reader of a buffer (passes/remat_scalar.py) orders the copy before the later writers too."""
    roots = buffer_roots(fg) if roots is None else roots
    out: dict = {}
    for node in fg.nodes():
        if node.target is None or not registry.is_ordered(node.target):
            continue
        for k in registry.written_args(node.target):
            for r in ref_names_in(_arg(node, k), []):
                out.setdefault(roots.get(r, r), []).append(node.name)
    return out


def order_side_effects(fg: FusionGraph) -> list:
    """Add the order edges (in place); returns the names of the ops kept in one order (collectives, waits,
    storage ops; not plain copy_s), in graph order."""
    root = {}                          # value -> the buffer it aliases (itself for a fresh value)
    readers: dict = {}                 # buffer -> nodes that read it so far
    writer: dict = {}                  # buffer -> the last op that wrote it
    ordered = []
    for node in fg.nodes():
        name = node.name
        root[name] = _root(node, root)
        if node.target is None or node.kind in ("placeholder", "symbol", "constant"):
            continue
        bufs = {root.get(r, r) for r in ref_names_in((node.args, node.kwargs), [])}
        for b in bufs:                                     # read after write
            if b in writer:
                _add(fg, writer[b], name)
        if registry.is_ordered(node.target):
            if registry.chained(node.target):
                if ordered:
                    _add(fg, ordered[-1], name)
                ordered.append(name)
            for k in registry.written_args(node.target):
                ref = _arg(node, k)
                for r in ref_names_in(ref, []):
                    b = root.get(r, r)
                    for reader in readers.get(b, ()):       # write after read
                        _add(fg, reader, name)
                    writer[b] = name
        for b in bufs:
            readers.setdefault(b, []).append(name)
    return ordered
