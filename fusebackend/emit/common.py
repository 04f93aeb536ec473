"""Pieces every kernel shape and target shares: naming, the argument preamble, index arithmetic, the
KernelSource an emitter hands the runtime, and facts about a group both targets ask."""
from __future__ import annotations

import hashlib

from ..graph import registry
from ..graph.fusion_graph import FusionGraph, Ref
from ..graph.indexing import remaps_index
from . import ctypes_map as C
from .errors import EmitError
from .exprs import ExprBuilder
from .kernel import KernelSource

RED_T = {"sum": "SumR", "mean": "SumR", "prod": "ProdR", "max": "MaxR", "min": "MinR", "any": "AnyR",
         "all": "AllR"}

# What differs between targets, as data (the CUDA emitter adds its launch shapes on top).
TARGETS = {
    "cpu": {"signature": 'extern "C" void %s(void** P, const int64_t* M)', "restrict": "__restrict__"},
    "cuda": {"signature": 'extern "C" __global__ void %s(void* const* P, const int64_t* __restrict__ M)',
             "restrict": "__restrict__"},
}


def kernel_name(prefix: str, body: str) -> str:
    return "%s_%s" % (prefix, hashlib.sha1(body.encode()).hexdigest()[:12])


def preamble(b: ExprBuilder, rank: int, target: str) -> list:
    """Pointer casts, then domain sizes d*, then each operand's strides s<slot>_<dim>, then the symbolic-int
    arguments sym<k>, read from M."""
    restrict = TARGETS[target]["restrict"]
    lines = []
    for op in b.operands:
        st = C.storage(op.meta.dtype)
        const = "" if op.is_output or op.written else "const "
        lines.append("%s%s* %s %s = (%s%s*)P[%d];" % (const, st, restrict, op.ptr, const, st, op.slot))
    pos = 0
    for d in range(rank):
        lines.append("const int64_t d%d = M[%d];" % (d, pos))
        pos += 1
    for op in b.operands:
        for d in range(op.meta.rank):
            lines.append("const int64_t %s = M[%d]; (void)%s;" % (op.stride(d), pos, op.stride(d)))
            pos += 1
    for ref in b.scalars:
        var = b.scalar_var[(ref.name, ref.item)]
        lines.append("const int64_t %s = M[%d]; (void)%s;" % (var, pos, var))
        pos += 1
    return lines


def _peel(rem: str, dims: list, name, decl: str, size) -> list:
    """Lines taking dims' indices (innermost first) off the remainder variable `rem`; `decl` prefixes each
    assignment ("const int64_t " or nothing), size(d) spells dim d's size."""
    lines = []
    for k, d in enumerate(reversed(dims)):
        if k == len(dims) - 1:
            lines.append("%s%s = %s;" % (decl, name(d), rem))
        else:
            lines.append("%s%s = %s %% %s; %s /= %s;" % (decl, name(d), rem, size(d), rem, size(d)))
    return lines


def delinearize(var: str, dims: list, names=None) -> list:
    """Index variables for `dims` (outermost first) from a linear index over those dims; dim d's variable is
    names[d] (default i<d>)."""
    if not dims:
        return []
    name = (lambda d: names[d]) if names is not None else (lambda d: "i%d" % d)
    if len(dims) == 1:
        return ["const int64_t %s = %s;" % (name(dims[0]), var)]
    return ["int64_t rem_%s = %s;" % (var, var)] + _peel("rem_" + var, dims, name, "const int64_t ",
                                                          lambda d: "d%d" % d)


def delinearize_narrow(var: str, dims: list, names=None, small="fb_i32") -> list:
    """delinearize, with 32-bit divisions where the kernel's `small` flag says every linear index fits in 31
    bits: a 64-bit division by a run-time size is a ~70-instruction routine, a 32-bit one a few; a strided or
    channels-last pointwise kernel pays rank - 1 of each per element."""
    if len(dims) < 2:
        return delinearize(var, dims, names)
    name = (lambda d: names[d]) if names is not None else (lambda d: "i%d" % d)
    narrow = _peel("r32_" + var, dims, name, "", lambda d: "(uint32_t)d%d" % d)
    wide = _peel("rem_" + var, dims, name, "", lambda d: "d%d" % d)
    return (["int64_t %s;" % ", ".join(name(d) for d in dims), "if (%s) {" % small,
             "  uint32_t r32_%s = (uint32_t)%s;" % (var, var)] + ["  " + l for l in narrow]
            + ["} else {", "  int64_t rem_%s = %s;" % (var, var)] + ["  " + l for l in wide] + ["}"])


def product(dims: list) -> str:
    return " * ".join("d%d" % d for d in dims) if dims else "(int64_t)1"


def indent(lines: list, n: int) -> list:
    return [" " * n + l for l in lines]


def check_supported(fg, group) -> None:
    for name in group.nodes:
        meta = fg.node(name).meta
        if meta is None or meta.dtype not in C.SUPPORTED:
            raise EmitError("%s has unsupported dtype %s" % (name, meta.dtype if meta else None))


def flat_ok(fg: FusionGraph, group, b: ExprBuilder) -> bool:
    """Every operand has the domain's shape and is contiguous, and no view or index op (cat, arange) remaps
    or reads an index."""
    if any(remaps_index(fg.node(n)) for n in group.nodes):
        return False
    return all(op.meta.shape == tuple(group.domain) and op.meta.contiguous for op in b.operands)


def ref_of(key) -> Ref:
    """The Ref of a (name, item) value key."""
    return Ref(key[0], key[1])


def red_op(fg: FusionGraph, name: str) -> str:
    """The reduction a node computes: sum, mean, prod, max, min, any, all."""
    node = fg.node(name)
    return registry.normalize_reduction(node.target, node.args, node.kwargs).op


def scalar_index(shape, plan, idx: tuple) -> tuple:
    """Index of a per-row output (reduced dims kept as size 1, or dropped) inside the row loop."""
    if len(shape) == len(plan.domain):
        return tuple("0" if d in plan.rdims else idx[d] for d in range(len(idx)))
    return tuple(idx[d] for d in range(len(idx)) if d not in plan.rdims)


def kernel_source(group, b: ExprBuilder, name: str, target: str, kind: str, source: str, **extra) -> KernelSource:
    """The KernelSource of a finished kernel: operands in pointer order, with the layout the code assumes."""
    return KernelSource(
        name=name, target=target, kind=kind, source=source,
        inputs=[op.key for op in b.operands if not op.is_output], scalars=list(b.scalars),
        outputs=[op.key for op in b.operands if op.is_output],
        domain=tuple(group.domain), reduce_dims=tuple(group.reduce_dims),
        operand_ranks=tuple(op.meta.rank for op in b.operands),
        unit_strides=tuple((op.slot, d) for op in b.operands for d in sorted(op.unit_dims)),
        contiguous_slots=tuple(op.slot for op in b.operands if op.flat), checks_index=b.takes, **extra)


def emit_shape(fg: FusionGraph, group, shapes: dict) -> KernelSource:
    """Emit `group` with the target's kernel shape for its kind (shapes: kind -> emit function)."""
    emit = shapes.get(group.kind)
    if emit is None:
        raise EmitError("group kind %s has no kernel" % group.kind)
    if group.kind != "pointwise" and getattr(group, "stores", None):
        raise EmitError("a %s kernel does not store into its inputs (%s)" % (group.kind, ", ".join(group.stores)))
    return emit(fg, group)


__all__ = ["TARGETS", "RED_T", "kernel_name", "preamble", "delinearize", "product", "indent", "check_supported",
           "flat_ok", "ref_of", "red_op", "scalar_index", "kernel_source", "emit_shape",
           "EmitError"]
