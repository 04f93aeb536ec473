"""Text for the generated function (wrapper.py) of the steps whose per-call work the step objects otherwise do
in Python: a kernel over symbolic sizes (DynamicKernelStep's memo, read inline) and a CPU horizontal batch
(its outputs allocated and its C driver called inline). `self` is wrapper._Writer."""
from __future__ import annotations

from .cpu_batch import CpuBatch


def dynamic(self, i, s) -> bool:
    """A kernel over symbolic sizes: sizes seen before launch from the step's memo (its allocations and
    packed meta, DynamicKernelStep.__call__'s key spelled here); new ones go through the step, which
    checks the layouts and settles them."""
    syms = []
    for src in s.key_sources():
        if src[1] not in self.defined:
            return False
        v = self.local(src[1])
        syms.append("int(%s)" % v if src[0] == "int" else "%s%s.shape[%d]"
                    % (v, "" if src[2] is None else "[%d]" % src[2], src[3]))
    ins = [self.expr(r) for r in s.spec.inputs]
    tup = lambda xs: "(%s%s)" % (", ".join(xs), "," if len(xs) == 1 else "")
    key = tup([tup(syms), tup(["(%s.shape, %s.stride())" % (x, x) for x in ins]),
               tup(["int(%s)" % self.expr(r) for r in getattr(s.spec, "scalars", ())])])
    self.emit("_i = %d" % i)
    self.emit("_h = %s.memo.get(%s)" % (self.const(s, "s"), key))
    self.emit("if _h is None or _h[2] is None:    # sizes not seen before: the step settles them")
    self.generic(s, self.p.reads[i], list(s.out_names), 3)
    self.emit("else:")
    outs = [self.local(n) for n in s.out_names]
    for k, (out, (_, _, dtype)) in enumerate(zip(outs, s.out_alloc)):
        self.alloc(out, s.device, "_h[0][%d][0]" % k, "_h[0][%d][1]" % k, dtype, 3)
    self.emit("_h[2][1](_h[2][2], _h[2][3], %s)" % ", ".join(ins + outs), 3)
    if getattr(s.spec, "checks_index", False):
        self.emit("_h[2][5]()", 3)
    return True


def batch(self, s):
    """A planned batch. On the CPU, with the C gatherer: the outputs allocated here (as Outputs would: one
    each, or the pool's call) and the table filled and run under the batch's own lock, as CpuBatch.__call__
    does (the interpreted call and another thread's share the table); else BatchKernelStep.run."""
    outs = [self.local(n) for n in s.out_names]
    ins = "[%s]" % ", ".join(self.expr(r) for r in s.in_refs)
    plan = s.plan
    ptrs = getattr(plan, "pointers", None)
    if ptrs is None or ptrs.ext is None or type(plan) is not CpuBatch or not outs:
        self.emit("%s%s.run(%s)" % ("".join(o + ", " for o in outs) + "= " if outs else "", self.const(s, "s"), ins))
        return
    if s.outputs.pool is None:             # one tensor each: the gatherer reads their pointers
        for out, (shape, stride, dtype) in zip(outs, s.outputs.allocs):
            self.alloc(out, s.device, repr(tuple(shape)), repr(tuple(stride)), dtype)
        addrs = "[%s]" % ", ".join(outs)
    else:
        self.emit("%s, _ad = %s()" % ("(%s,)" % ", ".join(outs), self.const(s.outputs, "outs")))
        addrs = "_ad"
    self.emit("with %s:" % self.const(plan.lock, "lock"))
    self.emit("if %s(%d, %d, %d, %d, %d, %d, %s, %s):" % (
        self.const(ptrs.ext.gather_run, "gather"), plan.run_fn, plan.probs_addr, plan.part_addr, plan.nparts,
        ptrs.addr, ptrs.n, ins, addrs), 3)
    self.emit("%s.writes += 1" % self.const(plan, "cb"), 4)
    for check in plan.checks:
        self.emit("%s()" % self.const(check, "chk"))
