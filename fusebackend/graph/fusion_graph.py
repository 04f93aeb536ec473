"""FusionGraph: a networkx DiGraph of ATen ops carrying tensor metadata.

Each node's data is one `OpNode`; edges run producer -> consumer. Node names are the FX node names,
so a FusionGraph can always be mapped back to the graph it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
import torch


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype, strides and device of one tensor value; a dynamic dim is held as its symbol's text."""
    shape: tuple
    dtype: torch.dtype
    stride: tuple
    device: str
    contiguous: bool = True

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n = n * s
        return n

    @property
    def is_static(self) -> bool:
        return all(isinstance(s, int) for s in self.shape + self.stride)

    @staticmethod
    def of(t: torch.Tensor) -> "TensorMeta":
        def plain(v):
            return int(v) if isinstance(v, int) or (hasattr(v, "node") and v.node.is_constant()) else str(v)
        shape = tuple(plain(s) for s in t.shape)
        stride = tuple(plain(s) for s in t.stride())
        try:
            contiguous = bool(t.is_contiguous())
        except Exception:  # a data-dependent symbolic layout: treat as strided
            contiguous = False
        return TensorMeta(shape, t.dtype, stride, t.device.type, contiguous)


@dataclass
class OpNode:
    """One node: `kind` is placeholder | output | pointwise | reduction | view | opaque | constant."""
    name: str
    kind: str
    target: Any = None                  # the ATen OpOverload (or None for placeholder/output)
    args: tuple = ()                    # FX args with node references replaced by node names (Ref)
    kwargs: dict = field(default_factory=dict)
    meta: Optional[TensorMeta] = None   # None for multi-output or non-tensor values
    multi_meta: Optional[tuple] = None  # for ops returning several tensors
    index: int = -1                     # position in the original FX order (a topological order)
    flops: int = 0
    bytes: int = 0
    device: str = "cpu"
    sym_expr: Optional[str] = None      # a symbolic-int value (SymInt input, a size read as a value): its text
    stack_trace: str = ""               # the user's source line(s) the FX node came from (Dynamo's stack_trace)

    @property
    def op_name(self) -> str:
        if self.target is None:
            return self.kind
        return getattr(self.target, "__name__", str(self.target))


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside OpNode.args (item selects one output of a multi-output op)."""
    name: str
    item: Optional[int] = None


def ref_names_in(value, out=None) -> list:
    """Names of the nodes that Refs inside an arg structure (lists, tuples, dicts) point to, in order."""
    out = [] if out is None else out
    if isinstance(value, Ref):
        out.append(value.name)
    elif isinstance(value, (list, tuple)):
        for v in value:
            ref_names_in(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            ref_names_in(v, out)
    return out


class FusionGraph:
    """Thin wrapper over nx.DiGraph keeping node order, graph inputs and outputs."""

    def __init__(self):
        self.g = nx.DiGraph()
        self.inputs: list[str] = []      # placeholder names in call order
        self.outputs: list = []          # Ref, None or python constants, in output order
        self.symbols: dict = {}          # symbol text (e.g. 's0') -> SymInt placeholder providing it
        self.symbol_sources: dict = {}   # data-dependent symbol -> (node, item, dim) whose size it is

    def add(self, node: OpNode, deps=()):
        node.index = self.g.number_of_nodes()
        self.g.add_node(node.name, op=node)
        for d in deps:
            self.g.add_edge(d, node.name)
        return node

    def node(self, name: str) -> OpNode:
        # the DiGraph's own node dict: `g.nodes[name]` builds through a NodeView each call, and the passes ask
        # this about a million times for a 200-tensor optimizer step
        return self.g._node[name]["op"]

    def nodes(self):
        """All OpNodes in the original (topological) order."""
        return sorted((d["op"] for _, d in self.g.nodes(data=True)), key=lambda n: n.index)

    def meta_of(self, ref) -> Optional[TensorMeta]:
        """The TensorMeta of a value: a node name, or a Ref (selecting one output of a multi-output op)."""
        if isinstance(ref, str):
            return self.node(ref).meta
        node = self.node(ref.name)
        if ref.item is None:
            return node.meta
        multi = node.multi_meta or ()
        return multi[ref.item] if ref.item < len(multi) else None

    def users(self, name: str) -> list[str]:
        return list(self.g.successors(name))

    def producers(self, name: str) -> list[str]:
        return list(self.g.predecessors(name))

    def output_names(self) -> set:
        return {o.name for o in self.outputs if isinstance(o, Ref)}

    def __len__(self):
        return self.g.number_of_nodes()

    def summary(self) -> str:
        lines = []
        for n in self.nodes():
            m = n.meta
            desc = "%s %s" % (tuple(m.shape), str(m.dtype).replace("torch.", "")) if m else ""
            lines.append("  %-24s %-10s %-36s %s" % (n.name, n.kind, n.op_name, desc))
        return "\n".join(lines)
