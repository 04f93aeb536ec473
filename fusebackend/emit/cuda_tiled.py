"""CUDA tiled pointwise kernels: a transpose (or layout change) fused with pointwise work, through shared memory.

The plain pointwise kernel walks the domain in its output's memory order; an input whose unit-stride dim is
another domain dim is then read with a stride of thousands of elements (`k.transpose(-1, -2).contiguous()`,
an NCHW <-> NHWC clone). Here the domain is cut into TILE x TILE tiles of two index runs:

* A: the output's fastest dims (a run of domain dims contiguous in the output), the store-coalesced side;
* B: the mismatched input's fastest dims (contiguous in that input), the load-coalesced side;

every other dim (and the tile's position) comes from the block's tile index, in a grid-stride loop over
tiles. Phase 1 has the warp's lanes along B and loads each staged input into a shared tile (row a, column b,
padded to TILE + 1 columns so neither phase's column walk hits one bank twice); phase 2 has the lanes along
A, reads the staged values back transposed, reads every other input directly (they agree with the output, or
are broadcast along A) and computes and stores the written values. Edge tiles are masked in both phases.

A group takes this shape only when the plan says it pays (`plan_tiles`); otherwise the plain kernel runs it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..graph.fusion_graph import FusionGraph
from . import ctypes_map as C
from . import cuda_target as T
from .common import check_supported, delinearize, indent, product
from .cuda_vec import CudaBuilder
from .errors import EmitError
from .exprs import ExprBuilder
from .kernel import KernelSource

_PLAIN = re.compile(r"i(\d+)")
_CT_BYTES = {"float": 4, "double": 8, "int64_t": 8, "bool": 1}


@dataclass
class TilePlan:
    a_dims: list                # the output's run, innermost first
    b_dims: list                # the staged input's run, innermost first
    other: list                 # the remaining dims, outermost first
    staged: list = field(default_factory=list)   # (slot, idx) of the loads that go through a tile


def _domain_dims(idx: tuple):
    """Operand dim -> domain dim for an index of plain loop variables and zeros, else None."""
    out = {}
    for k, e in enumerate(idx):
        if e == "0":
            continue
        m = _PLAIN.fullmatch(e)
        if m is None:
            return None
        out[k] = int(m.group(1))
    return out


def _strides(op, idx: tuple, domain: tuple):
    """Domain dim -> the operand's compile-time stride along it (dims the operand spans, size > 1), or None
    unless every such dim spans the whole domain dim: a load that is in bounds wherever phase 1 runs it (a
    cat's part is read only where its branch is taken, exprs_index._cat, and stays out of the tiles)."""
    dims = _domain_dims(idx)
    if dims is None or not all(isinstance(s, int) for s in op.meta.stride):
        return None
    if any(op.meta.shape[k] not in (1, domain[g]) for k, g in dims.items()):
        return None
    return {g: op.meta.stride[k] for k, g in dims.items() if op.meta.shape[k] != 1}


def _fast(strides) -> int | None:
    """The domain dim along which the operand has unit stride."""
    hits = [g for g, s in (strides or {}).items() if s == 1]
    return hits[0] if len(hits) == 1 else None


def _run(strides: dict, start: int, stop: set, domain: tuple) -> list:
    """Domain dims contiguous in the operand from `start` outwards (innermost first), none of `stop`: the
    side of a tile can then span several small dims (an NCHW input's H and W) as one linear index."""
    run, want = [start], domain[start]
    while True:
        nxt = [g for g, s in strides.items() if s == want and g not in run and g not in stop and domain[g] != 1]
        if not nxt:
            return run
        run.append(nxt[0])
        want *= domain[nxt[0]]


class _Recorder(CudaBuilder):
    """A probe: the group's code generated once, every load at its index recorded."""

    def __init__(self, fg, group):
        super().__init__(fg, group)
        self.loads = []

    def load(self, ref, idx):
        op = self._op(ref)
        if op is not None and not self.in_pre:
            self.loads.append((op, idx))
        return super().load(ref, idx)


def plan_tiles(fg: FusionGraph, group) -> TilePlan | None:
    """The tiles of a pointwise group whose outputs and a large input disagree on their unit-stride dim, or
    None when the plain kernel should run it (sizes symbolic or small, outputs disagreeing, nothing to stage)."""
    domain = tuple(group.domain)
    rank = len(domain)
    if rank < 2 or not all(isinstance(s, int) for s in domain):
        return None
    probe = _Recorder(fg, group)
    probe.hoist = True
    idx = tuple("i%d" % d for d in range(rank))
    try:
        for out in probe.written_values:
            probe.store(out, idx, probe.value(out, idx))
    except EmitError:
        return None             # the plain emitter raises the same error, with its own reason
    fasts, out_strides = set(), None
    for out in probe.written_values:
        st = _strides(probe.out_operand(out), idx, domain)
        fasts.add(_fast(st))
        out_strides = out_strides or st
    if len(fasts) != 1 or None in fasts:
        return None             # outputs that disagree among themselves: not one store side
    a = fasts.pop()
    cands = []
    for op, lidx in probe.loads:
        st = _strides(op, lidx, domain)
        f = _fast(st)
        if not op.written and f is not None and f != a and a in st:
            cands.append((op, lidx, st, f))
    if not cands:
        return None
    weight = {}
    for op, _, _, f in cands:
        weight[f] = weight.get(f, 0) + op.meta.dtype.itemsize
    b = max(weight, key=lambda f: (weight[f], -[c[3] for c in cands].index(f)))
    first = next(c for c in cands if c[3] == b)
    A = _run(out_strides, a, {b}, domain)
    B = _run(first[2], b, set(A), domain)
    LA, LB = product_of(domain, A), product_of(domain, B)
    if LA < T.TILE_MIN or LB < T.TILE_MIN:
        return None
    staged = []
    for op, lidx, st, f in cands:
        # only an input strided along A is worth a tile; one broadcast along A is a warp-wide broadcast
        if f == b and any(d in st for d in A) and (op.slot, lidx) not in staged and len(staged) < T.TILE_MAX_STAGED:
            staged.append((op.slot, lidx))
    if not staged:
        return None
    other = [d for d in range(rank) if d not in A and d not in B]
    return TilePlan(A, B, other, staged)


def product_of(domain: tuple, dims: list) -> int:
    n = 1
    for d in dims:
        n *= domain[d]
    return n


class TiledBuilder(CudaBuilder):
    """The phase-2 code of a tiled kernel: staged loads read their tile, transposed; phase-1 code collects
    the loads that fill each tile."""

    def __init__(self, fg, group, staged):
        super().__init__(fg, group)
        self.staged = list(staged)
        self.tiles = {}             # (slot, idx) -> (tile variable, compute type)
        self.phase1 = []

    def load(self, ref, idx):
        op = self._op(ref)
        key = (op.slot, idx) if op is not None else None
        if self.in_pre or key not in self.staged:
            return super().load(ref, idx)
        ct = C.compute(op.meta.dtype)
        if key not in self.tiles:
            tile = "fb_tile%d" % len(self.tiles)
            self.tiles[key] = (tile, ct)
            saved, self.lines = self.lines, []
            var = ExprBuilder.load(self, ref, idx)         # phase 1: lanes along B, coalesced
            self.phase1 += self.lines + ["fb_r%d[fb_k] = %s;" % (len(self.tiles) - 1, var)]
            self.lines = saved
        var = self.fresh()
        self.emit("const %s %s = %s[fb_ta * %d + TR];" % (ct, var, self.tiles[key][0], T.TILE + 1))
        return var


def _tile_bytes(ct: str, rows: int) -> int:
    return -(-rows * (T.TILE + 1) * _CT_BYTES[ct] // 16) * 16


def _a_rows(fg, group, b) -> int:
    """The tile's A side: TILE, or 2 x TILE where every staged input and output is 2 bytes or narrower -- a
    warp's row access is then 64 bytes, and twice the rows keep as many bytes in flight per thread as float32
    does (a tile's loads finish before its stores start: bytes in flight bound the copy rate)."""
    sizes = [op.meta.dtype.itemsize for op in b.operands if op.slot in {k[0] for k in b.tiles} or op.written]
    return 2 * T.TILE if sizes and max(sizes) <= 2 else T.TILE


def emit_tiled(fg: FusionGraph, group, plan: TilePlan | None = None) -> KernelSource | None:
    """The tiled kernel of a pointwise group, or None when `plan_tiles` keeps it on the plain kernel."""
    check_supported(fg, group)
    plan = plan or plan_tiles(fg, group)
    if plan is None:
        return None
    rank = len(group.domain)
    b = TiledBuilder(fg, group, plan.staged)
    b.hoist = True
    idx = tuple("i%d" % d for d in range(rank))
    for out in b.written_values:
        b.store(out, idx, b.value(out, idx))
    if not b.tiles:
        return None
    tile, A, B = T.TILE, plan.a_dims, plan.b_dims
    ta = _a_rows(fg, group, b)
    smem, decl = 0, ["extern __shared__ __align__(16) unsigned char fb_smem[];"]
    for var, ct in b.tiles.values():
        decl.append("%s* __restrict__ %s = (%s*)(fb_smem + %d);" % (ct, var, ct, smem))
        smem += _tile_bytes(ct, ta)
    side_a, side_b = delinearize("la", list(reversed(A))), delinearize("lb", list(reversed(B)))
    body = T.cuda_preamble(b, rank) + [
        "const int64_t LA = %s, LB = %s;" % (product(A), product(B)),
        "const int64_t nta = (LA + %d) / %d, ntb = (LB + %d) / %d;" % (ta - 1, ta, tile - 1, tile),
        "const int64_t ntiles = nta * ntb * %s;" % product(plan.other),
        "if (ntiles == 0) return;"] + list(b.pre) + decl + [
        "const int TC = threadIdx.x & 31, TR0 = threadIdx.x >> 5;",
        "for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {",
        "  int64_t rem_t = t;",
        "  const int64_t a0 = (rem_t %% nta) * %d; rem_t /= nta;" % ta,
        "  const int64_t b0 = (rem_t %% ntb) * %d; rem_t /= ntb;" % tile]
    body += indent(delinearize("rem_t", plan.other), 2) if plan.other else ["  (void)rem_t;"]
    # each thread takes rows TR0, TR0 + TRS, ... of the tile. Phase 1 issues all its loads before the first
    # shared store (an in-order warp would wait out one load's latency per row: a 2-byte load in flight per
    # thread ran a bf16 NCHW -> NHWC clone at 15% of the copy rate on the H200)
    trs = T.TILE_THREADS // 32
    rows_a, rows_b = ta // trs, tile // trs
    regs = ["%s fb_r%d[%d] = {};" % (ct, k, rows_a) for k, (_, ct) in enumerate(b.tiles.values())]
    fills = ["%s[(TR0 + fb_k * %d) * %d + TC] = fb_r%d[fb_k];" % (var, trs, tile + 1, k)
             for k, (var, _) in enumerate(b.tiles.values())]
    # the lane's side of the tile is the same for all its rows: its index split once, before the rows.
    # Phase 1: lanes along B, rows along A (ta of them); phase 2: lanes along A (ta / 32 passes), rows along B
    body += indent(regs, 2) + ["  {", "  const int64_t lb = b0 + TC;"] + indent(side_b, 2) + [
        "  #pragma unroll",
        "  for (int fb_k = 0; fb_k < %d; ++fb_k) {   // phase 1: lanes along B, loads" % rows_a,
        "    const int64_t la = a0 + TR0 + fb_k * %d;" % trs,
        "    if (la < LA && lb < LB) {"] + indent(side_a + b.phase1, 6) + ["    }", "  }", "  }",
        "  #pragma unroll", "  for (int fb_k = 0; fb_k < %d; ++fb_k) {" % rows_a] + indent(fills, 4) + \
        ["  }", "  __syncthreads();"]
    for h in range(ta // tile):
        body += ["  {", "  const int fb_ta = %d + TC;" % (h * tile), "  const int64_t la = a0 + fb_ta;"] + \
            indent(side_a, 2) + [
            "  #pragma unroll",
            "  for (int fb_k = 0; fb_k < %d; ++fb_k) {   // phase 2: lanes along A, stores" % rows_b,
            "    const int TR = TR0 + fb_k * %d;" % trs,
            "    const int64_t lb = b0 + TR;",
            "    if (la < LA && lb < LB) {"] + indent(side_b + b.lines, 6) + ["    }", "  }", "  }"]
    body += ["  __syncthreads();", "}"]
    launch = {"shape": "tiled", "tile": tile, "tile_a": ta, "a_dims": list(A), "b_dims": list(B), "smem": smem,
              "threads": T.TILE_THREADS, "threads_max": T.TILE_THREADS}
    return T.finish(group, b, "tiled", body, T.TILE_THREADS, launch)
