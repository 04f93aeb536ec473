"""Pointwise ops whose value at an index is chosen by the index itself, not by one operand at that index.

- `cat`: the value at an output index is input i's value at that index shifted back by input i's offset
  along the cat dim, for the i whose range holds the index. Inputs may be members of a kernel (computed
  there) or loads; sizes along the cat dim must be static so the ranges are compile-time constants.
- `arange` (integer): the value at index i is start + i * step.
- `embedding`, `index_select`, `gather`, `index` (integer index tensors on the leading dims, broadcast
  together): a take, the source read where the index tensors point, each checked against the source's
  (static) size along its dim: out of range is an error, as in eager (the emitter's FB_CHECK_INDEX).

The vertical pass treats both as pointwise ops; the emitter (emit/exprs_index.py) writes their index code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .fusion_graph import Ref

MAX_CAT_INPUTS = 16          # more inputs: one branch each per element; leave such a cat to ATen
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class CatPart:
    ref: Ref
    offset: int               # first output index along the cat dim that this input covers
    size: int                 # its extent along the cat dim (never 0: empty inputs are dropped)


@dataclass(frozen=True)
class Cat:
    dim: int                  # non-negative
    parts: tuple              # CatPart, in output order


@dataclass(frozen=True)
class Arange:
    start: object              # an int, or a Ref to a symbolic int (HF's arange(past, past + n))
    step: int


@dataclass(frozen=True)
class Take:
    """out[idx] = src[idx with src dims dim.. replaced by the indices read at index positions of idx]."""
    kind: str                 # embedding | index_select | gather | index
    src: Ref
    indices: tuple            # Refs, one per picked src dim (dim, dim + 1, ...); several only for `index`
    dim: int                  # the first src dim picked
    limits: tuple             # src.shape of each picked dim
    wrap: bool                # negative indices count from the end (x[idx]), else they are out of range
    lead: int = 0             # index: output dims the broadcast index tensors span (they lead the output)

    @property
    def index(self) -> Ref:
        return self.indices[0]

    def index_at(self, idx: tuple, index_shape: tuple) -> tuple:
        """The position of an index tensor (of shape index_shape) read for output position idx."""
        if self.kind == "embedding":
            return idx[:-1]
        if self.kind == "index_select":
            return (idx[self.dim],)
        if self.kind == "gather":
            return idx
        off = self.lead - len(index_shape)             # index: broadcast, right-aligned over the lead dims
        return tuple("0" if s == 1 else idx[off + d] for d, s in enumerate(index_shape))

    def src_at(self, idx: tuple, picked: tuple) -> tuple:
        if self.kind == "embedding":
            return (picked[0], idx[-1])
        if self.kind == "index":
            return tuple(picked) + tuple(idx[self.lead:])
        return tuple(picked[0] if d == self.dim else e for d, e in enumerate(idx))


TAKES = ("embedding", "index_select", "gather", "index")


def _name(target) -> str:
    return getattr(target, "__name__", "").split(".")[0]


def is_index_op(target) -> bool:
    return _name(target) in ("cat", "arange") + TAKES


def is_take(target) -> bool:
    return _name(target) in TAKES


def is_cat(target) -> bool:
    return _name(target) == "cat"


def remaps_index(node) -> bool:
    """A fusable node that reads an operand at an index other than its own (views, cat) or uses the index
    as a value (arange): a kernel holding one cannot walk its operands through one linear index."""
    return node.kind == "view" or (node.kind == "pointwise" and is_index_op(node.target))


def normalize_cat(args, kwargs, meta_of, out_meta) -> Optional[Cat]:
    """The parts of a fusable cat, or None: tensors only, same dtype, static sizes along the cat dim."""
    if set(kwargs) - {"dim"} or out_meta is None:
        return None
    tensors = args[0] if args else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    if not all(isinstance(t, Ref) for t in tensors) or len(tensors) > MAX_CAT_INPUTS:
        return None
    rank = out_meta.rank
    if rank == 0:
        return None
    dim = dim % rank
    parts, offset = [], 0
    for t in tensors:
        m = meta_of(t)
        if m is None or m.dtype != out_meta.dtype:
            return None
        if m.rank == 1 and m.shape[0] == 0 and rank != 1:
            continue                              # ATen's legacy rule: a 1-D empty input is skipped
        if m.rank != rank or not isinstance(m.shape[dim], int):
            return None
        if m.shape[dim] == 0:
            continue
        parts.append(CatPart(t, offset, m.shape[dim]))
        offset += m.shape[dim]
    if not parts or offset != out_meta.shape[dim]:
        return None
    return Cat(dim, tuple(parts))


def normalize_arange(target, args, kwargs, out_meta) -> Optional[Arange]:
    """Integer arange: start + i * step, the step a static int; start and end may be symbolic ints (Refs to
    a SymInt input or to arithmetic on sizes): the end only sizes the output, the start is a kernel argument."""
    if out_meta is None or out_meta.dtype not in _INT_DTYPES or out_meta.rank != 1:
        return None
    if set(kwargs) - {"dtype", "layout", "device", "pin_memory"}:
        return None
    if kwargs.get("layout") not in (None, torch.strided):
        return None
    overload = target._overloadname
    if overload == "default":
        start, step = 0, 1
        bounds = args[:1]
    elif overload == "start":
        start, step = args[0], 1
        bounds = args[:2]
    elif overload == "start_step":
        start, step = args[0], args[2] if len(args) > 2 else 1
        bounds = args[:3]
    else:
        return None
    if not isinstance(step, int) or isinstance(step, bool) or not all(
            isinstance(v, Ref) and v.item is None or isinstance(v, int) and not isinstance(v, bool)
            for v in tuple(bounds) + (start,)):
        return None
    return Arange(start, step)


def normalize_take(name, args, kwargs, meta_of, out_meta) -> Optional[Take]:
    """A fusable take: tensor source with a static size along the picked dim, an integer index tensor."""
    if out_meta is None or kwargs.get("sparse_grad") or kwargs.get("sparse"):
        return None
    if name == "embedding":
        src, index, dim = (args[0], args[1], 0) if len(args) >= 2 else (None, None, 0)
    elif name == "index_select" and len(args) == 3:
        src, dim, index = args
    elif name == "gather" and len(args) >= 3:
        src, dim, index = args[:3]
    elif name == "index" and len(args) == 2 and isinstance(args[1], (list, tuple)) and len(args[1]) >= 1:
        return _normalize_index(args[0], tuple(args[1]), meta_of, out_meta)
    else:
        return None
    if not isinstance(src, Ref) or not isinstance(index, Ref) or not isinstance(dim, int):
        return None
    sm, im = meta_of(src), meta_of(index)
    if sm is None or im is None or im.dtype not in (torch.int64, torch.int32) or sm.rank == 0:
        return None
    dim %= sm.rank
    if (name == "embedding" and sm.rank != 2) or (name == "index_select" and im.rank != 1) or \
            (name == "gather" and im.rank != sm.rank) or not isinstance(sm.shape[dim], int):
        return None
    return Take(name, src, (index,), dim, (sm.shape[dim],), wrap=False)


def _normalize_index(src, indices, meta_of, out_meta) -> Optional[Take]:
    """x[i0, i1, ...]: integer index tensors on the leading dims (no None between them), broadcast together;
    their broadcast shape leads the output, the src dims left follow."""
    if not isinstance(src, Ref) or not all(isinstance(i, Ref) for i in indices):
        return None
    sm = meta_of(src)
    ims = [meta_of(i) for i in indices]
    if sm is None or len(indices) > sm.rank or any(m is None or m.dtype not in (torch.int64, torch.int32)
                                                   for m in ims):
        return None
    k = len(indices)
    lead = out_meta.rank - (sm.rank - k)
    limits = tuple(sm.shape[:k])
    if lead < 0 or not all(isinstance(v, int) for v in limits) or \
            tuple(out_meta.shape[lead:]) != tuple(sm.shape[k:]):
        return None
    for m in ims:                                   # each index fits the lead shape, right-aligned
        if m.rank > lead or any(s not in (1, out_meta.shape[lead - m.rank + d]) for d, s in enumerate(m.shape)):
            return None
    return Take("index", src, tuple(indices), 0, limits, wrap=True, lead=lead)


def normalize(target, args, kwargs, meta_of, meta):
    """Cat | Arange | Take for an index op (None when it is not one, or not a fusable one); meta is its
    output's."""
    name = _name(target)
    if name in TAKES:
        return normalize_take(name, args, kwargs, meta_of, meta)
    if name == "cat":
        return normalize_cat(args, kwargs, meta_of, meta)
    if name == "arange":
        return normalize_arange(target, args, kwargs, meta)
    return None
