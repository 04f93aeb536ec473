"""In-place writes of graph inputs: AOT autograd's trailing `copy_(input, value)` as a kernel's store.

With `keep_inference_input_mutations`, AOT autograd ends a graph that mutates its inputs (an optimizer step:
every parameter and state tensor; batch norm's running stats; a KV cache) with one `copy_(placeholder, value)`
per mutated input. Run as ATen calls they cost one dispatch each per call (800 for AdamW over 200 tensors) and
each reads back a value a kernel has just written. Here each such copy_ becomes a *store node*: a pointwise
node (the identity of its source, cast and broadcast to the input, `registry.is_store`) whose value a kernel
writes into the input's own storage instead of an allocation. The vertical pass fuses it into the kernel that
computes the value -- an optimizer step then writes each parameter and its state in place, in the kernel that
computes them -- wherever `stores_ok` holds; otherwise it stays a kernel of its own (read the value, write the
input), and such copy kernels batch horizontally like any other.

A store is made only for a copy_ into a placeholder (not a view of one) of a kernel dtype on the value's
device, whose value does not alias that input. Its readers, if any (a mutated input that is also returned:
AOT returns the copy_), read the input itself afterwards: an order edge keeps them behind the store, as
graph/effects.py keeps every later reader of the written buffer.

Inside one kernel, `stores_ok` allows the written input to be read only where the store writes it: each
element is read and then written by the one thread that owns that index, and no thread reads an element
another has written. So: no reduction in the group; the input has the kernel's domain as its shape; at most one
store per input; the input is read by name only (no view or alias of it is an operand), by pointwise ops of
the domain's shape that come before the store in graph order, and every member computed from those reads is
such an op too (no view, cat or take in between that would move the index). Readers of the input's old value
in other kernels already run before the store: graph/effects.py orders every write after the buffer's earlier
readers, and the vertical pass refuses a merge that would make a cycle through those edges.
"""
from __future__ import annotations

import torch

from ..graph import indexing
from ..graph.effects import buffer_roots
from ..graph.fusion_graph import FusionGraph, Ref, ref_names_in
from ..graph.registry import STORE_OP, is_store, store_target
from .shapes import fits

# dtypes a kernel reads and writes (emit/ctypes_map.py's table; the passes may not import the emitters)
KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                           torch.int16, torch.int8, torch.uint8, torch.bool})
DEVICES = ("cpu", "cuda")


def _replace(value, old: str, new: Ref):
    if isinstance(value, Ref):
        return new if value.name == old and value.item is None else value
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


def _storable(fg: FusionGraph, node, roots: dict) -> bool:
    if node.target is not STORE_OP or node.kind != "opaque" or len(node.args) != 2:
        return False
    if set(node.kwargs) - {"non_blocking"}:
        return False
    dst, src = node.args
    if not isinstance(dst, Ref) or dst.item is not None or not isinstance(src, Ref):
        return False
    target = fg.node(dst.name)
    if target.kind != "placeholder" or target.meta is None or node.meta is None:
        return False
    value = fg.meta_of(src)
    if value is None or src.name not in fg.g:
        return False
    pm = target.meta
    if pm.dtype not in KERNEL_DTYPES or value.dtype not in KERNEL_DTYPES or pm.device not in DEVICES:
        return False
    if value.device != pm.device or not fits(tuple(value.shape), tuple(pm.shape)):
        return False
    return roots.get(src.name, src.name) != dst.name        # the value must not alias what it overwrites


def mark_stores(fg: FusionGraph) -> list:
    """Turn every storable copy_ into a store node (in place); returns their names. A store's readers (the
    graph's outputs included) read the written input instead, behind an order edge from the store."""
    roots = buffer_roots(fg)
    stores = []
    for node in fg.nodes():
        if not _storable(fg, node, roots):
            continue
        name, dst = node.name, node.args[0]
        node.kind = "pointwise"
        stores.append(name)
        for u in fg.users(name):
            user = fg.node(u)
            if name in ref_names_in((user.args, user.kwargs), []):
                user.args, user.kwargs = _replace(user.args, name, dst), _replace(user.kwargs, name, dst)
                fg.g.edges[name, u]["order"] = True
                if not fg.g.has_edge(dst.name, u):
                    fg.g.add_edge(dst.name, u)
        fg.outputs = [_replace(o, name, dst) for o in fg.outputs]
    return stores


def _reads(node) -> list:
    return ref_names_in((node.args, node.kwargs), [])


def stores_ok(fg: FusionGraph, names, domain, reduce_dims, roots: dict, reads=None) -> bool:
    """May `names` (a candidate kernel over `domain`) hold its store nodes? See the module's text. `reads`:
    name -> the names its node reads, when the caller keeps them (the vertical pass asks per candidate merge)."""
    if reads is None:
        def reads(n):
            return _reads(fg.node(n))
    stores = [n for n in names if is_store(fg.node(n))]
    if not stores:
        return True
    if reduce_dims or any(fg.node(n).kind == "reduction" for n in names):
        return False
    dom = tuple(domain)
    targets = {}
    for s in stores:
        p = store_target(fg.node(s)).name
        if p in targets or tuple(fg.node(p).meta.shape) != dom or tuple(fg.node(s).meta.shape) != dom:
            return False
        targets[p] = s
    for n in names:                              # no operand is a view or alias of a written input
        for r in reads(n):
            if r not in names and r not in targets and roots.get(r, r) in targets:
                return False
    for p, s in targets.items():
        at = fg.node(s).index
        readers = [n for n in names if n != s and p in reads(n)]
        if any(fg.node(r).index > at for r in readers):
            return False                         # a read of the written value: it would be the old one
        seen, stack = set(), list(readers)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            node = fg.node(n)
            if node.kind != "pointwise" or indexing.is_index_op(node.target) or node.meta is None \
                    or tuple(node.meta.shape) != dom:
                return False
            stack.extend(u for u in fg.users(n) if u in names and n in reads(u))
    return True
