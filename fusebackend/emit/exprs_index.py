"""Scalar code of the index ops (graph/indexing.py): cat, integer arange and takes (embedding, gather,
index_select, index), for every target and shape.

A cat's value at an index is computed in one branch per input, each reading its input at the index
shifted back by the input's offset along the cat dim: only the input that owns the element is evaluated
(loaded or computed), so no load leaves its tensor and no input's producers run for another's elements.
Values a branch computes live in its scope: the builder's memo is restored after each branch, and vector
loads (hoisted out of the element loop on CUDA) are turned off inside it.
"""
from __future__ import annotations

from ..graph import indexing
from . import ctypes_map as C
from .errors import EmitError


TAKE_PREFIX = "ix"      # the variables holding a take's index: a position that depends on loaded data


def index_value(b, node, idx: tuple) -> str:
    """C variable holding the index op `node` at idx (b: the ExprBuilder)."""
    op = indexing.normalize(node.target, node.args, node.kwargs, b.meta_of, node.meta)
    if isinstance(op, indexing.Cat):
        return _cat(b, node, op, idx)
    if isinstance(op, indexing.Arange):
        ct = C.compute(node.meta.dtype)
        var = b.fresh()
        start = "%dLL" % op.start if isinstance(op.start, int) else "(int64_t)%s" % b.value(op.start, ())
        b.emit("const %s %s = (%s)(%s + (int64_t)(%s) * %dLL);" % (ct, var, ct, start, idx[0], op.step))
        return var
    if isinstance(op, indexing.Take):
        return _take(b, node, op, idx)
    raise EmitError("%s is not an index op the kernels cover" % node.op_name)


def _take(b, node, take, idx: tuple) -> str:
    """Load each index, check it against the source's size (FB_CHECK_INDEX: fb_core.h), read the source
    there. The source is read at a data-dependent position: no hoisted vector load may serve it."""
    picked = []
    for ref, limit in zip(take.indices, take.limits):
        raw = b.value(ref, take.index_at(idx, tuple(b.meta_of(ref).shape)))
        var = b.fresh(TAKE_PREFIX)
        b.emit("int64_t %s = (int64_t)%s;" % (var, raw))
        if take.wrap:
            b.emit("if (%s < 0) %s += %dLL;" % (var, var, limit))
        b.emit("FB_CHECK_INDEX(%s, %dLL);" % (var, limit))
        picked.append(var)
    b.takes = True
    vec = getattr(b, "vec", None)
    if vec is not None:
        b.vec = None
    try:
        return b.value(take.src, take.src_at(idx, tuple(picked)))
    finally:
        if vec is not None:
            b.vec = vec


def _shifted(idx: tuple, dim: int, offset: int) -> tuple:
    new = list(idx)
    if offset:
        new[dim] = "(%s - %d)" % (idx[dim], offset)
    return tuple(new)


def _cat(b, node, cat, idx: tuple) -> str:
    parts = cat.parts
    if len(parts) == 1:
        return b.value(parts[0].ref, _shifted(idx, cat.dim, parts[0].offset))
    ct = C.compute(node.meta.dtype)
    var = b.fresh()
    b.emit("%s %s;" % (ct, var))
    e = idx[cat.dim]
    for k, part in enumerate(parts):
        if k == 0:
            b.emit("if (%s < %d) {" % (e, part.offset + part.size))
        elif k < len(parts) - 1:
            b.emit("} else if (%s < %d) {" % (e, part.offset + part.size))
        else:
            b.emit("} else {")
        memo, vec = b.memo, getattr(b, "vec", None)
        b.memo = dict(memo)
        if vec is not None:
            b.vec = None
        lines, start = b.lines, len(b.lines)
        v = b.value(part.ref, _shifted(idx, cat.dim, part.offset))
        b.emit("%s = %s;" % (var, v))
        if b.lines is lines:
            lines[start:] = ["  " + line for line in lines[start:]]
        b.memo = memo
        if vec is not None:
            b.vec = vec
    b.emit("}")
    return var
