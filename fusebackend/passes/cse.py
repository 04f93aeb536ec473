"""Common-subexpression elimination of reductions: one reduction for each one the graph spells twice.

Decompositions repeat work: SDPA's math path computes a row's max for the softmax and again to find the
all -inf rows (decompositions.safe_softmax). Two copies of a reduction in a row kernel are two passes over
the row (HF BERT's attention softmax). A pass: FusionGraph -> FusionGraph (in place).

Values are numbered by structure (op, arguments, numbering of their operands), so two reductions of two
copies of `x * y` are equal too. Only reductions merge: a shared pointwise value would be written by one
kernel and read back by another where each computed its own copy, and the C++/CUDA compilers already fold
repeats inside one kernel. Graph outputs stay apart (eager returns distinct tensors), as do values computed
from indices and constants alone (left to rematerialisation) and everything behind an ATen call.
"""
from __future__ import annotations

import math

from ..graph.fusion_graph import FusionGraph, Ref
from .remat import generated

NUMBERED = ("pointwise", "reduction", "view")     # deterministic: ATen calls may draw random numbers


def _key(x, vn: dict):
    """A hashable spelling of an argument that tells apart what Python's == does not: True and 1, 0.0 and
    -0.0 (x + 0.0 and x + -0.0 differ at x = -0.0), int and float (they promote differently)."""
    if isinstance(x, Ref):
        return ("ref", vn.get(x.name, x.name), x.item)
    if isinstance(x, float):
        return ("float", "nan" if math.isnan(x) else x.hex())
    if isinstance(x, (bool, int, str)) or x is None:
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_key(v, vn) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _key(v, vn)) for k, v in x.items()))
    return ("obj", repr(x))           # dtypes, devices, memory formats: their repr names them


def remap(x, old: str, new: str):
    if isinstance(x, Ref):
        return Ref(new, x.item) if x.name == old else x
    if isinstance(x, (list, tuple)):
        return type(x)(remap(v, old, new) for v in x)
    if isinstance(x, dict):
        return {k: remap(v, old, new) for k, v in x.items()}
    return x


def _number(node, vn: dict):
    metas = (node.meta,) if node.meta is not None else tuple(node.multi_meta or ())
    return (node.kind, str(node.target), _key(node.args, vn), _key(node.kwargs, vn), node.device,
            tuple(None if m is None else (tuple(m.shape), m.dtype, tuple(m.stride)) for m in metas))


def eliminate_common(fg: FusionGraph) -> FusionGraph:
    vn, first = {}, {}
    outputs = fg.output_names()
    cheap = generated(fg)
    for node in fg.nodes():
        if node.kind not in NUMBERED or node.target is None:
            continue
        number = vn[node.name] = _number(node, vn)
        if node.kind != "reduction" or node.name in outputs or node.name in cheap:
            continue
        keep = first.setdefault(number, node.name)
        if keep == node.name:
            continue
        for u in fg.users(node.name):
            user = fg.node(u)
            user.args, user.kwargs = remap(user.args, node.name, keep), remap(user.kwargs, node.name, keep)
            fg.g.add_edge(keep, u)
        producers = fg.producers(node.name)
        fg.g.remove_node(node.name)
        drop_dead(fg, producers, outputs)
    return fg


def drop_dead(fg: FusionGraph, names, outputs: set) -> None:
    """Pure nodes among `names` and their producers that nothing reads any more (the copy a merged
    reduction read; a dropped mask's ops)."""
    stack = list(names)
    while stack:
        n = stack.pop()
        if n not in fg.g or fg.users(n) or n in outputs or fg.node(n).kind not in NUMBERED:
            continue
        producers = fg.producers(n)
        fg.g.remove_node(n)
        stack.extend(producers)
