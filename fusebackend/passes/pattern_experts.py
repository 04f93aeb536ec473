"""MoE routers and expert FFNs in an ATen FusionGraph.

An FFN is up product(s) by weights -> a pointwise region holding a nonlinearity -> a down product by a
weight, every value inside used only inside (so the whole FFN can move to another device). Gated
(SwiGLU: gate and up, or one fused gate_up split in two) or plain (2 products). Its boundary: from the
activation its up products read (the expert's tokens, already gathered: the gather reads all the layer's
tokens and the router's indices, so it stays with the router) to the down product's result (the routing
weight multiply and the scatter back read the router's output: also outside). Weight-side ops (transpose,
expert slice, per-token weight gather, casts) are inside: they move with the weight.

Which FFNs are experts:
- routed: the indices that gather its tokens, or the expert ids / offsets its products read, derive from
  a router's top-k (its router: the latest such top-k, as earlier layers' routers reach it only through
  the residual stream). One candidate per expert; batched/grouped products yield one per expert slice.
- shared: not routed, reading the same activation as a router (Qwen2-MoE's shared expert): always on.
- "graph": the graph is nothing but one FFN on a graph input -- what Dynamo compiles of an expert that an
  eager loop calls (the loop broke the graph, so its router ran in another graph; a stand-alone FFN
  graph looks the same, and is reported the same way).
Any other FFN is a dense MLP, not a candidate.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

from ..graph import FusionGraph, Ref
from .pattern_linear import Linear, find_linears
from .pattern_types import (ExpertCandidate, Router, WeightUse, arg, base_of, common_label, meta,
                            numel_bytes, op, tensor_args)

REGION_CAP = 64          # nodes of an activation region; a bigger walk has left the FFN
NONLINEAR = {"sigmoid", "tanh", "erf", "erfc", "relu", "gelu", "silu", "exp", "exp2", "hardtanh", "clamp",
             "clamp_min", "leaky_relu", "elu", "softplus", "mish"}
GATHERS = {"index", "index_select", "gather", "_unsafe_index", "embedding"}
REGION_BARRIERS = GATHERS | {"cat", "index_put", "scatter", "scatter_add", "nonzero", "where", "arange"}
ENTRY_VIEWS = ("view", "_unsafe_view", "reshape", "alias")
FREE_OPS = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"}
_GUARD = (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError)


def _backward_region(fg, start: Ref, stop_at: dict, allowed_kinds, barriers, cap=REGION_CAP):
    """Nodes reached backward from `start` through nodes of `allowed_kinds` (bounded), the `stop_at` keys
    met (leaves), and the other nodes where the walk stopped; None when it ran past the cap."""
    seen, leaves, stops, stack = set(), [], set(), [start.name]
    while stack:
        n = stack.pop()
        if n in seen or n in stops or n in leaves:
            continue
        if n in stop_at:
            leaves.append(n)
            continue
        node = fg.node(n)
        if node.kind not in allowed_kinds or op(fg, n) in barriers:
            stops.add(n)
            continue
        seen.add(n)
        if len(seen) > cap:
            return None
        stack.extend(fg.producers(n))
    return seen, leaves, stops


def _forward_within(fg, sources, within: set) -> set:
    out, stack = set(), list(sources)
    while stack:
        for u in fg.users(stack.pop()):
            if u in within and u not in out:
                out.add(u)
                stack.append(u)
    return out


def find_routers(fg: FusionGraph, linears: dict, labels: dict) -> list:
    """Every top-k whose scores come from a product by a weight (the gate), in graph order."""
    routers = []
    for node in fg.nodes():
        if op(fg, node.name) != "topk":
            continue
        try:
            walk = _backward_region(fg, arg(fg, node.name, 0), linears, ("pointwise", "reduction", "view"),
                                    GATHERS, cap=32)
            if walk is None or not walk[1]:
                continue
            seen, leaves, _ = walk
            gate = linears[max(leaves, key=lambda n: fg.node(n).index)]
            between = _forward_within(fg, [gate.out], seen | {node.name})
            k = arg(fg, node.name, 1)
            routers.append(Router(len(routers), node.name, frozenset(gate.nodes | between | {node.name}),
                                  base_of(fg, gate.a), gate.n, k,
                                  common_label([labels.get(gate.weight.input)])))
        except _GUARD:
            continue
    return routers


@dataclass
class _FFN:
    ups: list
    down: Linear
    nodes: set
    entry: Ref
    gated: bool
    roles: list
    side: tuple


def _entry(fg, ups, members):
    """The activation the up products read, stripped of reshapes used only inside the FFN."""
    refs = []
    for u in ups:
        ref = u.a
        while ref.item is None and op(fg, ref.name) in ENTRY_VIEWS and set(fg.users(ref.name)) <= members:
            members.add(ref.name)
            ref = tensor_args(fg, ref.name)[0]
        refs.append(ref)
    return refs[0] if all(r == refs[0] for r in refs) else None


def ffn_at(fg: FusionGraph, down: Linear, linears: dict):
    # (the down product itself lies after its operand: the walk never meets it)
    walk = _backward_region(fg, down.a, linears, ("pointwise", "view"), REGION_BARRIERS)
    if walk is None or not walk[1] or len(walk[1]) > 2:
        return None
    seen, leaf_names, _ = walk
    ups = [linears[n] for n in sorted(leaf_names, key=lambda n: fg.node(n).index)]
    region = _forward_within(fg, leaf_names, seen)
    if down.a.name not in region and down.a.name not in leaf_names:
        return None
    if not any(op(fg, n) in NONLINEAR for n in region):
        return None
    batched = {u.form in ("batched", "grouped") for u in ups + [down]}
    if len(batched) != 1 or any(u.k != ups[0].k for u in ups) or down.n != ups[0].k:
        return None
    members = set(region) | down.nodes | {n for u in ups for n in u.nodes}
    inside, outs = members | set(leaf_names), fg.output_names()
    if any(not set(fg.users(n)) <= inside or n in outs for n in region | set(leaf_names)):
        return None                  # a value of the FFN is read elsewhere: no clean boundary
    entry = _entry(fg, ups, members)
    if entry is None:
        return None
    if len(ups) == 2:
        nl = [any(op(fg, n) in NONLINEAR for n in _forward_within(fg, [u.out], region)) for u in ups]
        gate_first = nl[0] or not nl[1]
        roles = ["gate", "up"] if gate_first else ["up", "gate"]
        gated = True
    else:
        gated = _halves(fg, ups[0].out, region) >= 2
        roles = ["gate_up" if gated else "up"]
    # what else crosses in: expert ids / offsets, a routing weight applied inside (weights and sizes aside)
    reads = {x for u in ups + [down] for x in u.side}
    side = set()
    for n in members:
        side |= {p for p in fg.producers(n) if p not in members and p != entry.name}
    side = tuple(sorted(p for p in side if p in reads or (
        fg.node(p).kind not in ("placeholder", "constant", "symbol") and op(fg, p) not in FREE_OPS)))
    return _FFN(ups, down, members, entry, gated, roles, side)


def _halves(fg, out, region) -> int:
    """Slices a fused gate_up product is split into (through the reshapes before the split)."""
    count, stack = 0, [out]
    while stack:
        for u in fg.users(stack.pop()):
            if u not in region:
                continue
            if op(fg, u) == "slice":
                count += 1
            elif op(fg, u) in ENTRY_VIEWS + ("squeeze", "unsqueeze"):
                stack.append(u)
    return count


def _weights(fg, ffn, labels, expert=None) -> tuple:
    """WeightUses of the FFN. A 3-D weight is read one expert's slice at a time: its index is the
    select's, else `expert` (batched/grouped: the candidate's; a run-time index: the mask's, or None)."""
    out, seen = [], set()
    for lin, role in list(zip(ffn.ups, ffn.roles)) + [(ffn.down, "down")]:
        w = lin.weight
        three_d = meta(fg, w.input).rank == 3
        idx = w.expert if w.expert is not None else (expert if three_d else None)
        for name, r, sliced in ((w.input, role, three_d), (lin.bias, role + "_bias", False)):
            if name is None or (name, idx) in seen:
                continue
            seen.add((name, idx))
            bm = meta(fg, name)
            shape = tuple(bm.shape[1:]) if sliced else tuple(bm.shape)
            out.append(WeightUse(name, idx if sliced else None, shape, bm.dtype, numel_bytes(bm, shape), r,
                                 labels.get(name)))
    return tuple(out)


def _routing_refs(fg, ffn) -> list:
    refs = list(ffn.side)
    src = ffn.entry
    if src.item is None and op(fg, src.name) in GATHERS:
        refs += [r.name for r in tensor_args(fg, src.name)[1:]]
    return refs


def _latest_router(fg, refs, by_topk):
    """The router whose top-k is the latest ancestor of `refs` (earlier layers' routers reach an expert only
    through the residual stream). Walked latest node first, so the first top-k met is the one."""
    heap = [(-fg.node(n).index, n) for n in set(refs)]
    heapq.heapify(heap)
    seen = set(refs)
    while heap:
        _, n = heapq.heappop(heap)
        if n in by_topk:
            return by_topk[n]
        for p in fg.producers(n):
            if p not in seen:
                seen.add(p)
                heapq.heappush(heap, (-fg.node(p).index, p))
    return None


def _mask_expert(fg, ffn):
    """Which expert's tokens the gather reads: the select(mask, 0, e) its indices come from, if any."""
    src = ffn.entry
    if src.item is not None or op(fg, src.name) not in GATHERS:
        return None
    for ref in tensor_args(fg, src.name)[1:]:
        for _ in range(12):
            o = op(fg, ref.name)
            if o == "select" and isinstance(arg(fg, ref.name, 2), int):
                return arg(fg, ref.name, 2)
            args = tensor_args(fg, ref.name)
            if ref.item is not None or not args or o not in {"view", "squeeze", "unsqueeze", "slice", "alias",
                                                               "nonzero", "_to_copy", "clone", "permute"}:
                break
            ref = args[0]
    return None


def _graph_is(fg, ffn) -> bool:
    """The graph holds this FFN and nothing else that computes."""
    if fg.node(base_of(fg, ffn.entry).name).kind != "placeholder":
        return False
    return all(n.name in ffn.nodes or n.kind in ("placeholder", "symbol", "view", "constant")
               or op(fg, n.name) in FREE_OPS for n in fg.nodes())


def find_experts(fg: FusionGraph, labels: dict):
    """(expert candidates, routers) of one graph."""
    linears = find_linears(fg)
    routers = find_routers(fg, linears, labels)
    by_topk = {r.topk: r for r in routers}
    router_inputs = {base_of(fg, r.input): r for r in routers}
    ffns, claimed = [], set()
    for down in sorted(linears.values(), key=lambda lin: fg.node(lin.out).index):
        if down.out in claimed:
            continue
        try:
            ffn = ffn_at(fg, down, linears)
        except _GUARD:
            ffn = None
        if ffn is not None and not (ffn.nodes & claimed):
            ffns.append(ffn)
            claimed |= ffn.nodes
    experts = []
    for ffn in ffns:
        try:
            experts += _classify(fg, ffn, by_topk, router_inputs, labels)
        except _GUARD:
            continue
    # loop-form experts without an index of their own are numbered in graph order within their layer
    for layer in {e.layer for e in experts if e.form == "loop"}:
        mine = [e for e in experts if e.form == "loop" and e.layer == layer]
        if all(e.expert is None for e in mine):
            for i, e in enumerate(sorted(mine, key=lambda e: fg.node(e.exit).index)):
                experts[experts.index(e)] = replace(e, expert=i)
    experts.sort(key=lambda e: (e.layer, e.kind != "routed", -1 if e.expert is None else e.expert))
    return experts, routers


def _classify(fg, ffn, by_topk, router_inputs, labels) -> list:
    up, down = ffn.ups[0], ffn.down
    common = dict(nodes=frozenset(ffn.nodes), hidden=up.k, ffn=down.k, tokens=up.rows,
                  dtype=meta(fg, up.weight.input).dtype, entry=ffn.entry, exit=down.out, gated=ffn.gated,
                  side_inputs=ffn.side)
    router = _latest_router(fg, _routing_refs(fg, ffn), by_topk)
    if router is not None:
        if up.form in ("batched", "grouped"):
            out = []
            for e in range(meta(fg, up.weight.input).shape[0]):
                ws = _weights(fg, ffn, labels, expert=e)
                lab = common_label([w.label for w in ws])
                out.append(ExpertCandidate(router.layer, e, "routed", up.form, weights=ws, router=router.topk,
                                           label="%s[%d]" % (lab, e) if lab else None, **common))
            return out
        expert = up.weight.expert if up.weight.expert is not None else _mask_expert(fg, ffn)
        ws = _weights(fg, ffn, labels, expert=expert)
        return [ExpertCandidate(router.layer, expert, "routed", "loop", weights=ws, router=router.topk,
                                label=_label(ws, expert, up.form == "slice"), **common)]
    shared = router_inputs.get(base_of(fg, ffn.entry))
    ws = _weights(fg, ffn, labels)
    if shared is not None and up.form in ("dense", "slice"):
        return [ExpertCandidate(shared.layer, None, "shared", "dense", weights=ws, router=shared.topk,
                                label=common_label([w.label for w in ws]), **common)]
    if _graph_is(fg, ffn):
        return [ExpertCandidate(0, up.weight.expert, "routed", "graph", weights=ws,
                                label=_label(ws, up.weight.expert, up.weight.expert is not None), **common)]
    return []


def _label(ws, expert, sliced):
    lab = common_label([w.label for w in ws])
    return "%s[%d]" % (lab, expert) if lab and sliced and expert is not None else lab
