"""Matrix products by a weight, in every ATen spelling fuse's capture leaves them, for the pattern finders.

A weight is a graph input (or a lifted constant) reached from the product's weight operand through layout
ops only: nn.Linear's transposed weight (mm / addmm), GPT-2's Conv1D weight as is, one expert's slice
`select(W3, 0, e)` of a 3-D parameter (transformers 5.x's loop over the experts), per-token gathered
expert weights `index(W3, [ids])` multiplied by bmm (transformers' batched_mm), the whole 3-D weight of a
grouped_mm (aten._grouped_mm, or transformers' grouped_mm_fallback custom op), and the few-row product
capture/decomp_gemv.py spells as sum(a[m, 1, k] * w[1, n, k], 2) for decode on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..graph import FusionGraph, Ref
from .pattern_types import arg, is_input, meta, op, tensor_args

# ops a weight may pass through on its way to a product (layout, dtype, zero padding)
WEIGHT_PATH = {"permute", "t", "transpose", "_to_copy", "alias", "clone", "detach", "constant_pad_nd"}


@dataclass
class Weight:
    input: str
    expert: Optional[int]          # select(W3, 0, expert)
    ids: Optional[Ref]             # index(W3, [ids]): an expert slice per row
    nodes: list = field(default_factory=list)


@dataclass
class Linear:
    out: str                       # the node holding the product (its last op)
    nodes: set
    a: Ref                         # the activation operand
    weight: Weight
    bias: Optional[str]
    n: object                      # output features
    k: object                      # input features
    rows: object
    form: str                      # dense | slice | batched | grouped
    side: tuple = ()               # expert ids / group offsets the product reads


def weight_of(fg: FusionGraph, ref, grouped: bool = False) -> Optional[Weight]:
    """The weight input `ref` reads, or None where it is an activation (grouped: a whole 3-D weight)."""
    if not isinstance(ref, Ref):
        return None
    w = Weight(input="", expert=None, ids=None)
    for _ in range(16):
        if ref.item is not None:
            return None
        name = ref.name
        if is_input(fg, name):
            w.input = name
            break
        o, args = op(fg, name), tensor_args(fg, name)
        if o in WEIGHT_PATH and args:
            ref = args[0]
        elif o == "select" and w.expert is None and w.ids is None and arg(fg, name, 1) == 0 \
                and isinstance(arg(fg, name, 2), int):
            w.expert, ref = arg(fg, name, 2), arg(fg, name, 0)
        elif o == "index" and w.expert is None and w.ids is None:
            idx = arg(fg, name, 1)
            if not (isinstance(idx, (list, tuple)) and len(idx) == 1 and isinstance(idx[0], Ref)):
                return None
            w.ids, ref = idx[0], arg(fg, name, 0)
        else:
            return None
        w.nodes.append(name)
    else:
        return None
    m = meta(fg, w.input)
    if m is None or not m.is_static or not m.dtype.is_floating_point:
        return None
    want = 3 if (w.expert is not None or w.ids is not None or grouped) else 2
    return w if m.rank == want else None


def _dims(fg, ref):
    m = meta(fg, ref)
    return m.shape if m is not None else None


def _mm(fg, name, o):
    a, b = (arg(fg, name, 1), arg(fg, name, 2)) if o == "addmm" else (arg(fg, name, 0), arg(fg, name, 1))
    w = weight_of(fg, b)
    if w is None or w.ids is not None or not isinstance(a, Ref):
        return None
    bias = None
    if o == "addmm":
        bref = arg(fg, name, 0)
        if not (isinstance(bref, Ref) and is_input(fg, bref.name)):
            return None            # a computed addend: not a layer's bias
        bias = bref.name
    out, ad = _dims(fg, name), _dims(fg, a)
    if out is None or ad is None or len(out) != 2:
        return None
    return Linear(name, {name, *w.nodes}, a, w, bias, out[1], ad[-1], out[0],
                  "slice" if w.expert is not None else "dense")


def _bmm(fg, name):
    x, y = arg(fg, name, 0), arg(fg, name, 1)
    for wi, a in ((x, y), (y, x)):
        w = weight_of(fg, wi)
        if w is None or w.ids is None or not isinstance(a, Ref):
            continue
        nodes = {name, *w.nodes}
        if a.item is None and op(fg, a.name) == "unsqueeze" and fg.users(a.name) == [name]:
            nodes.add(a.name)
            a = tensor_args(fg, a.name)[0]
        wd, out = _dims(fg, w.input), _dims(fg, name)
        n, k = (wd[1], wd[2]) if wi is x else (wd[2], wd[1])     # W x (is_transposed False) or x W
        return Linear(name, nodes, a, w, None, n, k, out[0], "batched", (w.ids.name,))
    return None


def _grouped(fg, name):
    x, wref = arg(fg, name, 0), arg(fg, name, 1)
    offs = arg(fg, name, 2, fg.node(name).kwargs.get("offs"))
    w = weight_of(fg, wref, grouped=True)
    if w is None or w.ids is not None or w.expert is not None or not isinstance(x, Ref):
        return None
    out = _dims(fg, name)
    side = (offs.name,) if isinstance(offs, Ref) else ()
    return Linear(name, {name, *w.nodes}, x, w, None, out[-1], _dims(fg, x)[-1], out[0], "grouped", side)


def _gemv(fg, name):
    """sum(mul(unsqueeze(a, 1), unsqueeze(cast(permute(W)), 0)), [2]), then the cast back (decomp_gemv)."""
    prod = arg(fg, name, 0)
    if not isinstance(prod, Ref) or op(fg, prod.name) != "mul" or list(arg(fg, name, 1, []) or []) != [2]:
        return None
    ua, uw = arg(fg, prod.name, 0), arg(fg, prod.name, 1)
    if not all(isinstance(u, Ref) and op(fg, u.name) == "unsqueeze" for u in (ua, uw)):
        return None
    w = weight_of(fg, tensor_args(fg, uw.name)[0])
    if w is None or w.ids is not None:
        return None
    a = tensor_args(fg, ua.name)[0]
    out, nodes = name, {name, prod.name, ua.name, uw.name, *w.nodes}
    users = fg.users(name)
    if len(users) == 1 and op(fg, users[0]) in ("_to_copy", "convert_element_type"):
        out = users[0]
        nodes.add(out)
    d = _dims(fg, name)
    return Linear(out, nodes, a, w, None, d[1], _dims(fg, a)[-1], d[0],
                  "slice" if w.expert is not None else "dense")


def linear_at(fg: FusionGraph, name: str) -> Optional[Linear]:
    """The product by a weight whose first op is `name` (mm, addmm, bmm, grouped_mm, gemv's sum), or None."""
    o = op(fg, name)
    if o in ("mm", "addmm"):
        return _mm(fg, name, o)
    if o == "bmm":
        return _bmm(fg, name)
    if "grouped_mm" in o:
        return _grouped(fg, name)
    if o == "sum":
        return _gemv(fg, name)
    return None


def find_linears(fg: FusionGraph) -> dict:
    """out node -> Linear, for every product by a weight in the graph."""
    found = {}
    for node in fg.nodes():
        try:
            lin = linear_at(fg, node.name)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):   # an unknown spelling
            lin = None
        if lin is not None:
            found[lin.out] = lin
    return found
