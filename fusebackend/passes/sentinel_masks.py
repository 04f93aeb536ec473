"""Masks that can never be true, dropped: `where(ids >= E, 0, x)` -> `x` where `ids` are top-k indices over E.

transformers 5.17's grouped experts zero "sentinel" rows after each grouped product: the rows of expert ids
>= num_experts, which only expert parallelism produces (5.24 masks only then). The ids are the router's top-k
indices over E experts, sorted, so the mask is all false and each `where` returns its input unchanged -- but
the wheres sit between the products and the activation, where the MoE-layer patterns expect the FFN's own
ops, so no expert of the layer was found (H200, hf_generate: every weight stayed "must stay on the GPU").

A pass: FusionGraph -> FusionGraph, in place. Only a `where` whose condition is provably false everywhere is
removed, and only when its kept operand already has the where's shape and dtype (no broadcast, no promotion):
the graph computes exactly what it did.
"""
from __future__ import annotations

import torch

from ..graph.fusion_graph import FusionGraph, Ref
from .cse import drop_dead
from .pattern_types import arg, op

_WHERE = {"where"}
_PASS = {"view", "_unsafe_view", "reshape", "alias", "unsqueeze", "squeeze", "expand", "clone", "flatten"}


def _bound(fg: FusionGraph, ref, depth: int = 0):
    """An exclusive upper bound of the integer values of `ref` (with all values >= 0), or None: top-k indices
    over a dim of size E are in [0, E); reshapes, sorts (values) and clamps keep a bound."""
    if not isinstance(ref, Ref) or depth > 12:
        return None
    name = op(fg, ref.name)
    if name == "topk" and ref.item == 1:
        src = arg(fg, ref.name, 0)
        dim = arg(fg, ref.name, 2, -1)
        m = fg.meta_of(src) if isinstance(src, Ref) else None
        if m is None or not m.shape:
            return None
        size = m.shape[dim]
        return size if isinstance(size, int) else None
    if name == "sort" and ref.item == 0:
        return _bound(fg, arg(fg, ref.name, 0), depth + 1)
    if name in ("clamp", "clamp_max") and ref.item is None:
        inner = _bound(fg, arg(fg, ref.name, 0), depth + 1)
        hi = arg(fg, ref.name, 2) if name == "clamp" else arg(fg, ref.name, 1)
        if inner is None:
            return None
        return min(inner, int(hi) + 1) if isinstance(hi, (int, float)) and not isinstance(hi, bool) else inner
    if name in _PASS and ref.item is None:
        return _bound(fg, arg(fg, ref.name, 0), depth + 1)
    if name in ("_to_copy", "convert_element_type") and ref.item is None:
        m = fg.meta_of(ref)          # an integer cast keeps the values; a float or narrowing one is not trusted
        ok = m is not None and m.dtype in (torch.int32, torch.int64)
        return _bound(fg, arg(fg, ref.name, 0), depth + 1) if ok else None
    return None


def _never_true(fg: FusionGraph, cond) -> bool:
    """cond is `v >= c` (or `v > c`) through reshapes, with every value of v below a bound b <= c (< c + 1)."""
    while isinstance(cond, Ref) and cond.item is None and op(fg, cond.name) in _PASS:
        cond = arg(fg, cond.name, 0)
    if not isinstance(cond, Ref) or cond.item is not None:
        return False
    name = op(fg, cond.name)
    if name not in ("ge", "gt"):
        return False
    c = arg(fg, cond.name, 1)
    if not isinstance(c, (int, float)) or isinstance(c, bool):
        return False
    b = _bound(fg, arg(fg, cond.name, 0))
    return b is not None and (b <= c if name == "ge" else b - 1 <= c)


def _replace_uses(fg: FusionGraph, old: str, new: Ref) -> None:
    def remap(v):
        if isinstance(v, Ref):
            return new if v.name == old and v.item is None else v
        if isinstance(v, (list, tuple)):
            return type(v)(remap(x) for x in v)
        if isinstance(v, dict):
            return {k: remap(x) for k, x in v.items()}
        return v
    for u in fg.users(old):
        user = fg.node(u)
        user.args, user.kwargs = remap(user.args), remap(user.kwargs)
        fg.g.add_edge(new.name, u)


def drop_impossible_masks(fg: FusionGraph) -> int:
    """Remove every `where(cond, a, b)` whose cond is never true (uses read b); returns how many."""
    outputs, dropped = fg.output_names(), 0
    for node in list(fg.nodes()):
        if node.target is None or op(fg, node.name) not in _WHERE or node.name in outputs or len(node.args) < 3:
            continue
        cond, keep = node.args[0], node.args[2]
        if not isinstance(keep, Ref) or not _never_true(fg, cond):
            continue
        km, wm = fg.meta_of(keep), node.meta
        if km is None or wm is None or km.shape != wm.shape or km.dtype != wm.dtype:
            continue
        _replace_uses(fg, node.name, keep)
        producers = fg.producers(node.name)
        fg.g.remove_node(node.name)
        drop_dead(fg, producers, outputs)       # the mask's own ops, where nothing else reads them
        dropped += 1
    return dropped

