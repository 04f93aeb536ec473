"""C++/OpenMP kernels for CPU tensors: the pointwise and the row-reduction shape."""
from __future__ import annotations

import re

import torch

from ..graph.fusion_graph import FusionGraph
from . import cpu_rows as rows
from . import ctypes_map as C
from .common import (check_supported, delinearize, emit_shape, flat_ok, indent, kernel_name, kernel_source,
                     preamble, product)
from .exprs import ExprBuilder
from .kernel import KernelSource
from .rowdriver import RowDriver
from .rowplan import RowPlan

PAR_MIN = 32768        # below this many elements a parallel region costs more than it saves
CHUNK = 8192           # inner-loop chunk, so a few long rows still spread over all threads
SIMD = 16              # a flat kernel's threads split at multiples of this many elements (64 bytes of floats)
OMP_RED = {"sum": "+", "mean": "+", "prod": "*", "any": "||", "all": "&&"}
# Every kernel is a function over a range [lo, hi) of its work items (flat elements, row tiles, or the rows of
# a reduction), compiled once, and an entry that calls it on all of them -- from one thread below PAR_MIN
# elements, without entering OpenMP at all (a parallel region with a false if clause still cost ~0.7 us per
# launch inside torch's process, and a combined `parallel for simd` with one also lost its vectorisation) --
# else from every thread of one parallel region, on contiguous blocks. Called inside a parallel region (a problem
# of a horizontal batch), it runs on its thread alone, as a nested region would, without opening one.
HEADER = """#include "fb_reduce.h"
#include <stdlib.h>
#include <omp.h>
typedef void (*fb_part_fn)(void**, const int64_t*, int64_t, int64_t);
static inline void fb_run(fb_part_fn part, void** P, const int64_t* M, int64_t w, bool par, int64_t grain) {
  if (!par || w <= grain || omp_in_parallel()) { part(P, M, 0, w); return; }
  #pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = ((w + nt - 1) / nt + grain - 1) / grain * grain;
    const int64_t lo = t * per < w ? t * per : w, hi = lo + per < w ? lo + per : w;
    if (lo < hi) part(P, M, lo, hi);
  }
}
"""
PART_SIG = "static __attribute__((noinline)) void %s_part(void** P, const int64_t* M, int64_t lo, int64_t hi)"


def emit_pointwise(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = ExprBuilder(fg, group)
    flat = rank <= 1 or flat_ok(fg, group, probe)
    b = ExprBuilder(fg, group, flat_index="li" if flat else None)
    b.hoist = True
    idx = tuple("i%d" % d for d in range(rank))
    if flat and rank == 1:
        b.emit("const int64_t i0 = li;")
    for out in b.written_values:
        b.store(out, idx, b.value(out, idx))
    n = product(list(range(rank)))
    body = preamble(b, rank, "cpu") + b.pre
    if flat:
        body += ["#pragma omp simd", "for (int64_t li = lo; li < hi; ++li) {"] + indent(b.lines, 2) + ["}"]
        work, grain = ["const int64_t w = n;"], SIMD
    else:
        last = rank - 1
        body += ["const int64_t nch = (d%d + %d - 1) / %d;" % (last, CHUNK, CHUNK),
                 "const int64_t row0 = lo / nch;", "int64_t ch = lo % nch;"]
        body += _counters("row0", list(range(last)))
        body += ["for (int64_t t = lo; t < hi; ++t) {",
                 "  const int64_t j0 = ch * %d, j1 = d%d < j0 + %d ? d%d : j0 + %d;" % (CHUNK, last, CHUNK, last, CHUNK),
                 "  #pragma omp simd", "  for (int64_t i%d = j0; i%d < j1; ++i%d) {" % (last, last, last)]
        body += indent(b.lines, 4) + ["  }", "  if (++ch == nch) {", "    ch = 0;"]
        body += indent(_advance(list(range(last))), 4) + ["  }", "}"]
        work = ["const int64_t inner = M[%d];" % last,
                "const int64_t w = n / inner * ((inner + %d - 1) / %d);" % (CHUNK, CHUNK)]
        grain = 1
    entry = ["const int64_t n = %s;" % _from_meta(n), "if (n == 0) return;"] + work
    body = (body, entry + ["fb_run(@_part, P, M, w, n > %d, %d);" % (PAR_MIN, grain)])
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
    driver = RowDriver(fg, b, plan, idx, cache_var, "r", const_read=False)
    lanes = rows.uses_lanes(group)
    columns = rows.ColumnCache(b, plan, rdims) if lanes else None
    phase = [0]

    def loop(body, accs, vec):
        """The loop over the reduced index r around one phase's body. A long row: rows.lane_loop, and a middle
        phase prefetches the next row. Over several reduced dims: a loop over the outer ones around the
        vectorised loop over the innermost (no division per element)."""
        phase[0] += 1
        if lanes and accs:
            pf = rows.prefetch_setup(b, group) if phase[0] > 1 else ([], [])
            return rows.lane_loop(body, accs, delinearize("r", rdims), pf)
        if len(rdims) == 1:
            return ([_simd_pragma(accs), "for (int64_t r = 0; r < R; ++r) {"]
                    + indent(delinearize("r", rdims), 2) + indent(body, 2) + ["}"])
        last = rdims[-1]
        return (["for (int64_t rq = 0, nq = d%d ? R / d%d : 0; rq < nq; ++rq) {" % (last, last)]
                + indent(delinearize("rq", rdims[:-1]), 2)
                + ["  " + _simd_pragma(accs), "  for (int64_t i%d = 0; i%d < d%d; ++i%d) {" % (last, last, last, last),
                   "    const int64_t r = rq * d%d + i%d;" % (last, last)] + indent(body, 4) + ["  }", "}"])

    def acc_type(dtype, red_op, node):
        if red_op in ("sum", "mean") and dtype == torch.float32 and rows.float_sum_ok(fg, group, node):
            return "float"
        return _acc_type(dtype, red_op)
    row, end = driver.run(loop, acc_type, acc_lvalue=rows.lane_var if lanes else (lambda a: a))
    row += end
    ncol = len(columns.vars) if columns else 0
    ncache = len(cache_var) + ncol
    body = preamble(b, rank, "cpu") + [
        "const int64_t R = %s;" % product(rdims), "const int64_t RL = R - R %% %d; (void)RL;" % rows.LANES,
        "char* cbuf = %s;" % ("(char*)malloc((size_t)R * %d + 64)" % (8 * ncache) if ncache else "nullptr")]
    for k, var in cache_var.items():
        t = driver.types[k]
        body.append("%s* %s = (%s*)(cbuf + (size_t)R * %d);" % (t, var, t, 8 * plan.cached.index(k)))
    for i, var in enumerate(columns.vars.values() if columns else ()):
        body.append("float* %s = (float*)(cbuf + (size_t)R * %d);" % (var, 8 * (len(cache_var) + i)))
    body += columns.fill if columns else []
    body += _counters("lo", outer) + ["for (int64_t o = lo; o < hi; ++o) {"]
    body += indent(row, 2) + indent(_advance(outer), 2) + ["}", "free(cbuf);"]
    entry = ["const int64_t O = %s, n = O * %s;" % (_from_meta(product(outer)), _from_meta(product(rdims))),
             "if (O == 0) return;", "fb_run(@_part, P, M, O, n > %d, 1);" % PAR_MIN]
    body = (body, entry)
    return _finish(fg, group, b, "reduction", body)


def _acc_type(dtype, red_op) -> str:
    """A float32 sum or mean adds in double (but see cpu_rows.float_sum_ok). The mean of a constant row is then
    exactly that constant (as ATen's Welford mean is), so a layer norm of a constant row is 0, not noise amplified by
    rsqrt(var + eps); and a long row (a variance over 70k elements) is as exact as ATen's double Welford,
    where float lanes drifted by 1e-4. Cost measured on the 2-core box: ~4% on softmax 1024x4096."""
    if red_op in ("sum", "mean") and dtype == torch.float32:
        return "double"
    return C.compute(dtype)


def _simd_pragma(accs) -> str:
    parts = []
    for a, acc_t, red_op, _ in accs:
        if red_op in ("max", "min"):
            op = ("fb" + red_op) if acc_t in ("float", "double") else red_op
        else:
            op = OMP_RED[red_op]
        parts.append("reduction(%s:%s)" % (op, a))
    return "#pragma omp simd " + " ".join(parts)


def _counters(start: str, dims: list) -> list:
    """Index variables i<d> of `dims` (outermost first) at the linear position `start`, as counters that
    _advance steps: one division per dim per kernel part, not per row (a 64-bit division costs tens of
    cycles, as much as a short row's whole loop)."""
    return [l.replace("const int64_t i", "int64_t i") for l in delinearize(start, dims)]


def _advance(dims: list) -> list:
    """The counters of _counters to the next position, carrying into outer dims."""
    if not dims:
        return []
    inner, rest = dims[-1], dims[:-1]
    if not rest:
        return ["++i%d;" % inner]
    return ["if (++i%d == d%d) {" % (inner, inner), "  i%d = 0;" % inner] + indent(_advance(rest), 2) + ["}"]


def _from_meta(expr: str) -> str:
    """A product of domain sizes d<k> read straight from the meta array (the entry has no preamble)."""
    return re.sub(r"\bd(\d+)\b", r"M[\1]", expr)


def _finish(fg, group, b, kind, parts) -> KernelSource:
    body, entry = parts
    text = "\n".join(body + entry)
    name = kernel_name("fb_" + kind[:3], text)
    entry = [l.replace("@_part", name + "_part") for l in entry]
    source = (HEADER + PART_SIG % name + " {\n" + "\n".join(indent(body, 2)) + "\n}\n"
              + TARGET_SIG % name + " {\n" + "\n".join(indent(entry, 2)) + "\n}\n" + BATCH % (name, name))
    return kernel_source(group, b, name, "cpu", kind, source, batch_name=name + "_batch")


TARGET_SIG = 'extern "C" void %s(void** P, const int64_t* M)'
# Horizontal batch: problems spread over threads; each problem's own parallel region then runs on one.
BATCH = """extern "C" void %s_batch(void** P, const int64_t* M, int64_t nprob, int64_t nptr, int64_t nmeta) {
  #pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < nprob; ++p) %s(P + p * nptr, M + p * nmeta);
}
"""


def emit_cpu(fg: FusionGraph, group) -> KernelSource:
    return emit_shape(fg, group, {"pointwise": emit_pointwise, "reduction": emit_reduction})
