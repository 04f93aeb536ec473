"""CUDA C++ kernels for GPU tensors: the pointwise and the row-reduction shape (NVRTC- and nvcc-clean).

Same values, same calling convention as the C++/OpenMP target (emit/cpu.py): ExprBuilder writes the scalar
code, RowPlan the phases of a reduction; pointers and the int64 meta array (domain sizes, then each operand's
strides) arrive as one kernel parameter by value (`fb::KArgs`, fb_cuda.h), so a launch copies nothing.

Pointwise: a grid-stride loop over chunks of V elements. Operands read through the vectorised index are
loaded and stored as 16-byte vectors when the kernel finds at run time that every such pointer (and stride)
is aligned; otherwise the same loop runs with scalar accesses. A flat path (every operand contiguous with the
domain's shape) indexes by the linear index alone and finishes a tail of n % V elements.

Reductions: one block per row (one warp per row for rows of at most WARP_ROW_MAX elements), threads striding
over the reduced index in chunks of V, a warp-shuffle + shared-memory all-reduce so every thread gets each
result. Values the row plan caches between phases live in registers (a per-thread array of compile-time size,
loops unrolled) when they fit, else in dynamic shared memory, else they are recomputed.

The launch shape is not in the source: `KernelSource.launch` carries hints (threads per block bounds, vector
width, shared memory per row element); runtime/cuda_compiler.py chooses the block and grid from the device.
"""
from __future__ import annotations

import re

import torch

from ..graph import registry
from ..graph.fusion_graph import FusionGraph, Ref
from . import ctypes_map as C
from .common import check_supported, indent, kernel_name, preamble, product
from .exprs import EmitError, ExprBuilder
from .kernel import KernelSource
from .rowplan import RowPlan

HEADER = '#include "fb_cuda.h"\n'
MAX_PARAM_BYTES = 4000      # the classic kernel-parameter limit (4 KiB), with room to spare
PW_THREADS = 256            # preferred threads per block, pointwise
PW_BOUND = 512              # __launch_bounds__ of pointwise kernels (the runtime never exceeds it)
VEC_BYTES = 16              # bytes per thread per chunk, row reductions (one 16-byte access per operand)
PW_VEC_BYTES = 16           # bytes per thread per chunk, pointwise (32: two 16-byte accesses per operand)
MAX_VEC = 16                # elements per thread per chunk
REG_BUDGET = 64             # 32-bit registers per thread for row values cached between phases
MAX_UNROLL = 16             # unrolled elements per thread when the row is cached in registers
# Measured on one H100 (16384x4096 rows, ms): MAX_UNROLL 8 / 16 / 32: softmax f32 0.297 / 0.289 / 0.359,
# layer norm + gelu bf16 0.240 / 0.217 / 0.229; VEC_BYTES 32 instead of 16: softmax 0.292 vs 0.281,
# RMS norm bf16 0.114 vs 0.102, layer norm 0.176 vs 0.180 (noise): 16 bytes and 16 elements it is.
WARP_ROW_MAX = 1024         # rows this short run one per warp (no block barrier)
WARP_ROWS_PER_BLOCK = 4     # warps (rows) per block in the warp shape
BLOCK_BOUND = 1024          # __launch_bounds__ of block-per-row kernels that hold nothing in registers
SMEM_CACHE_MAX = 160 * 1024 # dynamic shared memory for a cached row (the runtime checks the device's limit)
RED_T = {"sum": "SumR", "mean": "SumR", "prod": "ProdR", "max": "MaxR", "min": "MinR", "any": "AnyR",
         "all": "AllR"}


def _align_elems(dtype: torch.dtype, n: int) -> int:
    """Elements per alignment unit of a Vec<T, n> (its alignment is min(16, n * itemsize) bytes)."""
    size = dtype.itemsize
    b = n * size
    a = 16 if b >= 16 else (8 if b >= 8 else (4 if b >= 4 else (2 if b >= 2 else 1)))
    return max(1, a // size)


class VecState:
    """Vector accesses of one chunk loop: loads hoisted before the unrolled j loop, stores after it."""

    def __init__(self, n: int, var: str | None = None, base: str | None = None, flat_base: str | None = None):
        self.n, self.var, self.base, self.flat_base = n, var, base, flat_base
        self.token = re.compile(r"\b%s\b" % re.escape(var)) if var else None
        self.pre, self.post, self.conds = [], [], []
        self.vin, self.vout = {}, {}

    def _cond(self, c: str):
        if c not in self.conds:
            self.conds.append(c)

    def base_offset(self, b: ExprBuilder, op, idx: tuple):
        """Offset of the chunk's first element for op at idx, or None when the access cannot be a vector."""
        if self.flat_base is not None:
            if b.flat_index is not None and op.meta.contiguous:
                op.flat = True
                self._cond("fb::vec_aligned<%d>(%s)" % (self.n, op.ptr))
                return self.flat_base
            return None
        hits = [d for d, e in enumerate(idx) if self.token.search(e)]
        if len(hits) != 1 or idx[hits[0]] != self.var:
            return None
        d = hits[0]
        if op.meta.shape[d] == 1 or op.meta.stride[d] != 1:
            return None
        q = _align_elems(op.meta.dtype, self.n)
        conds = []
        for d2, e in enumerate(idx):
            if d2 == d or e == "0" or op.meta.shape[d2] == 1:
                continue
            if op.meta.stride[d2] == 1:      # a second unit-stride dim: its term is not a multiple of a stride
                return None
            if q > 1:
                conds.append("%s %% %d == 0" % (op.stride(d2), q))
        for c in conds:
            self._cond(c)
        self._cond("fb::vec_aligned<%d>(%s)" % (self.n, op.ptr))
        return b.offset(op, idx[:d] + (self.base,) + idx[d + 1:])


class CudaBuilder(ExprBuilder):
    """ExprBuilder whose loads and stores become lanes of 16-byte vectors inside a vector chunk loop."""

    def __init__(self, fg: FusionGraph, group, flat_index=None):
        super().__init__(fg, group, flat_index)
        self.vec: VecState | None = None

    def _op(self, ref):
        return self.by_key.get(ref) or self.by_key.get(Ref(ref.name))

    def emit(self, line: str):
        # float -> bf16 through the chip's conversion instruction (fb_cuda.h), not fb_core.h's bit arithmetic
        self.lines.append(line.replace("fb::st<fb::bf16>(", "fb::cu_st_bf16(")
                          .replace("fb::round_bf16(", "fb::cu_round_bf16("))

    def load(self, ref: Ref, idx: tuple) -> str:
        v = self.vec
        op = self._op(ref) if v is not None else None
        base = v.base_offset(self, op, idx) if op is not None else None
        if base is None:
            return super().load(ref, idx)
        st, ct = C.storage(op.meta.dtype), C.compute(op.meta.dtype)
        key = (op.slot, base)
        if key not in v.vin:
            t = self.fresh("t")
            v.pre.append("const fb::Vec<%s, %d> %s = fb::ldv<%d>(%s + %s);" % (st, v.n, t, v.n, op.ptr, base))
            v.vin[key] = t
        var = self.fresh()
        self.emit("const %s %s = fb::ld<%s>(%s.v[j]);" % (ct, var, ct, v.vin[key]))
        return var

    def store(self, name: str, idx: tuple, var: str) -> None:
        v = self.vec
        op = self.by_key[name]
        base = v.base_offset(self, op, idx) if v is not None else None
        if base is None:
            return super().store(name, idx, var)
        st = C.storage(op.meta.dtype)
        key = (op.slot, base)
        if key not in v.vout:
            u = self.fresh("u")
            v.pre.append("fb::Vec<%s, %d> %s;" % (st, v.n, u))
            v.post.append("fb::stv<%d>(%s + %s, %s);" % (v.n, op.ptr, base, u))
            v.vout[key] = u
        self.emit("%s.v[j] = fb::st<%s>(%s);" % (v.vout[key], st, var))

    @property
    def vectorised(self) -> bool:
        return self.vec is not None and bool(self.vec.vin or self.vec.vout)


# ---------------------------------------------------------------- shared pieces

def _static_int(v):
    return v if isinstance(v, int) else None


def _vec_width(b: ExprBuilder, inner, nbytes: int | None = None) -> int:
    """Elements per chunk: nbytes of the narrowest operand, halved until it divides the inner size."""
    nbytes = VEC_BYTES if nbytes is None else nbytes
    sizes = [op.meta.dtype.itemsize for op in b.operands]
    v = max(1, min(MAX_VEC, nbytes // min(sizes))) if sizes else 1
    if not isinstance(inner, int) or inner <= 0:
        return 1
    while v > 1 and inner % v:
        v //= 2
    return v


def _delin(var: str, dims: list, names: dict) -> list:
    """Index variables (names[d]) for `dims`, outermost first, from a linear index over those dims."""
    if not dims:
        return []
    if len(dims) == 1:
        return ["const int64_t %s = %s;" % (names[dims[0]], var)]
    lines = ["int64_t rem_%s = %s;" % (var, var)]
    for k, d in enumerate(reversed(dims)):
        if k == len(dims) - 1:
            lines.append("const int64_t %s = rem_%s;" % (names[d], var))
        else:
            lines.append("const int64_t %s = rem_%s %% d%d; rem_%s /= d%d;" % (names[d], var, d, var, d))
    return lines


def _cuda_preamble(b: ExprBuilder, rank: int) -> list:
    """common.preamble, reading pointers and sizes straight from the by-value argument struct."""
    out = []
    for line in preamble(b, rank, "cuda"):
        out.append(re.sub(r"\bP\[", "A.p[", re.sub(r"\bM\[", "A.m[", line)))
    return out


def _signature(name: str, b: ExprBuilder, rank: int, bound: int) -> str:
    nm = rank + sum(op.meta.rank for op in b.operands)
    np_ = len(b.operands)
    if 8 * (np_ + max(1, nm)) > MAX_PARAM_BYTES:
        raise EmitError("%d operands and %d sizes/strides exceed the kernel parameter limit" % (np_, nm))
    return ('extern "C" __global__ void __launch_bounds__(%d) %s(const fb::KArgs<%d, %d> A)'
            % (bound, name, np_, max(1, nm)))


def _finish(fg, group, b: ExprBuilder, kind: str, body: list, bound: int, launch: dict) -> KernelSource:
    rank = len(group.domain)
    text = "\n".join(body)
    name = kernel_name("fb_cu_" + kind[:3], text + repr(sorted(launch.items())) + str(bound))
    source = HEADER + _signature(name, b, rank, bound) + " {\n" + "\n".join(indent(body, 2)) + "\n}\n"
    return KernelSource(
        name=name, target="cuda", kind=kind, source=source,
        inputs=[op.key for op in b.operands if not op.is_output],
        outputs=[op.key for op in b.operands if op.is_output],
        domain=tuple(group.domain), reduce_dims=tuple(group.reduce_dims),
        operand_ranks=tuple(op.meta.rank for op in b.operands),
        unit_strides=tuple((op.slot, d) for op in b.operands for d in sorted(op.unit_dims)),
        contiguous_slots=tuple(op.slot for op in b.operands if op.flat),
        launch=dict(launch, bound=bound))


# ---------------------------------------------------------------- pointwise

def _flat_ok(fg: FusionGraph, group, b: ExprBuilder) -> bool:
    if any(fg.node(n).kind == "view" for n in group.nodes):
        return False
    return all(op.meta.shape == tuple(group.domain) and op.meta.contiguous for op in b.operands)


def emit_pointwise(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = CudaBuilder(fg, group)
    flat = _flat_ok(fg, group, probe)
    if flat:
        V = max(1, min(MAX_VEC, PW_VEC_BYTES // min(op.meta.dtype.itemsize for op in probe.operands)))
    else:
        V = _vec_width(probe, group.domain[-1] if rank else 1, PW_VEC_BYTES)
    b = CudaBuilder(fg, group, flat_index="li" if flat else None)
    L = rank - 1
    idx = tuple("i%d" % d for d in range(rank))
    names = {d: "i%d" % d for d in range(rank)}

    def gen(vec: VecState | None) -> list:
        b.lines, b.memo, b.vec = [], {}, vec
        for out in group.outputs:
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
    head = _cuda_preamble(b, rank) + [
        "const int64_t n = %s;" % product(list(range(rank))),
        "if (n == 0) return;",
        "const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;",
        "const int64_t nthr = (int64_t)gridDim.x * blockDim.x;"]
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
        # chunks of V along the innermost dim (its size is a multiple of V): one index division per chunk
        vnames = dict(names)
        vnames[L] = "i%db" % L

        def chunk_loop(lines, vs):
            out = ["for (int64_t c = tid; c < n / %d; c += nthr) {" % V, "  const int64_t cb = c * %d;" % V]
            out += indent(_delin("cb", list(range(rank)), vnames), 2)
            out += indent(vs.pre if vs else [], 2)
            out += ["  #pragma unroll", "  for (int j = 0; j < %d; ++j) {" % V,
                    "    const int64_t i%d = i%db + j; (void)i%d;" % (L, L, L)]
            out += indent(lines, 4) + ["  }"] + indent(vs.post if vs else [], 2) + ["}"]
            return out
        if vstate is not None:      # misaligned operands: the compact element-wise loop
            body += ["const bool vec_ok = %s;" % " && ".join(vstate.conds or ["true"]),
                     "if (vec_ok) {"] + indent(chunk_loop(vbody, vstate), 2) + ["  return;", "}"]
            body += ["for (int64_t li = tid; li < n; li += nthr) {"]
            body += indent(_delin("li", list(range(rank)), names), 2) + indent(sbody, 2) + ["}"]
        else:
            body += chunk_loop(sbody, None)
    else:
        body += ["for (int64_t li = tid; li < n; li += nthr) {"]
        body += indent(_delin("li", list(range(rank)), names), 2) + indent(sbody, 2) + ["}"]
    launch = {"shape": "pointwise", "vec": V, "threads": PW_THREADS, "threads_max": PW_BOUND}
    return _finish(fg, group, b, "pointwise", body, PW_BOUND, launch)


# ---------------------------------------------------------------- reductions

def _ref(key):
    return Ref(key[0], key[1])


def _red_op(fg, name) -> str:
    node = fg.node(name)
    return registry.normalize_reduction(node.target, node.args, node.kwargs).op


def _scalar_index(shape, plan, idx):
    if len(shape) == len(plan.domain):
        return tuple("0" if d in plan.rdims else idx[d] for d in range(len(idx)))
    return tuple(idx[d] for d in range(len(idx)) if d not in plan.rdims)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _ctype_size(ct: str) -> int:
    return {"float": 4, "double": 8, "int64_t": 8, "bool": 1}[ct]


class _RowShape:
    """How one reduction kernel walks its rows: warp or block per row, and where cached values live."""

    def __init__(self, mode, cache, threads, bound, kc=0, smem_per_elem=0):
        self.mode, self.cache, self.threads, self.bound = mode, cache, threads, bound
        self.kc, self.smem_per_elem = kc, smem_per_elem


def _choose_shape(R, V, cache_types) -> _RowShape:
    creg = sum(2 if _ctype_size(t) == 8 else 1 for t in cache_types)
    nbytes = sum(_ctype_size(t) for t in cache_types)
    if not isinstance(R, int):
        if not cache_types:
            return _RowShape("block", "none", 256, BLOCK_BOUND)
        return _RowShape("block", "recompute", 256, BLOCK_BOUND)
    nc = max(1, R // V)
    if R <= WARP_ROW_MAX:
        if not cache_types:
            return _RowShape("warp", "none", 32 * WARP_ROWS_PER_BLOCK, 32 * WARP_ROWS_PER_BLOCK)
        kc = _ceil(nc, 32)
        if kc * V * creg <= REG_BUDGET and kc * V <= MAX_UNROLL:
            return _RowShape("warp", "reg", 32 * WARP_ROWS_PER_BLOCK, 32 * WARP_ROWS_PER_BLOCK, kc)
    if not cache_types:
        return _RowShape("block", "none", 256, BLOCK_BOUND)
    for t in (128, 256, 512, 1024):
        kc = _ceil(nc, t)
        if kc * V <= MAX_UNROLL and kc * V * creg <= REG_BUDGET:
            threads = max(32, _ceil(_ceil(nc, kc), 32) * 32)
            return _RowShape("block", "reg", threads, threads, kc)
    if R * nbytes <= SMEM_CACHE_MAX:
        return _RowShape("block", "smem", 256, BLOCK_BOUND, smem_per_elem=nbytes)
    return _RowShape("block", "recompute", 256, BLOCK_BOUND)


def emit_reduction(fg: FusionGraph, group) -> KernelSource:
    check_supported(fg, group)
    rank = len(group.domain)
    probe = CudaBuilder(fg, group)
    plan = RowPlan(fg, group, probe.meta_of)
    rdims = list(plan.rdims)
    L = rank - 1
    V = _vec_width(probe, group.domain[L]) if rdims and rdims[-1] == L else 1
    if V > 1:
        src = _gen_reduction(fg, group, V)
        if src is not None:
            return src
    return _gen_reduction(fg, group, 1)


def _gen_reduction(fg: FusionGraph, group, V: int):
    """The kernel with chunks of V elements; None when V > 1 but no access became a vector."""
    b = CudaBuilder(fg, group)
    plan = RowPlan(fg, group, b.meta_of)
    rank = len(group.domain)
    rdims = list(plan.rdims)
    outer = [d for d in range(rank) if d not in rdims]
    L = rank - 1
    R = 1
    for d in rdims:
        R = R * group.domain[d] if isinstance(group.domain[d], int) and isinstance(R, int) else None
    cache_types = [C.compute(b.meta_of(_ref(k)).dtype) for k in plan.cached]
    shape = _choose_shape(R, V, cache_types)
    if shape.cache == "recompute":
        cached = []
    else:
        cached = list(plan.cached)
    # 8-byte values first so every shared-memory slice stays aligned
    order = sorted(range(len(cached)), key=lambda i: -_ctype_size(cache_types[i]))
    all_vars = {cached[i]: "c%d" % i for i in range(len(cached))}
    cache_type = {cached[i]: cache_types[i] for i in range(len(cached))}
    cur = {}      # the path being generated: its cache mode, cached variables and their index
    idx = tuple("i%d" % d for d in range(rank))
    names = {d: "i%d" % d for d in range(rank)}
    vnames = dict(names)
    if V > 1:
        vnames[L] = "i%db" % L

    def set_path(cache: str, vv: int):
        cur["cache"], cur["V"] = cache, vv
        cur["vars"] = {} if cache == "recompute" else all_vars
        if cache == "reg":
            cur["cidx"] = "k" if vv == 1 else "k * %d + j" % vv
        else:
            cur["cidx"] = "c" if vv == 1 else "c * %d + j" % vv
    allreduce = ("fb::warp_allreduce<fb::%s>(%s)" if shape.mode == "warp"
                 else "fb::block_allreduce<fb::%s>(%s, fb_scratch)")
    row_memo, state = {}, {"pre": None, "phase": 0}

    def hook(ref_key, at):
        name = ref_key[0]
        if plan.per_row(_ref(ref_key)):
            mk = (name, at)
            if mk not in row_memo:
                saved = b.lines, b.hook, b.vec
                b.lines, b.hook, b.vec = state["pre"], hook, None
                row_memo[mk] = b.compute(name, at) if name in plan.members else b.load(_ref(ref_key), at)
                b.lines, b.hook, b.vec = saved
            return row_memo[mk]
        if ref_key in cur["vars"] and plan.home[ref_key] < state["phase"] and at == idx:
            var = b.fresh()
            b.emit("const %s %s = %s[%s];" % (cache_type[ref_key], var, cur["vars"][ref_key], cur["cidx"]))
            return var
        return None

    b.hook = hook

    def chunk_loop(lines, vs):
        V = cur["V"]
        nc = "NC" if V > 1 else "R"
        inner = ["const int64_t rb = c * %d;" % V if V > 1 else "const int64_t rb = c;"]
        inner += _delin("rb", rdims, vnames if V > 1 else names)
        if V > 1:
            inner += (vs.pre if vs else []) + ["#pragma unroll", "for (int j = 0; j < %d; ++j) {" % V,
                                               "  const int64_t i%d = i%db + j; (void)i%d;" % (L, L, L)]
            inner += indent(lines, 2) + ["}"] + (vs.post if vs else [])
        else:
            inner += lines
        if cur["cache"] == "reg":
            return (["#pragma unroll", "for (int k = 0; k < %d; ++k) {" % shape.kc,
                     "  const int64_t c = tr + (int64_t)k * nt;", "  if (c < %s) {" % nc]
                    + indent(inner, 4) + ["  }", "}"])
        return ["for (int64_t c = tr; c < %s; c += nt) {" % nc] + indent(inner, 2) + ["}"]

    def gen_row(vector: bool, cache: str, vv: int):
        """One row (all phases, then the per-row outputs): (lines, vector conditions, any vector access)."""
        set_path(cache, vv)
        V = vv
        row_memo.clear()
        b.reduction_value = {}
        row, conds, any_vec = [], [], False
        if cache == "reg":
            for k, var in all_vars.items():
                row.append("%s %s[%d];" % (cache_type[k], var, shape.kc * V))
        for p in range(plan.num_phases):
            pre, loop = [], []
            state.update(pre=pre, phase=p)
            b.lines, b.memo = loop, {}
            vs = VecState(V, var="i%d" % L, base="i%db" % L) if vector else None
            b.vec = vs
            reds = [r for r in plan.reductions if plan.level[r] == p]
            for k, var in cur["vars"].items():    # values born in this phase are computed now and cached
                if plan.home[k] == p:
                    v = b.value(_ref(k), idx)
                    b.emit("%s[%s] = %s;" % (var, cur["cidx"], v))
            accs = []
            for r in reds:
                v = b.value(plan.red_input(r), idx)
                acc_t = C.compute(fg.node(r).meta.dtype)
                red_op = _red_op(fg, r)
                b.emit("a_%s = fb::%s::combine(a_%s, (%s)%s);" % (r, RED_T[red_op], r, acc_t, v))
                accs.append((r, acc_t, red_op))
            if p == plan.num_levels:
                for out in plan.row_outputs:
                    b.store(out, idx, b.value(out, idx))
            b.vec = None
            if vs is not None:
                any_vec = any_vec or bool(vs.vin or vs.vout)
                conds += [c for c in vs.conds if c not in conds]
            row += pre
            for r, acc_t, red_op in accs:
                row.append("%s a_%s = fb::%s::identity<%s>();" % (acc_t, r, RED_T[red_op], acc_t))
            row += chunk_loop(loop, vs)
            for r, acc_t, red_op in accs:
                row.append("a_%s = %s;" % (r, allreduce % (RED_T[red_op], "a_%s" % r)))
                if red_op == "mean":
                    row.append("a_%s = a_%s / (%s)R;" % (r, r, acc_t))
                b.reduction_value[r] = "a_%s" % r
        end = []
        state.update(pre=end, phase=plan.num_phases)
        b.lines = end
        for out in plan.scalar_outputs:
            out_idx = _scalar_index(fg.node(out).meta.shape, plan, idx)
            b.store(out, out_idx, b.value(out, out_idx))
        if end:
            row += ["if (tr == 0) {"] + indent(end, 2) + ["}"]
        return row, conds, any_vec

    vrow, conds, any_vec = gen_row(True, shape.cache, V) if V > 1 else ([], [], False)
    if V > 1 and not any_vec:
        return None
    # with V > 1 the scalar path runs only for misaligned pointers: element by element, re-reading instead
    # of unrolling a register cache (a fraction of the code and of the compile time)
    srow, _, _ = gen_row(False, "recompute" if V > 1 and shape.cache == "reg" else shape.cache, 1)

    body = _cuda_preamble(b, rank) + ["const int64_t O = %s, R = %s;" % (product(outer), product(rdims)),
                                      "if (O == 0) return;",
                                      "const int64_t NC = R / %d;" % V if V > 1 else "const int64_t NC = R;"]
    if shape.mode == "warp":
        body += ["const int tr = threadIdx.x & 31;", "const int64_t nt = 32;",
                 "const int64_t rows_per_block = blockDim.x >> 5;",
                 "const int64_t row0 = (int64_t)blockIdx.x * rows_per_block + (threadIdx.x >> 5);",
                 "const int64_t row_step = (int64_t)gridDim.x * rows_per_block;"]
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
        return (["for (int64_t o = row0; o < O; o += row_step) {"]
                + indent(_delin("o", outer, names), 2) + indent(row_lines, 2) + ["}"])

    if V > 1:
        body += ["const bool vec_ok = %s;" % " && ".join(conds or ["true"]),
                 "if (vec_ok) {"] + indent(rows(vrow), 2) + ["  return;", "}"]
    body += rows(srow)
    launch = {"shape": "row_" + shape.mode, "vec": V, "cache": shape.cache, "threads": shape.threads,
              "threads_max": shape.bound, "items_per_thread": shape.kc * V if shape.cache == "reg" else 0,
              "smem_per_elem": shape.smem_per_elem,
              "rows_per_block_max": shape.bound // 32 if shape.mode == "warp" else 1}
    return _finish(fg, group, b, "reduction", body, shape.bound, launch)


def emit_cuda(fg: FusionGraph, group) -> KernelSource:
    if group.kind == "pointwise":
        return emit_pointwise(fg, group)
    if group.kind == "reduction":
        return emit_reduction(fg, group)
    raise EmitError("group kind %s has no kernel" % group.kind)
