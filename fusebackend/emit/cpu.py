"""C++/OpenMP kernels for CPU tensors: the pointwise and the row-reduction shape."""
from __future__ import annotations

import torch

from ..graph.fusion_graph import FusionGraph
from . import ctypes_map as C
from .common import check_supported, delinearize, indent, kernel_name, preamble, product
from .exprs import EmitError, ExprBuilder
from .kernel import KernelSource
from .rowplan import RowPlan

HEADER = '#include "fb_reduce.h"\n#include <stdlib.h>\n'
PAR_MIN = 32768        # below this many elements a parallel region costs more than it saves
CHUNK = 8192           # inner-loop chunk, so a few long rows still spread over all threads
OMP_RED = {"sum": "+", "mean": "+", "prod": "*", "any": "||", "all": "&&"}
RED_T = {"sum": "SumR", "mean": "SumR", "prod": "ProdR", "max": "MaxR", "min": "MinR", "any": "AnyR",
         "all": "AllR"}


def flat_ok(fg: FusionGraph, group, b: ExprBuilder) -> bool:
    """Every operand has the domain's shape and is contiguous, and no view remaps an index."""
    if any(fg.node(n).kind == "view" for n in group.nodes):
        return False
    return all(op.meta.shape == tuple(group.domain) and op.meta.contiguous for op in b.operands)


def emit_pointwise(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = ExprBuilder(fg, group)
    flat = rank <= 1 or flat_ok(fg, group, probe)
    b = ExprBuilder(fg, group, flat_index="li" if flat else None)
    idx = tuple("i%d" % d for d in range(rank))
    if flat and rank == 1:
        b.emit("const int64_t i0 = li;")
    for out in group.outputs:
        b.store(out, idx, b.value(out, idx))
    body = preamble(b, rank, "cpu") + ["const int64_t n = %s;" % product(list(range(rank))),
                                       "if (n == 0) return;"]
    if flat:
        body += ["#pragma omp parallel for simd schedule(static) if(n > %d)" % PAR_MIN,
                 "for (int64_t li = 0; li < n; ++li) {"] + indent(b.lines, 2) + ["}"]
    else:
        last = rank - 1
        body += ["const int64_t inner = d%d, rows = n / inner;" % last,
                 "const int64_t nch = (inner + %d - 1) / %d;" % (CHUNK, CHUNK),
                 "#pragma omp parallel for schedule(static) if(n > %d)" % PAR_MIN,
                 "for (int64_t t = 0; t < rows * nch; ++t) {",
                 "  const int64_t row = t / nch, j0 = (t %% nch) * %d;" % CHUNK,
                 "  const int64_t j1 = inner < j0 + %d ? inner : j0 + %d;" % (CHUNK, CHUNK)]
        body += indent(delinearize("row", list(range(last))), 2)
        body += ["  #pragma omp simd", "  for (int64_t i%d = j0; i%d < j1; ++i%d) {" % (last, last, last)]
        body += indent(b.lines, 4) + ["  }", "}"]
    return _finish(fg, group, b, "pointwise", body)


def emit_reduction(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    b = ExprBuilder(fg, group)
    plan = RowPlan(fg, group, b.meta_of)
    rank = len(group.domain)
    rdims = list(plan.rdims)
    outer = [d for d in range(rank) if d not in rdims]
    idx = tuple("i%d" % d for d in range(rank))
    cache_var = {k: "c%d" % i for i, k in enumerate(plan.cached)}
    cache_type = {}
    row_memo, state = {}, {"pre": None, "phase": 0}

    def hook(ref_key, at):
        name = ref_key[0]
        if plan.per_row(_ref(ref_key), at):
            mk = (name, at)
            if mk not in row_memo:
                saved = b.lines, b.hook
                b.lines, b.hook = state["pre"], hook
                row_memo[mk] = b.compute(name, at) if name in plan.members else b.load(_ref(ref_key), at)
                b.lines, b.hook = saved
            return row_memo[mk]
        if ref_key in cache_var and plan.home[ref_key] < state["phase"] and at == idx:
            var = b.fresh()
            b.emit("%s %s = %s[r];" % (cache_type[ref_key], var, cache_var[ref_key]))
            return var
        return None

    b.hook = hook
    row = []
    for p in range(plan.num_phases):
        pre, loop = [], []
        state.update(pre=pre, phase=p)
        b.lines, b.memo = loop, {}
        reds = [r for r in plan.reductions if plan.level[r] == p]
        for k, var in cache_var.items():      # values born in this phase are computed now and cached
            if plan.home[k] == p:
                v = b.value(_ref(k), idx)
                cache_type[k] = C.compute(b.meta_of(_ref(k)).dtype)
                b.emit("%s[r] = %s;" % (var, v))
        accs = []
        for r in reds:
            v = b.value(plan.red_input(r), idx)
            red_op = _red_op(fg, r)
            acc_t = _acc_type(fg.node(r).meta.dtype, red_op)
            b.emit("a_%s = fb::%s::combine(a_%s, (%s)%s);" % (r, RED_T[red_op], r, acc_t, v))
            accs.append((r, acc_t, red_op))
        if p == plan.num_levels:
            for out in plan.row_outputs:
                b.store(out, idx, b.value(out, idx))
        row += pre
        for r, acc_t, red_op in accs:
            row.append("%s a_%s = fb::%s::identity<%s>();" % (acc_t, r, RED_T[red_op], acc_t))
        row.append(_simd_pragma(accs))
        row.append("for (int64_t r = 0; r < R; ++r) {")
        row += indent(delinearize("r", rdims), 2) + indent(loop, 2) + ["}"]
        for r, acc_t, red_op in accs:
            if red_op == "mean":
                row.append("a_%s = a_%s / (%s)R;" % (r, r, acc_t))
            ct = C.compute(fg.node(r).meta.dtype)
            b.reduction_value[r] = "a_%s" % r if acc_t == ct else "((%s)a_%s)" % (ct, r)
    end = []
    state.update(pre=end, phase=plan.num_phases)
    b.lines = end
    for out in plan.scalar_outputs:
        out_idx = _scalar_index(fg.node(out).meta.shape, plan, idx)
        b.store(out, out_idx, b.value(out, out_idx))
    row += end
    ncache = len(cache_var)
    body = preamble(b, rank, "cpu") + [
        "const int64_t O = %s, R = %s;" % (product(outer), product(rdims)),
        "if (O == 0) return;",
        "#pragma omp parallel if(O * R > %d)" % PAR_MIN, "{",
        "  char* cbuf = %s;" % ("(char*)malloc((size_t)R * %d + 64)" % (8 * ncache) if ncache else "nullptr")]
    for k, var in cache_var.items():
        body.append("  %s* %s = (%s*)(cbuf + (size_t)R * %d);" % (cache_type[k], var, cache_type[k],
                                                               8 * plan.cached.index(k)))
    body += ["  #pragma omp for schedule(static)", "  for (int64_t o = 0; o < O; ++o) {"]
    body += indent(delinearize("o", outer), 4) + indent(row, 4) + ["  }", "  free(cbuf);", "}"]
    return _finish(fg, group, b, "reduction", body)


def _ref(key):
    from ..graph.fusion_graph import Ref
    return Ref(key[0], key[1])


def _red_op(fg, name) -> str:
    from ..graph import registry
    node = fg.node(name)
    return registry.normalize_reduction(node.target, node.args, node.kwargs).op


def _acc_type(dtype, red_op) -> str:
    """A float32 mean adds in double: the mean of a constant row is then exactly that constant (as ATen's
    Welford mean is), so x - mean is exactly 0 and a layer norm of a constant row is 0, not rounding noise
    amplified by rsqrt(var + eps)."""
    if red_op == "mean" and dtype == torch.float32:
        return "double"
    return C.compute(dtype)


def _simd_pragma(accs) -> str:
    parts = []
    for r, acc_t, red_op in accs:
        if red_op in ("max", "min"):
            op = ("fb" + red_op) if acc_t in ("float", "double") else red_op
        else:
            op = OMP_RED[red_op]
        parts.append("reduction(%s:a_%s)" % (op, r))
    return "#pragma omp simd " + " ".join(parts)


def _scalar_index(shape, plan, idx):
    if len(shape) == len(plan.domain):
        return tuple("0" if d in plan.rdims else idx[d] for d in range(len(idx)))
    return tuple(idx[d] for d in range(len(idx)) if d not in plan.rdims)


def _finish(fg, group, b, kind, body) -> KernelSource:
    text = "\n".join(body)
    name = kernel_name("fb_" + kind[:3], text)
    source = HEADER + TARGET_SIG % name + " {\n" + "\n".join(indent(body, 2)) + "\n}\n" + BATCH % (name, name)
    return KernelSource(
        name=name, target="cpu", kind=kind, source=source,
        inputs=[op.key for op in b.operands if not op.is_output],
        outputs=[op.key for op in b.operands if op.is_output],
        domain=tuple(group.domain), reduce_dims=tuple(group.reduce_dims),
        operand_ranks=tuple(op.meta.rank for op in b.operands),
        unit_strides=tuple((op.slot, d) for op in b.operands for d in sorted(op.unit_dims)),
        contiguous_slots=tuple(op.slot for op in b.operands if op.flat), batch_name=name + "_batch")


TARGET_SIG = 'extern "C" void %s(void** P, const int64_t* M)'
# Horizontal batch: problems spread over threads; each problem's own parallel region then runs on one.
BATCH = """extern "C" void %s_batch(void** P, const int64_t* M, int64_t nprob, int64_t nptr, int64_t nmeta) {
  #pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < nprob; ++p) %s(P + p * nptr, M + p * nmeta);
}
"""


def emit_cpu(fg: FusionGraph, group) -> KernelSource:
    if group.kind == "pointwise":
        return emit_pointwise(fg, group)
    if group.kind == "reduction":
        return emit_reduction(fg, group)
    raise EmitError("group kind %s has no kernel" % group.kind)
