"""Pieces every kernel shape and target shares: naming, the argument preamble, index arithmetic."""
from __future__ import annotations

import hashlib

from . import ctypes_map as C
from .exprs import ExprBuilder, EmitError

# What differs between targets, as data (the CUDA emitter adds its launch shapes on top).
TARGETS = {
    "cpu": {"signature": 'extern "C" void %s(void** P, const int64_t* M)', "restrict": "__restrict__"},
    "cuda": {"signature": 'extern "C" __global__ void %s(void* const* P, const int64_t* __restrict__ M)',
             "restrict": "__restrict__"},
}


def kernel_name(prefix: str, body: str) -> str:
    return "%s_%s" % (prefix, hashlib.sha1(body.encode()).hexdigest()[:12])


def preamble(b: ExprBuilder, rank: int, target: str) -> list:
    """Pointer casts, then domain sizes d*, then each operand's strides s<slot>_<dim>, read from M."""
    restrict = TARGETS[target]["restrict"]
    lines = []
    for op in b.operands:
        st = C.storage(op.meta.dtype)
        const = "" if op.is_output else "const "
        lines.append("%s%s* %s %s = (%s%s*)P[%d];" % (const, st, restrict, op.ptr, const, st, op.slot))
    pos = 0
    for d in range(rank):
        lines.append("const int64_t d%d = M[%d];" % (d, pos))
        pos += 1
    for op in b.operands:
        for d in range(op.meta.rank):
            lines.append("const int64_t %s = M[%d]; (void)%s;" % (op.stride(d), pos, op.stride(d)))
            pos += 1
    return lines


def delinearize(var: str, dims: list, prefix="i") -> list:
    """Index variables for `dims` (outermost first) from a linear index over those dims."""
    if not dims:
        return []
    if len(dims) == 1:
        return ["const int64_t %s%d = %s;" % (prefix, dims[0], var)]
    lines = ["int64_t rem_%s = %s;" % (var, var)]
    for k, d in enumerate(reversed(dims)):
        if k == len(dims) - 1:
            lines.append("const int64_t %s%d = rem_%s;" % (prefix, d, var))
        else:
            lines.append("const int64_t %s%d = rem_%s %% d%d; rem_%s /= d%d;" % (prefix, d, var, d, var, d))
    return lines


def product(dims: list) -> str:
    return " * ".join("d%d" % d for d in dims) if dims else "(int64_t)1"


def indent(lines: list, n: int) -> list:
    return [" " * n + l for l in lines]


def check_supported(fg, group) -> None:
    for name in group.nodes:
        meta = fg.node(name).meta
        if meta is None or meta.dtype not in C.SUPPORTED:
            raise EmitError("%s has unsupported dtype %s" % (name, meta.dtype if meta else None))


__all__ = ["TARGETS", "kernel_name", "preamble", "delinearize", "product", "indent", "check_supported",
           "EmitError"]
