"""The loops of a CPU row kernel over its reduced index: accumulator lanes, prefetch, accumulation types.

A long row (a static reduced size of at least LONG_ROW, one reduced dim) reduces into LANES explicit lanes
per accumulator, combined by a tree after the loop. `#pragma omp simd reduction` made g++ keep one vector of
lanes and add them up one by one through the stack after every row's loop (32 dependent scalar adds for a
float sum at 512 bits, twice per softmax row), and how many lanes there were depended on the vector width;
explicit lanes vectorise as plain element-wise code and sum in the same order on every machine.

A float16 or bfloat16 input read at the reduced index only (a norm's weight) is converted to float once per
kernel part into a column buffer (ColumnCache), not once per row: rmsnorm bf16 1024x4096's output loop is
bound by vector ops, and the weight's two conversion ops per vector were ~4% of it.

A middle phase (one that reads the row from the cache, after the first and before the one writing the
outputs) of a 2-D kernel also prefetches the next row's inputs: the first phase then finds them in L2 instead
of waiting on memory while the core has nothing else to do (masked softmax 1024x4096 on the 2-core box:
~13% of the kernel). In the last phase the prefetches competed with the output's stores and cost time.
"""
from __future__ import annotations

import re

import torch

from ..graph.fusion_graph import Ref
from .common import RED_T, delinearize, indent

LANES = 64            # accumulator lanes of a long row: 4 vectors of floats at 512 bits
LONG_ROW = 2 * LANES  # below this a row's loop keeps `omp simd reduction` (64 lanes to combine cost more)
FLOAT_SUM_ROW = 8192  # float lanes for a sum of non-negative terms up to this row size: see float_sum_ok
LINE = 64             # bytes per cache line


def uses_lanes(group) -> bool:
    """A static reduced size of at least LONG_ROW over one reduced dim."""
    rdims = list(group.reduce_dims)
    if len(rdims) != 1:
        return False
    r = group.domain[rdims[0]]
    return isinstance(r, int) and r >= LONG_ROW


def float_sum_ok(fg, group, node: str) -> bool:
    """A float32 sum or mean may add in float lanes (else double, cpu._acc_type) when its terms cannot be
    negative (a square, an exp, an abs) and the row is static and at most FLOAT_SUM_ROW long. Double was for
    two things: a constant row's mean is exact, so a layer norm of it is 0 -- that mean is subtracted from
    signed terms, never a sum of squares or exps -- and a long row's sum does not drift (a 70k-element
    variance drifted 1e-4 in float lanes). With LANES lanes each adds at most FLOAT_SUM_ROW / LANES = 128 terms:
    for non-negative terms the relative error is below 134 * 2^-24 = 8e-6 (recursive summation bound, the
    tree's 6 levels included), under float32's 1e-5 tolerance; typically ~1e-7. Eager sums these in float
    too (ATen's sum, mean and softmax accumulate float32 in float). Costs it saves on the 2-core box: ~11% of
    rmsnorm bf16 1024x4096 (two conversions and two double adds per vector of terms)."""
    rdims = list(group.reduce_dims)
    if not rdims or not all(isinstance(group.domain[d], int) for d in rdims):
        return False
    size = 1
    for d in rdims:
        size *= group.domain[d]
    return size <= FLOAT_SUM_ROW and _non_negative(fg, group, fg.node(node).args[0])


def _non_negative(fg, group, ref) -> bool:
    if not isinstance(ref, Ref) or ref.name not in set(group.nodes) or ref.item is not None:
        return False
    node = fg.node(ref.name)
    name, args = node.op_name, node.args
    if name in ("exp.default", "abs.default"):
        return True
    if name == "pow.Tensor_Scalar":
        e = args[1]
        return isinstance(e, (int, float)) and float(e) == int(e) and int(e) % 2 == 0
    if name == "mul.Tensor":
        return isinstance(args[0], Ref) and args[0] == args[1]
    return False


def lane_var(acc: str) -> str:
    """The lvalue a long row's body accumulates into (the lane of iteration l)."""
    return "%sv[l]" % acc


def lane_loop(body: list, accs: list, rvar_lines: list, prefetch=([], [])) -> list:
    """One phase's loop over a long row: full blocks of LANES iterations (each element of a block in its own
    lane), the tail in lanes 0.., then the tree. rvar_lines: the index variables of reduced position r;
    prefetch: (lines before the loop, lines issued once per block), from prefetch_setup."""
    out = list(prefetch[0])
    for a, acc_t, _, _ in accs:
        out.append("%s %sv[%d];" % (acc_t, a, LANES))
    out += ["for (int64_t l = 0; l < %d; ++l) {" % LANES]
    out += ["  %sv[l] = %s;" % (a, a) for a, _, _, _ in accs] + ["}"]
    out += ["for (int64_t rb = 0; rb < RL; rb += %d) {" % LANES] + indent(prefetch[1], 2)
    out += ["  #pragma omp simd", "  for (int64_t l = 0; l < %d; ++l) {" % LANES, "    const int64_t r = rb + l;"]
    out += indent(rvar_lines, 4) + indent(body, 4) + ["  }", "}"]
    out += ["#pragma omp simd", "for (int64_t r = RL; r < R; ++r) {", "  const int64_t l = r - RL;"]
    out += indent(rvar_lines, 2) + indent(body, 2) + ["}"]
    out += ["for (int64_t w = %d; w > 0; w /= 2) {" % (LANES // 2), "  #pragma omp simd", "  for (int64_t l = 0; l < w; ++l) {"]
    out += ["    %sv[l] = fb::%s::combine(%sv[l], %sv[l + w]);" % (a, RED_T[op], a, a) for a, _, op, _ in accs]
    out += ["  }", "}"] + ["%s = %sv[0];" % (a, a) for a, _, _, _ in accs]
    return out


def prefetch_setup(b, group) -> tuple:
    """(row lines, per-block lines) prefetching the next row of every input that spans a 2-D domain with unit
    stride along the row; nothing for other shapes. Read after the first phase's body is built, so the inputs
    it loaded have their unit dims recorded."""
    dom = tuple(group.domain)
    if len(dom) != 2 or list(group.reduce_dims) != [1]:
        return [], []
    setup, block = [], []
    for op in b.operands:
        if op.is_output or op.written or tuple(op.meta.shape) != dom or 1 not in op.unit_dims:
            continue
        size = op.meta.dtype.itemsize
        var = "pf%d" % op.slot
        setup.append("const char* %s = (const char*)(%s + (o + 1 < hi ? i0 + 1 : i0) * %s);"
                     % (var, op.ptr, op.stride(0)))
        for k in range(max(1, LANES * size // LINE)):
            block.append("__builtin_prefetch(%s + rb * %d + %d, 0, 2);" % (var, size, k * LINE))
    return setup, block


class ColumnCache:
    """Half-type inputs constant across rows (read at the reduced index only) as float buffers filled once per
    kernel part. Installed as the builder's hook in front of the RowDriver's."""

    def __init__(self, b, plan, rdims):
        self.b, self.plan, self.rdims = b, plan, list(rdims)
        self.inner = b.hook
        self.vars: dict = {}        # (ref key, index) -> buffer variable
        self.fill: list = []        # lines before the row loop that fill the buffers
        b.hook = self.hook

    def hook(self, key, at):
        got = self.inner(key, at)
        if got is not None or not self._column(key, at):
            return got
        b = self.b
        if (key, at) not in self.vars:
            var = "w%d" % len(self.vars)
            saved, b.lines = b.lines, []
            v = b.load(Ref(*key), at)
            loop = ["#pragma omp simd", "for (int64_t r = 0; r < R; ++r) {"]
            loop += indent(delinearize("r", self.rdims) + b.lines + ["%s[r] = %s;" % (var, v)], 2) + ["}"]
            b.lines = saved
            self.vars[(key, at)] = var
            self.fill += loop
        out = b.fresh()
        b.emit("float %s = %s[r];" % (out, self.vars[(key, at)]))
        return out

    def _column(self, key, at) -> bool:
        name = key[0]
        if name in self.plan.members or self.b.is_scalar(Ref(*key)):
            return False
        meta = self.b.meta_of(Ref(*key))
        if meta is None or meta.dtype not in (torch.float16, torch.bfloat16):
            return False
        text = " ".join(at)
        if re.search(r"\bix\d+\b", text):      # read where an index tensor points
            return False
        used = {int(d) for d in re.findall(r"\bi(\d+)\b", text)}
        return bool(used) and used <= set(self.rdims) and re.fullmatch(r"[\w\s*+()]*", text) is not None


__all__ = ["ColumnCache", "LANES", "LONG_ROW", "uses_lanes", "float_sum_ok", "lane_var", "lane_loop", "prefetch_setup"]
