"""Split ops as views: `split`, `split_with_sizes` (and their unsafe_ spellings) become one `slice` per
output and `unbind` one `select` per output, so each piece is a view a kernel can read through index
arithmetic (or a zero-copy view at run time) instead of an opaque multi-output ATen call.

Only when every user of the split takes one item (`operator.getitem`) and the pieces' sizes along the
split dim are static.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten
_SLICING = ("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes")


def _dim(node: fx.Node, pos: int) -> Optional[int]:
    dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def as_views(node: fx.Node, src) -> Optional[list]:
    """[(target, args)] per output item of a split-like call node, or None. `src` is the Ref of its input."""
    name = getattr(node.target, "__name__", "").split(".")[0]
    vals = node.meta.get("val")
    if name not in _SLICING + ("unbind",) or not isinstance(vals, (list, tuple)) or not vals:
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
        return None
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    rank = node.args[0].meta["val"].dim() if isinstance(node.args[0], fx.Node) else None
    dim = _dim(node, 1 if name == "unbind" else 2)
    if rank is None or rank == 0 or dim is None:
        return None
    dim = dim % rank
    if name == "unbind":
        return [(aten.select.int, (src, dim, i)) for i in range(len(vals))]
    out, start = [], 0
    for v in vals:
        size = v.shape[dim]
        if not isinstance(size, int):
            return None
        out.append((aten.slice.Tensor, (src, dim, start, start + size)))
        start += size
    return out
