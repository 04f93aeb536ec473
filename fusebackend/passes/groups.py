"""Group types handed from the passes to the emitters and the runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..graph.fusion_graph import FusionGraph, Ref, ref_names_in
from ..graph.registry import is_store

FUSABLE = ("pointwise", "reduction", "view")


@dataclass
class Group:
    """A set of FusionGraph nodes that runs as one step: a fused kernel, an ATen call, or a zero-copy view.

    kind: 'pointwise' | 'reduction' (a kernel), 'opaque' (one ATen call), 'view' (a runtime view).
    domain: the iteration shape of a kernel; reduce_dims: the dims a reduction group reduces over.
    inputs: values read from outside (Refs); outputs: member node names whose values are written (to storage
    the kernel's step allocates); stores: member store nodes (passes/inplace.py), whose values are written
    into the storage of the input each names (one of `inputs`), not allocated.
    """
    id: int
    kind: str
    nodes: list
    device: str = "cpu"
    domain: tuple = ()
    reduce_dims: tuple = ()
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    stores: list = field(default_factory=list)
    fallback_reason: Optional[str] = None   # set when the kernel could not be built; the group runs as ATen

    @property
    def is_kernel(self) -> bool:
        return self.kind in ("pointwise", "reduction")

    def describe(self, fg: FusionGraph) -> str:
        ops = ", ".join(fg.node(n).op_name.split(".")[0] for n in self.nodes)
        dom = "x".join(str(s) for s in self.domain)
        red = " reduce%s" % (list(self.reduce_dims),) if self.reduce_dims else ""
        return "g%d %-9s %-4s [%s]%s: %s" % (self.id, self.kind, self.device, dom, red, ops)


def finish_io(fg: FusionGraph, groups: list) -> None:
    """Fill each group's external inputs and written outputs from the node graph."""
    owner = {n: g.id for g in groups for n in g.nodes}
    graph_outputs = fg.output_names()
    for g in groups:
        members = set(g.nodes)
        ins = []
        for n in g.nodes:
            node = fg.node(n)
            for ref in _arg_refs(node.args) + _arg_refs(list(node.kwargs.values())):
                # a view's symbolic size (expand(x, [s0, 32])) is its output shape, which the kernel gets
                # with its domain: not a value it reads
                if node.kind == "view" and g.kind not in ("opaque", "view") and fg.node(ref.name).kind == "symbol":
                    continue
                if ref.name not in members and ref not in ins:
                    ins.append(ref)
        g.inputs = ins
        g.stores = [n for n in g.nodes if is_store(fg.node(n))] if g.is_kernel else []
        g.outputs = [n for n in g.nodes if n not in g.stores and
                     (n in graph_outputs or any(u not in members for u in data_users(fg, n)))]
        if g.kind in ("opaque", "view"):
            g.outputs = list(g.nodes)
    return owner


def data_users(fg: FusionGraph, name: str) -> list:
    """The nodes that read `name`'s value (not those an order edge alone puts after it: graph/effects.py)."""
    return [u for u in fg.users(name) if name in ref_names_in((fg.node(u).args, fg.node(u).kwargs), [])]


def _arg_refs(value, out=None):
    out = [] if out is None else out
    if isinstance(value, Ref):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _arg_refs(v, out)
    return out
