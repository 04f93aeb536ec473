"""One row of a reduction kernel, phase by phase (target independent; both row kernels drive it).

RowPlan says which reductions run in which phase and which row-level values are cached between phases. The
driver walks the phases with an ExprBuilder: each phase's body (cached values born in it, the accumulator
updates, in the last phase the row outputs) is generated once, values constant along the row are hoisted
before the phase's loop, cached values are read back in later phases. What a target decides is handed in:

  loop(body, accs, vec)      the loop over the reduced index around one phase's body (lines); accs holds
                             (accumulator variable, its C type, reduction op, node) of the phase
  acc_type(dtype, op, node)  the C type a reduction accumulates in
  acc_lvalue(a)              what the body updates for accumulator a (default a itself; the CPU's long rows
                             name the lane of the iteration)
  after_loop(a, acc_t, op)   lines after that loop, before a mean's division (combining across threads)
  new_vec()                  the vector state of one phase's body, or None (targets with vector accesses)
"""
from __future__ import annotations

from . import ctypes_map as C
from .common import RED_T, red_op, ref_of, scalar_index
from .exprs import project


class RowDriver:
    def __init__(self, fg, b, plan, idx: tuple, cache_vars: dict, cache_index: str, const_read: bool,
                 softmax_reciprocal: bool = False):
        """cache_vars: cached value key -> array variable (empty: recompute); cache_index: the element of
        those arrays the current iteration owns; const_read: read cached values into const variables.
        softmax_reciprocal: a float softmax's division by its row sum becomes a product with the sum's
        reciprocal, taken once per row (`reciprocal`)."""
        self.fg, self.b, self.plan, self.idx = fg, b, plan, idx
        # the row index as a read of a domain-shaped value spells it: size-1 dims pinned at 0 (exprs.project).
        # Without it a batch-1 row kernel missed its cache and recomputed every phase from memory
        self.row_idx = project(idx, tuple(plan.domain)) if len(plan.domain) == len(idx) else idx
        self.vars, self.cidx = cache_vars, cache_index
        self.types = {k: C.compute(b.meta_of(ref_of(k)).dtype) for k in plan.cached}
        self.read = ("const " if const_read else "") + "%s %s = %s[%s];"
        self.row_memo: dict = {}
        self.pre, self.phase = None, 0
        self.has_vec = hasattr(b, "vec")
        self.row_names: dict = {}                # per-row variable -> the node it holds
        self.reciprocals: dict = {}
        b.hook = self.hook
        if softmax_reciprocal:
            b.row_reciprocal = self.reciprocal

    def hook(self, ref_key, at):
        b, plan = self.b, self.plan
        name = ref_key[0]
        if plan.per_row(ref_of(ref_key), at):
            mk = (name, at)
            if mk not in self.row_memo:           # computed once per row, before the phase's loop
                saved = b.lines, b.hook, (b.vec if self.has_vec else None)
                b.lines, b.hook = self.pre, self.hook
                if self.has_vec:
                    b.vec = None
                self.row_memo[mk] = b.compute(name, at) if name in plan.members else b.load(ref_of(ref_key), at)
                self.row_names[self.row_memo[mk]] = name
                b.lines, b.hook = saved[0], saved[1]
                if self.has_vec:
                    b.vec = saved[2]
            return self.row_memo[mk]
        if ref_key in self.vars and plan.home[ref_key] < self.phase and (at == self.idx or at == self.row_idx):
            var = b.fresh()
            b.emit(self.read % (self.types[ref_key], var, self.vars[ref_key], self.cidx))
            return var
        return None

    def run(self, loop, acc_type, after_loop=lambda a, acc_t, op: [], new_vec=None, acc_lvalue=lambda a: a):
        """(row lines, end lines): every phase of one row, then the per-row outputs (`end`, which the
        target places: every thread, or one)."""
        fg, b, plan, idx = self.fg, self.b, self.plan, self.idx
        b.reduction_value = {}
        row = []
        for p in range(plan.num_phases):
            pre, body = [], []
            self.pre, self.phase = pre, p
            b.lines, b.memo = body, {}
            vec = new_vec() if new_vec is not None else None
            if self.has_vec:
                b.vec = vec
            for k, var in self.vars.items():      # values born in this phase are computed now and cached
                if plan.home[k] == p:
                    v = b.value(ref_of(k), idx)
                    b.emit("%s[%s] = %s;" % (var, self.cidx, v))
            accs = []
            for r in [r for r in plan.reductions if plan.level[r] == p]:
                v = b.value(plan.red_input(r), idx)
                op = red_op(fg, r)
                acc_t = acc_type(fg.node(r).meta.dtype, op, r)
                a = "a%d" % plan.reductions.index(r)     # not the node's name: equal groups, equal source
                lv = acc_lvalue(a)
                b.emit("%s = fb::%s::combine(%s, (%s)%s);" % (lv, RED_T[op], lv, acc_t, v))
                accs.append((a, acc_t, op, r))
            if p == plan.num_levels:
                for out in plan.row_outputs:
                    b.store(out, idx, b.value(out, idx))
            if self.has_vec:
                b.vec = None
            row += pre
            for a, acc_t, op, _ in accs:
                row.append("%s %s = fb::%s::identity<%s>();" % (acc_t, a, RED_T[op], acc_t))
            row += loop(body, accs, vec)
            for a, acc_t, op, r in accs:
                row += after_loop(a, acc_t, op)
                if op == "mean":
                    row.append("%s = %s / (%s)R;" % (a, a, acc_t))
                ct = C.compute(fg.node(r).meta.dtype)
                b.reduction_value[r] = a if acc_t == ct else "((%s)%s)" % (ct, a)
        end = []
        self.pre, self.phase = end, plan.num_phases
        b.lines = end
        for out in plan.scalar_outputs:
            out_idx = scalar_index(fg.node(out).meta.shape, plan, idx)
            b.store(out, out_idx, b.value(out, out_idx))
        return row, end

    def reciprocal(self, var: str):
        """A variable holding 1 / var, declared once per row, where var is a softmax's row sum (a sum of
        exp(x - amax(x)) over the row: at least 1, or NaN), so the product is within an ulp of the quotient and
        never meets a denormal's infinite reciprocal; else None (the element-wise division stays). A division
        is some 20 instructions per element; the eager-attention softmax at 8 x 16 x 1024 x 1024 bf16 was
        instruction-bound."""
        name = self.row_names.get(var)
        if name is None or not _is_softmax_sum(self.fg, self.plan, name):
            return None
        if var not in self.reciprocals:
            r = self.reciprocals[var] = "fb_rcp%d" % len(self.reciprocals)
            self.pre.append("const float %s = 1.0f / %s;" % (r, var))
        return self.reciprocals[var]


def _is_softmax_sum(fg, plan, name: str) -> bool:
    node = fg.node(name)
    # a per-row divisor may be any member (a pointwise op of row values, |mean| + 0.5): only a sum qualifies
    if name not in plan.members or node.kind != "reduction" or red_op(fg, name) != "sum":
        return False
    src = node.args[0]
    ex = fg.node(src.name) if src.name in plan.members else None
    if ex is None or ex.op_name.split(".")[0] != "exp":
        return False
    sub = fg.node(ex.args[0].name) if ex.args[0].name in plan.members else None
    if sub is None or sub.op_name.split(".")[0] != "sub" or len(sub.args) < 2:
        return False
    x, m = sub.args[0], sub.args[1]
    mx = fg.node(m.name) if getattr(m, "name", None) in plan.members else None
    return mx is not None and mx.kind == "reduction" and red_op(fg, mx.name) == "max" \
        and getattr(mx.args[0], "name", None) == getattr(x, "name", None)
