"""Common-subexpression elimination: one node for each computation the graph spells twice.

Decompositions repeat work: SDPA's math path computes a row's max for the softmax and again to find the
all -inf rows (decompositions.safe_softmax), and two views of one value are often taken the same way. Two
copies of a reduction in a row kernel are two passes over the row (HF BERT's attention softmax). A pass:
FusionGraph -> FusionGraph (in place). Only deterministic node kinds merge (pointwise, reduction, view);
ATen calls may draw random numbers or write, and stay as they are.
"""
from __future__ import annotations

import math

from ..graph.fusion_graph import FusionGraph, Ref
from .remat import generated

MERGEABLE = ("pointwise", "reduction", "view")


def _key(x, rep: dict):
    """A hashable spelling of an argument that tells apart what Python's == does not: True and 1, 0.0 and
    -0.0 (x + 0.0 and x + -0.0 differ at x = -0.0), int and float (they promote differently)."""
    if isinstance(x, Ref):
        return ("ref", rep.get(x.name, x.name), x.item)
    if isinstance(x, float):
        return ("float", "nan" if math.isnan(x) else x.hex())
    if isinstance(x, (bool, int, str)) or x is None:
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_key(v, rep) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _key(v, rep)) for k, v in x.items()))
    return ("obj", repr(x))           # dtypes, devices, memory formats: their repr names them


def _remap(x, old: str, new: str):
    if isinstance(x, Ref):
        return Ref(new, x.item) if x.name == old else x
    if isinstance(x, (list, tuple)):
        return type(x)(_remap(v, old, new) for v in x)
    if isinstance(x, dict):
        return {k: _remap(v, old, new) for k, v in x.items()}
    return x


def eliminate_common(fg: FusionGraph) -> FusionGraph:
    rep, seen = {}, {}
    outputs = fg.output_names()       # merged outputs would alias: eager returns distinct tensors
    # values computed from indices and constants alone (arange, masks) are left to rematerialisation: one
    # shared copy would be written once and read back by every kernel using it
    cheap = generated(fg)
    for node in fg.nodes():
        if node.kind not in MERGEABLE or node.target is None or node.name in outputs or node.name in cheap:
            continue
        meta = node.meta
        metas = (meta,) if meta is not None else tuple(node.multi_meta or ())
        key = (node.kind, str(node.target), _key(node.args, rep), _key(node.kwargs, rep), node.device,
               tuple(None if m is None else (tuple(m.shape), m.dtype, tuple(m.stride)) for m in metas))
        first = seen.setdefault(key, node.name)
        if first == node.name:
            continue
        rep[node.name] = first
        for u in fg.users(node.name):
            user = fg.node(u)
            user.args, user.kwargs = _remap(user.args, node.name, first), _remap(user.kwargs, node.name, first)
            fg.g.add_edge(first, u)
        fg.g.remove_node(node.name)
    return fg
