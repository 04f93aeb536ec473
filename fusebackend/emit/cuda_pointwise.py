"""CUDA pointwise kernels: a grid-stride loop over chunks of V elements.

Operands read through the vectorised index are loaded and stored as 16-byte vectors when the kernel finds at
run time that every such pointer (and stride) is aligned; otherwise the same loop runs with scalar accesses.
A flat path (every operand contiguous with the domain's shape) indexes by the linear index alone and finishes
a tail of n % V elements.
"""
from __future__ import annotations

from ..graph.fusion_graph import FusionGraph
from . import cuda_target as T
from .common import check_supported, delinearize_narrow, flat_ok, indent, product
from .cuda_vec import CudaBuilder, VecState
from .kernel import KernelSource


def iteration_order(fg: FusionGraph, group) -> list:
    """The domain's dims, outermost first, in the memory order of the kernel's first written value of the
    domain's shape: a channels-last output (passes/layout.py) is walked with channels fastest, so a warp's
    threads touch consecutive addresses, not addresses C elements apart."""
    rank = len(group.domain)
    for name in group.outputs:
        m = fg.node(name).meta
        if m is None or tuple(m.shape) != tuple(group.domain) or not all(isinstance(x, int) for x in m.stride):
            continue
        return sorted(range(rank), key=lambda d: (-(m.stride[d] if m.shape[d] != 1 else 1 << 62), d))
    return list(range(rank))


def emit_pointwise(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = CudaBuilder(fg, group)
    flat = flat_ok(fg, group, probe)
    order = iteration_order(fg, group)
    permuted = not flat and order != list(range(rank))
    walk = order if permuted else list(range(rank))
    # vectors run along the walk's innermost dim: the last one, or a channels-last value's channels
    L = walk[-1] if rank else -1
    if flat:
        V = max(1, min(T.MAX_VEC, T.PW_VEC_BYTES // min(op.meta.dtype.itemsize for op in probe.operands)))
    else:
        V = T.vec_width(probe, group.domain[L] if rank else 1, T.PW_VEC_BYTES)
    b = CudaBuilder(fg, group, flat_index="li" if flat else None)
    b.hoist = True
    idx = tuple("i%d" % d for d in range(rank))
    names = {d: "i%d" % d for d in range(rank)}

    def gen(vec: VecState | None) -> list:
        b.lines, b.memo, b.vec = [], {}, vec
        for out in b.written_values:
            b.store(out, idx, b.value(out, idx))
        b.vec = None
        return b.lines

    vbody, vstate = [], None
    if V > 1 and rank >= 1:
        vstate = VecState(V, flat_base="vb") if flat else VecState(V, var="i%d" % L, base="i%db" % L)
        vbody = gen(vstate)
        if not (vstate.vin or vstate.vout):
            vstate = None
            if flat:
                V = 1
    sbody = gen(None)
    head = T.cuda_preamble(b, rank) + [
        "const int64_t n = %s;" % product(list(range(rank))),
        "if (n == 0) return;",
        "const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;",
        "const int64_t nthr = (int64_t)gridDim.x * blockDim.x;",
        "const bool fb_i32 = n <= 0x7fffffff; (void)fb_i32;   // every index fits 32-bit divisions"] + [
        l for l in b.pre]
    body = list(head)
    one = ["const int64_t i0 = li; (void)i0;"] if rank == 1 else []
    if flat:
        body.append("int64_t start = 0;")
        if vstate is not None:
            body += ["const bool vec_ok = %s;" % " && ".join(vstate.conds or ["true"]),
                     "if (vec_ok) {",
                     "  const int64_t nv = n / %d;" % V,
                     "  for (int64_t c = tid; c < nv; c += nthr) {",
                     "    const int64_t vb = c * %d;" % V]
            body += indent(vstate.pre, 4) + ["    #pragma unroll", "    for (int j = 0; j < %d; ++j) {" % V,
                                             "      const int64_t li = vb + j;"]
            body += indent(one + vbody, 6) + ["    }"] + indent(vstate.post, 4)
            body += ["  }", "  start = nv * %d;" % V, "}"]
        body += ["for (int64_t li = start + tid; li < n; li += nthr) {"] + indent(one + sbody, 2) + ["}"]
    elif V > 1:
        # chunks of V along the walk's innermost dim (its size is a multiple of V): one index division per chunk
        vnames = dict(names)
        vnames[L] = "i%db" % L

        def chunk_loop(lines, vs):
            out = ["for (int64_t c = tid; c < n / %d; c += nthr) {" % V, "  const int64_t cb = c * %d;" % V]
            out += indent(delinearize_narrow("cb", walk, vnames), 2)
            out += indent(vs.pre if vs else [], 2)
            out += ["  #pragma unroll", "  for (int j = 0; j < %d; ++j) {" % V,
                    "    const int64_t i%d = i%db + j; (void)i%d;" % (L, L, L)]
            out += indent(lines, 4) + ["  }"] + indent(vs.post if vs else [], 2) + ["}"]
            return out
        if vstate is not None:      # misaligned operands: the compact element-wise loop
            body += ["const bool vec_ok = %s;" % " && ".join(vstate.conds or ["true"]),
                     "if (vec_ok) {"] + indent(chunk_loop(vbody, vstate), 2) + ["  return;", "}"]
            body += ["for (int64_t li = tid; li < n; li += nthr) {"]
            body += indent(delinearize_narrow("li", walk, names), 2) + indent(sbody, 2) + ["}"]
        else:
            body += chunk_loop(sbody, None)
    else:
        body += ["for (int64_t li = tid; li < n; li += nthr) {"]
        body += indent(delinearize_narrow("li", walk, names), 2)
        body += indent(sbody, 2)
        body += ["}"]
    launch = {"shape": "pointwise", "vec": V, "threads": T.PW_THREADS, "threads_max": T.PW_BOUND}
    return T.finish(group, b, "pointwise", body, T.PW_BOUND, launch)
