"""CUDA row-reduction kernels: one block per row (one warp per row for rows of at most WARP_ROW_MAX
elements), threads striding over the reduced index in chunks of V, a warp-shuffle + shared-memory all-reduce
so every thread gets each result. Rows whose elements are strided in memory while consecutive rows are adjacent
(a mean over H and W of an NHWC tensor) take the column shape instead: a lane per row, 32 rows per block, the
block's warps splitting the reduced index, a shared-memory all-reduce across the warps: coalesced reads where
a block per row would read one element per 32-byte sector. The phases come from RowPlan through RowDriver (as
on the CPU). Values the plan caches between phases live in registers (a per-thread array of compile-time size,
loops unrolled) when they fit, else in dynamic shared memory, else they are recomputed.
"""
from __future__ import annotations

import math

from ..graph.fusion_graph import FusionGraph
from . import ctypes_map as C
from . import cuda_target as T
from .common import RED_T, check_supported, delinearize, indent, product, ref_of
from .cuda_vec import CudaBuilder, VecState
from .kernel import KernelSource
from .rowdriver import RowDriver
from .rowplan import RowPlan


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _ctype_size(ct: str) -> int:
    return {"float": 4, "double": 8, "int64_t": 8, "bool": 1}[ct]


class _RowShape:
    """How one reduction kernel walks its rows: warp or block per row, and where cached values live."""

    def __init__(self, mode, cache, threads, bound, kc=0, smem_per_elem=0):
        self.mode, self.cache, self.threads, self.bound = mode, cache, threads, bound
        self.kc, self.smem_per_elem = kc, smem_per_elem


def _fits_registers(kc, V, creg, item_bytes) -> bool:
    return (T.ROW_CACHE != "smem" and kc * V <= T.MAX_UNROLL and kc * V * item_bytes <= T.REG_ROW_BYTES
            and kc * V * creg <= T.REG_BUDGET)


def _choose_shape(R, V, cache_types, item_bytes=1) -> _RowShape:
    """item_bytes: size of the narrowest operand's elements (the register limit counts its bytes)."""
    creg = sum(2 if _ctype_size(t) == 8 else 1 for t in cache_types)
    nbytes = sum(_ctype_size(t) for t in cache_types)
    if not isinstance(R, int):
        if not cache_types:
            return _RowShape("block", "none", 256, T.BLOCK_BOUND)
        return _RowShape("block", "recompute", 256, T.BLOCK_BOUND)
    nc = max(1, R // V)
    if R <= T.WARP_ROW_MAX:
        if not cache_types:
            return _RowShape("warp", "none", 32 * T.WARP_ROWS_PER_BLOCK, 32 * T.WARP_ROWS_PER_BLOCK)
        kc = _ceil(nc, 32)
        if kc * V * creg <= T.REG_BUDGET and kc * V <= T.MAX_UNROLL and T.ROW_CACHE != "smem":
            return _RowShape("warp", "reg", 32 * T.WARP_ROWS_PER_BLOCK, 32 * T.WARP_ROWS_PER_BLOCK, kc)
    if not cache_types:
        return _RowShape("block", "none", 256, T.BLOCK_BOUND)
    for t in (128, 256, 512, 1024):
        kc = _ceil(nc, t)
        if _fits_registers(kc, V, creg, item_bytes):
            threads = max(32, _ceil(_ceil(nc, kc), 32) * 32)
            return _RowShape("block", "reg", threads, threads, kc)
    if R * nbytes <= T.SMEM_CACHE_MAX:
        return _RowShape("block", "smem", 256, T.BLOCK_BOUND, smem_per_elem=nbytes)
    return _RowShape("block", "recompute", 256, T.BLOCK_BOUND)


def _columns(b, domain, rdims) -> bool:
    """The column shape: static sizes, at least 32 rows, and the largest operand (a domain-ranked read) has its
    unit stride on the last kept dim and none on the last reduced one."""
    outer = [d for d in range(len(domain)) if d not in rdims]
    if not rdims or not outer or not all(isinstance(s, int) for s in domain):
        return False
    if math.prod(domain[d] for d in outer) < 32 or math.prod(domain[d] for d in rdims) < 2:
        return False
    reads = [op.meta for op in b.operands if op.meta is not None and op.meta.rank == len(domain)
             and all(isinstance(s, int) for s in op.meta.shape)]
    if not reads:
        return False
    big = max(reads, key=lambda m: m.numel)
    st = big.stride
    return (st[outer[-1]] == 1 and big.shape[outer[-1]] > 1 and st[rdims[-1]] != 1
            and big.numel >= math.prod(domain))


def emit_reduction(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = CudaBuilder(fg, group)
    plan = RowPlan(fg, group, probe.meta_of)
    rdims = list(plan.rdims)
    L = rank - 1
    if _columns(probe, tuple(group.domain), rdims):
        return _gen_reduction(fg, group, 1, columns=True)
    V = T.vec_width(probe, group.domain[L]) if rdims and rdims[-1] == L else 1
    if V > 1:
        src = _gen_reduction(fg, group, V)
        if src is not None:
            return src
    return _gen_reduction(fg, group, 1)


def _gen_reduction(fg: FusionGraph, group, V: int, columns: bool = False):
    """The kernel with chunks of V elements; None when V > 1 but no access became a vector. columns: the
    column shape (V 1, values recomputed in each phase rather than cached)."""
    b = CudaBuilder(fg, group)
    plan = RowPlan(fg, group, b.meta_of)
    rank = len(group.domain)
    rdims = list(plan.rdims)
    outer = [d for d in range(rank) if d not in rdims]
    L = rank - 1
    R = 1
    for d in rdims:
        R = R * group.domain[d] if isinstance(group.domain[d], int) and isinstance(R, int) else None
    cache_types = [C.compute(b.meta_of(ref_of(k)).dtype) for k in plan.cached]
    item_bytes = min((op.meta.dtype.itemsize for op in b.operands), default=4)
    shape = (_RowShape("column", "recompute" if cache_types else "none", 256, T.COLUMN_BOUND) if columns
             else _choose_shape(R, V, cache_types, item_bytes))
    cached = [] if shape.cache == "recompute" else list(plan.cached)
    # 8-byte values first so every shared-memory slice stays aligned
    order = sorted(range(len(cached)), key=lambda i: -_ctype_size(cache_types[i]))
    all_vars = {cached[i]: "c%d" % i for i in range(len(cached))}
    cache_type = {cached[i]: cache_types[i] for i in range(len(cached))}
    idx = tuple("i%d" % d for d in range(rank))
    names = {d: "i%d" % d for d in range(rank)}
    vnames = dict(names)
    if V > 1:
        vnames[L] = "i%db" % L
    allreduce = {"warp": "fb::warp_allreduce<fb::%s>(%s)", "column": "fb::col_allreduce<fb::%s>(%s, fb_cols)",
                 "block": "fb::block_allreduce<fb::%s>(%s, fb_scratch)"}[shape.mode]

    def chunk_loop(lines, vs, cache, V):
        nc = "NC" if V > 1 else "R"
        inner = ["const int64_t rb = c * %d;" % V if V > 1 else "const int64_t rb = c;"]
        inner += delinearize("rb", rdims, vnames if V > 1 else names)
        if V > 1:
            inner += (vs.pre if vs else []) + ["#pragma unroll", "for (int j = 0; j < %d; ++j) {" % V,
                                               "  const int64_t i%d = i%db + j; (void)i%d;" % (L, L, L)]
            inner += indent(lines, 2) + ["}"] + (vs.post if vs else [])
        else:
            inner += lines
        if cache == "reg":
            return (["#pragma unroll", "for (int k = 0; k < %d; ++k) {" % shape.kc,
                     "  const int64_t c = tr + (int64_t)k * nt;", "  if (c < %s) {" % nc]
                    + indent(inner, 4) + ["  }", "}"])
        return ["for (int64_t c = tr; c < %s; c += nt) {" % nc] + indent(inner, 2) + ["}"]

    def gen_row(vector: bool, cache: str, vv: int):
        """One row (all phases, then the per-row outputs): (lines, vector conditions, any vector access)."""
        if cache == "reg":
            cidx = "k" if vv == 1 else "k * %d + j" % vv
        else:
            cidx = "c" if vv == 1 else "c * %d + j" % vv
        driver = RowDriver(fg, b, plan, idx, {} if cache == "recompute" else all_vars, cidx, const_read=True,
                           softmax_reciprocal=True)
        conds, any_vec = [], []

        def loop(body, accs, vs):
            if vs is not None:
                any_vec.append(bool(vs.vin or vs.vout))
                conds.extend(c for c in vs.conds if c not in conds)
            return chunk_loop(body, vs, cache, vv)

        def after_loop(a, acc_t, op):
            return ["%s = %s;" % (a, allreduce % (RED_T[op], a))]
        new_vec = (lambda: VecState(vv, var="i%d" % L, base="i%db" % L)) if vector else None
        row = []
        if cache == "reg":
            for k, var in all_vars.items():
                row.append("%s %s[%d];" % (cache_type[k], var, shape.kc * vv))
        lines, end = driver.run(loop, lambda dtype, op, node: C.compute(dtype), after_loop, new_vec)
        row += lines
        if end:
            row += ["if (tr == 0%s) {" % (" && live" if shape.mode == "column" else "")] + indent(end, 2) + ["}"]
        return row, conds, any(any_vec)

    vrow, conds, any_vec = gen_row(True, shape.cache, V) if V > 1 else ([], [], False)
    if V > 1 and not any_vec:
        return None
    # with V > 1 the scalar path runs only for misaligned pointers: element by element, re-reading instead
    # of unrolling a register cache (a fraction of the code and of the compile time)
    srow, _, _ = gen_row(False, "recompute" if V > 1 and shape.cache == "reg" else shape.cache, 1)

    body = T.cuda_preamble(b, rank) + ["const int64_t O = %s, R = %s;" % (product(outer), product(rdims)),
                                      "if (O == 0) return;",
                                      "const int64_t NC = R / %d;" % V if V > 1 else "const int64_t NC = R;"]
    if shape.mode == "warp":
        body += ["const int tr = threadIdx.x & 31;", "const int64_t nt = 32;",
                 "const int64_t rows_per_block = blockDim.x >> 5;",
                 "const int64_t row0 = (int64_t)blockIdx.x * rows_per_block + (threadIdx.x >> 5);",
                 "const int64_t row_step = (int64_t)gridDim.x * rows_per_block;"]
    elif shape.mode == "column":          # lane: the row; warp: a slice of the reduced index
        body += ["__shared__ double fb_cols[1024];",
                 "const int tr = threadIdx.x >> 5;", "const int64_t nt = blockDim.x >> 5;",
                 "const int64_t lane = threadIdx.x & 31;"]
    else:
        body += ["__shared__ double fb_scratch[32];",
                 "const int tr = threadIdx.x;", "const int64_t nt = blockDim.x;",
                 "const int64_t row0 = blockIdx.x, row_step = gridDim.x;"]
    if shape.cache == "smem":
        body.append("extern __shared__ __align__(16) unsigned char fb_smem[];")
        off = []
        for i in order:
            k = cached[i]
            base = " + ".join(off) if off else "0"
            body.append("%s* %s = (%s*)(fb_smem + (%s));" % (cache_type[k], all_vars[k], cache_type[k], base))
            off.append("R * %d" % _ctype_size(cache_type[k]))

    def rows(row_lines):
        if shape.mode == "column":        # a dead lane (past the last row) computes the last row, writes nothing
            return (["for (int64_t ob = (int64_t)blockIdx.x * 32; ob < O; ob += (int64_t)gridDim.x * 32) {",
                     "  const bool live = ob + lane < O; (void)live;",
                     "  const int64_t o = live ? ob + lane : O - 1;"]
                    + indent(delinearize("o", outer, names), 2) + indent(row_lines, 2) + ["}"])
        return (["for (int64_t o = row0; o < O; o += row_step) {"]
                + indent(delinearize("o", outer, names), 2) + indent(row_lines, 2) + ["}"])

    if V > 1:
        body += ["const bool vec_ok = %s;" % " && ".join(conds or ["true"]),
                 "if (vec_ok) {"] + indent(rows(vrow), 2) + ["  return;", "}"]
    body += rows(srow)
    launch = {"shape": "row_" + shape.mode, "vec": V, "cache": shape.cache, "threads": shape.threads,
              "threads_max": shape.bound, "items_per_thread": shape.kc * V if shape.cache == "reg" else 0,
              "smem_per_elem": shape.smem_per_elem,
              "rows_per_block_max": shape.bound // 32 if shape.mode == "warp" else 1}
    return T.finish(group, b, "reduction", body, shape.bound, launch)
