"""A compiled graph's state before build_program -- FusionGraph, groups, batches, kernel sources -- as plain
JSON data and back (runtime/program_cache.py stores it).

Nothing is pickled: every value is one of a closed set of types (JSON scalars, lists, tuples, dicts, sets,
Refs, dtypes, devices, the package's own record classes) and every callable is stored by name -- an ATen
OpOverload by its qualified name, a function of a few standard modules by module and name, a graph's tensor
constant by its attribute on the GraphModule (the value is read again from the graph being compiled). A name
is written only if looking it up again gives the same object; anything else raises Unserialisable and the
graph is simply not cached.
"""
from __future__ import annotations

import builtins
import math
import operator

import networkx as nx
import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..emit.kernel import KernelSource
from ..graph.fusion_graph import FusionGraph, OpNode, Ref, TensorMeta
from ..graph.lower import TensorConstant
from ..passes.groups import Group
from ..passes.horizontal import Batch


class Unserialisable(TypeError):
    """A value the codec cannot write faithfully: the graph bypasses the program cache."""


CLASSES = {c.__name__: c for c in (OpNode, TensorMeta, Group, Batch, KernelSource)}
# modules whose functions may appear as FX targets of an ATen graph (symbolic size arithmetic, builtins)
_FUNCTION_MODULES = {"operator": operator, "_operator": operator, "math": math, "builtins": builtins, "torch": torch}
_DTYPES = {str(d).split(".")[-1]: d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(d).split(".")[-1]: d for d in vars(torch).values() if isinstance(d, torch.layout)}
_FORMATS = {str(d).split(".")[-1]: d for d in vars(torch).values() if isinstance(d, torch.memory_format)}


def op_name(op) -> str:
    """'aten::add.Tensor' for torch.ops.aten.add.Tensor."""
    return "%s.%s" % (op._schema.name, op._overloadname)


def resolve_op(name: str):
    qualified, overload = name.rsplit(".", 1)
    ns, op = qualified.split("::", 1)
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


_BUILTINS = frozenset(("min", "max", "abs", "round", "int", "float", "bool", "pow"))


def _function(module: str, qualname: str):
    """Only plain arithmetic: an entry must not be able to name eval, open or getattr."""
    allowed = module in ("operator", "_operator", "math") or \
        (module == "builtins" and qualname in _BUILTINS) or \
        (module == "torch" and qualname.startswith(("sym_", "_sym_")))
    if not allowed or "." in qualname or qualname.startswith("__"):
        raise KeyError("%s.%s is not a function an ATen graph calls" % (module, qualname))
    return getattr(_FUNCTION_MODULES[module], qualname)


_SCALARS = frozenset((str, int, float, bool, type(None)))
_SEQ = {list: "l", tuple: "t", immutable_list: "il", set: "s", frozenset: "fs"}
_RECORDS = frozenset(CLASSES.values())


class Encoder:
    """encode(value) -> JSON data. `constants`: id of each tensor the GraphModule holds -> its attribute.
    intern: each distinct TensorMeta is written once, in `metas`, and referred to by index (a graph holds the
    same few layouts many times; decoding one each is most of a warm start's decode)."""

    def __init__(self, constants=None, intern=False):
        self.constants = constants or {}
        self.intern = intern
        self.metas = {}              # TensorMeta -> index in the table
        self.table = []

    def encode(self, v):
        t = type(v)
        if t in _SCALARS:
            return v
        if t is Ref:
            return ["r", v.name, v.item]
        tag = _SEQ.get(t)
        if tag is not None:          # lowering keeps FX's immutable_list in node args: its own tag
            enc = self.encode
            return [tag, [x if type(x) in _SCALARS else enc(x) for x in v]]
        if t is dict or t is immutable_dict:
            enc = self.encode
            return ["d" if t is dict else "id", [[enc(k), enc(x)] for k, x in v.items()]]
        if t is TensorMeta and self.intern:
            index = self.metas.get(v)
            if index is None:
                index = self.metas[v] = len(self.table)
                self.table.append(self._record(v))
            return ["m", index]
        if t in _RECORDS:
            return self._record(v)
        if t is torch.dtype:
            return ["dt", _named(_DTYPES, v)]
        if t is torch._ops.OpOverload:
            return ["op", _op_name(v)]
        if t is torch.device:
            return ["dev", str(v)]
        if t is torch.Size:
            return ["sz", list(v)]
        if t is slice:
            return ["sl", self.encode(v.start), self.encode(v.stop), self.encode(v.step)]
        if t is torch.layout:
            return ["lay", _named(_LAYOUTS, v)]
        if t is torch.memory_format:
            return ["mf", _named(_FORMATS, v)]
        if t is TensorConstant:
            if id(v.value) not in self.constants:
                raise Unserialisable("a tensor constant the graph module does not hold")
            return ["tc", self.constants[id(v.value)]]
        module, qualname = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
        if callable(v) and module in _FUNCTION_MODULES and isinstance(qualname, str):   # checked by _function
            if _lookup(_function, module, qualname) is not v:
                raise Unserialisable("function %s.%s is not one the codec may name" % (module, qualname))
            return ["fn", module, qualname]
        raise Unserialisable("a value of type %s.%s" % (t.__module__, t.__qualname__))

    def _record(self, v):
        enc = self.encode
        return ["o", type(v).__name__, {k: x if type(x) in _SCALARS else enc(x) for k, x in vars(v).items()}]


_OP_NAMES: dict = {}                 # OpOverload -> its checked name


def _op_name(op) -> str:
    name = _OP_NAMES.get(op)
    if name is None:
        name = op_name(op)
        if _lookup(resolve_op, name) is not op:
            raise Unserialisable("op %s does not resolve to itself" % name)
        _OP_NAMES[op] = name
    return name


_NAMES: dict = {}                    # dtype, layout or memory format -> its checked name


def _named(table, v):
    name = _NAMES.get(v)
    if name is None:
        name = str(v).split(".")[-1]
        if table.get(name) is not v:
            raise Unserialisable("%r has no name of its own" % (v,))
        _NAMES[v] = name
    return name


def _lookup(fn, *args):
    try:
        return fn(*args)
    except (AttributeError, KeyError, ValueError, RuntimeError):
        return None


class Decoder:
    """The inverse of Encoder; `gm` provides the tensor constants, `metas` is the encoder's table. Raises on
    anything malformed. decode() takes the encoded lists; a JSON scalar stands for itself."""

    def __init__(self, gm=None, metas=()):
        self.gm = gm
        self.ops = {}
        self.metas = []
        for m in metas:
            self.metas.append(self.decode(m))
            if type(self.metas[-1]) is not TensorMeta:
                raise ValueError("the TensorMeta table holds a %s" % type(self.metas[-1]).__name__)

    def decode(self, v):
        tag, dec = v[0], self.decode
        if tag == "r":
            return Ref(v[1], v[2])
        if tag == "t":
            return tuple([x if type(x) is not list else dec(x) for x in v[1]])
        if tag == "l":
            return [x if type(x) is not list else dec(x) for x in v[1]]
        if tag == "m":
            return self.metas[v[1]]
        if tag == "o":
            obj = object.__new__(CLASSES[v[1]])
            attrs = obj.__dict__
            for k, x in v[2].items():
                attrs[k] = x if type(x) is not list else dec(x)
            return obj
        if tag == "op":
            op = self.ops.get(v[1])
            if op is None:
                op = self.ops[v[1]] = resolve_op(v[1])
            return op
        if tag == "dt":
            return _DTYPES[v[1]]
        if tag == "d" or tag == "id":
            d = {k if type(k) is not list else dec(k): x if type(x) is not list else dec(x) for k, x in v[1]}
            return d if tag == "d" else immutable_dict(d)
        if tag == "il":
            return immutable_list([x if type(x) is not list else dec(x) for x in v[1]])
        if tag == "dev":
            return torch.device(v[1])
        if tag == "s" or tag == "fs":
            items = [x if type(x) is not list else dec(x) for x in v[1]]
            return set(items) if tag == "s" else frozenset(items)
        if tag == "tc":
            value = self.gm
            for part in v[1].split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise ValueError("graph attribute %s is not a tensor" % v[1])
            return TensorConstant(value)
        if tag == "fn":
            return _function(v[1], v[2])
        if tag == "sz":
            return torch.Size(v[1])
        if tag == "sl":
            return slice(*[x if type(x) is not list else dec(x) for x in v[1:]])
        if tag == "lay":
            return _LAYOUTS[v[1]]
        if tag == "mf":
            return _FORMATS[v[1]]
        raise ValueError("unknown tag %r" % (tag,))

    def value(self, v):
        """decode() for any encoded value, a scalar included."""
        return v if type(v) is not list else self.decode(v)


def encode_graph(enc: Encoder, fg: FusionGraph) -> dict:
    """Nodes in the DiGraph's order, edges in an order that gives every node the same successor and
    predecessor order as the original (passes and the runtime walk both)."""
    g = fg.g
    return {"nodes": [[n, enc.encode(dict(data))] for n, data in g.nodes(data=True)],
            "edges": [[u, v, enc.encode(dict(g.edges[u, v]))] for u, v in edge_order(g)],
            "graph": enc.encode(dict(g.graph)),
            "attrs": enc.encode({k: v for k, v in vars(fg).items() if k != "g"})}


def decode_graph(dec: Decoder, data: dict) -> FusionGraph:
    fg = object.__new__(FusionGraph)
    fg.__dict__.update(dec.decode(data["attrs"]))
    g = nx.DiGraph()
    g.graph.update(dec.decode(data["graph"]))
    g.add_nodes_from((name, dec.decode(attrs)) for name, attrs in data["nodes"])
    edges = [(u, v, dec.decode(attrs)) for u, v, attrs in data["edges"]]
    if any(u not in g or v not in g for u, v, _ in edges):
        raise ValueError("an edge names a missing node")
    g.add_edges_from(edges)
    fg.g = g
    return fg


def edge_order(g) -> list:
    """Edges such that adding them in this order rebuilds each node's successor and predecessor order: a
    topological order of 'next in u's successors' and 'next in v's predecessors' (Kahn)."""
    after, waiting = {}, {}
    for chains in (({u: list(g.succ[u]) for u in g}, lambda u, v: (u, v)),
                   ({v: list(g.pred[v]) for v in g}, lambda v, u: (u, v))):
        lists, edge = chains
        for a, bs in lists.items():
            for i, b in enumerate(bs):
                e = edge(a, b)
                waiting.setdefault(e, 0)
                if i + 1 < len(bs):
                    after.setdefault(e, []).append(edge(a, bs[i + 1]))
    for nxt in after.values():
        for e in nxt:
            waiting[e] += 1
    ready = [e for u in g for e in ((u, v) for v in g.succ[u]) if waiting[e] == 0]
    out = []
    while ready:
        e = ready.pop()
        out.append(e)
        for nxt in after.get(e, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if len(out) != len(waiting):            # cannot happen for a real DiGraph; never store a wrong order
        raise Unserialisable("no edge order reproduces the graph's adjacency order")
    return out
