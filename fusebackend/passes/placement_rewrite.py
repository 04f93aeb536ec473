"""Rewriting a GPU graph so that chosen subgraphs compute on the CPU.

The nodes of a CPU-placed subgraph take device "cpu" (their metas and any device argument they carry), the
weights only they read become CPU inputs (their home is host memory), and every value that crosses the
boundary gets an explicit transfer node (`_to_copy` to the other device), so the later passes group each
side on its own device and the runtime runs the transfers as ATen copies.
"""
from __future__ import annotations

import dataclasses

import torch

from ..graph.fusion_graph import FusionGraph, OpNode, Ref

_TO_COPY = torch.ops.aten._to_copy.default


def _on(meta, device):
    return dataclasses.replace(meta, device=device) if meta is not None else None


def _map(v, leaf):
    """v with every non-container value x replaced by leaf(x) (lists, tuples and dicts rebuilt)."""
    if isinstance(v, (list, tuple)):
        return type(v)(_map(x, leaf) for x in v)
    if isinstance(v, dict):
        return {k: _map(x, leaf) for k, x in v.items()}
    return leaf(v)


def _retarget_value(v, device):
    def leaf(x):
        if isinstance(x, torch.device) and x.type != device:
            return torch.device(device)
        if isinstance(x, str) and x in ("cuda", "cpu", "cuda:0") and x.split(":")[0] != device:
            return device
        return x
    return _map(v, leaf)


def _replace_refs(v, mapping):
    return _map(v, lambda x: mapping.get((x.name, x.item), x) if isinstance(x, Ref) else x)


def _refs(v, out):
    _map(v, lambda x: out.append(x) if isinstance(x, Ref) else None)
    return out


def _transfer(fg: FusionGraph, src: Ref, device: str, tag: str) -> str:
    """A `_to_copy(src, device=...)` node placed right after src's producer in the graph's order.

    Only a copy to the GPU is asynchronous. One to the CPU is read by CPU code right after it, and an
    asynchronous device->host `_to_copy` returns a pinned tensor before its data has arrived (placed execution
    read stale activations on the H200 once calls got fast enough to outrun the copy)."""
    producer = fg.node(src.name)
    meta = fg.meta_of(src)
    name = "%s_%s%s_to_%s" % (tag, src.name, "" if src.item is None else "_%d" % src.item, device)
    node = OpNode(name, "opaque", _TO_COPY, (src,), {"device": torch.device(device),
                                                     "non_blocking": device == "cuda"},
                  _on(meta, device), device=device)
    node.bytes = meta.numel * meta.dtype.itemsize if meta is not None and meta.is_static else 0
    fg.add(node, [src.name])
    node.index = producer.index + 0.5 + 1e-6 * len(fg)      # right after its producer, unique
    return name


def place_on_cpu(fg: FusionGraph, nodes, host_weights=()) -> FusionGraph:
    """Move `nodes` to the CPU (in place); `host_weights`: placeholders only these nodes read, homed in host
    memory, which become CPU inputs without a copy."""
    nodes, host_weights = set(nodes), set(host_weights)
    for w in host_weights:
        p = fg.node(w)
        p.meta, p.device = _on(p.meta, "cpu"), "cpu"
    for name in nodes:
        n = fg.node(name)
        n.meta, n.device = _on(n.meta, "cpu"), "cpu"
        if n.multi_meta:
            n.multi_meta = tuple(_on(m, "cpu") for m in n.multi_meta)
        n.kwargs = _retarget_value(n.kwargs, "cpu")
        n.args = _retarget_value(n.args, "cpu")
    inside = nodes | host_weights
    into = {}                                  # (name, item) -> transfer node name, values entering the CPU side
    for name in sorted(nodes, key=lambda n: fg.node(n).index):
        n = fg.node(name)
        mapping = {}
        for r in _refs((n.args, n.kwargs), []):
            src = fg.node(r.name)
            if r.name in inside or src.kind == "symbol" or fg.meta_of(r) is None:
                continue
            key = (r.name, r.item)
            if key not in into:
                into[key] = _transfer(fg, r, "cpu", "h")
            mapping[key] = Ref(into[key])
        if mapping:
            _rewire(fg, n, mapping)
    back = {}
    for user in list(fg.g.nodes):
        if user in inside or user in into.values():
            continue
        u = fg.node(user)
        mapping = {}
        for r in _refs((u.args, u.kwargs), []):
            if r.name in nodes and fg.meta_of(r) is not None:
                key = (r.name, r.item)
                if key not in back:
                    back[key] = _transfer(fg, r, "cuda", "d")
                mapping[key] = Ref(back[key])
        if mapping:
            _rewire(fg, u, mapping)
    outs = {}
    for i, o in enumerate(fg.outputs):
        if isinstance(o, Ref) and o.name in nodes and fg.meta_of(o) is not None:
            key = (o.name, o.item)
            outs[i] = Ref(back.get(key) or back.setdefault(key, _transfer(fg, o, "cuda", "d")))
    for i, r in outs.items():
        fg.outputs[i] = r
    return fg


def _rewire(fg, node, mapping):
    old = {r.name for r in _refs((node.args, node.kwargs), [])}
    node.args, node.kwargs = _replace_refs(node.args, mapping), _replace_refs(node.kwargs, mapping)
    new = {r.name for r in _refs((node.args, node.kwargs), [])}
    for gone in old - new:
        fg.g.remove_edge(gone, node.name)
    for came in new - old:
        fg.g.add_edge(came, node.name)


def stream_weights(fg: FusionGraph, weights) -> FusionGraph:
    """Weights homed in host memory that GPU nodes read: each becomes a CPU input copied to the GPU right
    before its first reader, so the copy lives only from there to its last reader (one expert at a time
    over the budget, not all of them for the whole call)."""
    for w in weights:
        p = fg.node(w)
        users = fg.users(w)
        if not users:
            continue
        p.meta, p.device = _on(p.meta, "cpu"), "cpu"
        first = min(fg.node(u).index for u in users)
        name = _transfer(fg, Ref(w), "cuda", "s")
        fg.node(name).index = first - 0.5 + 1e-6 * len(fg)
        for u in users:
            _rewire(fg, fg.node(u), {(w, None): Ref(name)})
    return fg
