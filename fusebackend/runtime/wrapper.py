"""A Program as one generated Python function (the per-call path, as Inductor's wrapper is).

The interpreted loop (program.py) pays per step for a Python call, dict reads and writes of every value, the
arg resolvers and the frees; here the step list becomes straight-line code once, after the first call settled
each step (kernel meta arrays packed, view plans recorded): values are locals, dead ones are `del`eted at
their last reader, ATen ops are called through their direct callables, a CPU kernel is a ctypes call with a
prebuilt pointer array and its packed meta array, a planned view one `as_strided` (or only an address, or no
tensor at all: wrapper_plan.py). Steps whose work is per call anyway (symbolic sizes, checked outputs, batches)
are called as objects over a small dict of the values they read. A LayoutMismatch or MetaMismatch leaves the
function with its locals, and the Program finishes that call interpreted (Program._resume), as its loop would.

Only this file writes Python text. `FUSEBACKEND_INTERPRET=1` keeps the interpreted loop.
"""
from __future__ import annotations

import functools
import keyword
import math
import operator
import re

import torch

from ..graph.fusion_graph import Ref
from .alloc import FAST_EMPTY, TORCH_EMPTY_STRIDED
from .batch import BatchKernelStep
from .meta_check import CheckedAtenStep, MetaMismatch
from .steps import AtenStep, DynamicKernelStep, KernelStep, LayoutMismatch
from .views import ViewStep
from . import wrapper_steps
from .wrapper_plan import Plan, kernel_input


class Relayout(Exception):
    """A view's base has another layout than the one the function was written for: the call goes on
    interpreted from that step (the function stays; the next call may have the usual layout)."""


class Generated:
    """source: the text; fn(args): the call."""

    def __init__(self, source, fn):
        self.source, self.fn = source, fn


def generate(program, interpret, resume, lock) -> Generated | None:
    """The generated function of `program`'s current steps; None when a step is of a kind it does not know.

    interpret(args): the interpreted call (taken when another thread is inside the function); resume(local_of,
    rebuild, i, exc, locals): finishes a call whose step i raised LayoutMismatch, MetaMismatch or Relayout
    (rebuild: Plan.rebuild(), the values the function did not make)."""
    w = _Writer(program, interpret, lock)
    if not w.body():
        return None
    ns = dict(w.consts)
    ns["_resume"] = functools.partial(resume, dict(w.local_of), w.plan.rebuild())
    text = "\n".join(w.lines) + "\n"
    exec(compile(text, "<fusebackend program %x>" % id(program), "exec"), ns)
    return Generated(text, ns["run"])


class _Writer:
    def __init__(self, program, interpret, lock):
        self.p, self.fg = program, program.fg
        self.consts = {"torch": torch, "_interpret": interpret, "_acquire": lock.acquire, "_release": lock.release,
                       "_Switch": (LayoutMismatch, MetaMismatch, Relayout), "_Relayout": Relayout}
        self.const_ids: dict = {}
        self.local_of: dict = {}
        self.lines: list = []
        self.kernel_made = set()       # values our own kernels allocated (their strides, offset 0)
        # name -> (sizes, strides) the value has on every call, known when the text is written: what our kernels
        # and batches allocate, and views of those made without a check (their sizes and strides are ours)
        self.layout: dict = {}
        # bases of planned views: such a view past its check has a known layout, so its own views need none
        self.view_bases = {st.base_name for st in program.steps if type(st) is ViewStep and st.base_item is None}
        self.defined = set()           # values bound to a local at the current point of the text
        # outputs, values whose sizes give a data-dependent symbol, and a symbol's placeholder (read by size
        # evaluation): never deleted
        self.keep = program.keep | set(self.fg.symbols.values())
        self.plan = Plan(program, self.keep)
        self.fast_alloc = False
        self.shared_arrays = False     # a ctypes launch fills an array of its call site: the call holds a lock

    # ---------------------------------------------------------------- names and expressions
    def const(self, obj, hint="c") -> str:
        key = id(obj)
        if key not in self.const_ids:
            name = "_%s%d" % (hint, len(self.const_ids))
            self.const_ids[key] = name
            self.consts[name] = obj
        return self.const_ids[key]

    def local(self, name) -> str:
        if name not in self.local_of:
            base = "v_" + re.sub(r"\W", "_", name)
            taken = set(self.local_of.values())
            cand, k = base, 0
            while cand in taken or keyword.iskeyword(cand):
                k += 1
                cand = "%s_%d" % (base, k)
            self.local_of[name] = cand
        return self.local_of[name]

    def expr(self, v) -> str:
        """Python text for an arg structure: Refs read locals, constants are literals or bound names."""
        if isinstance(v, Ref):
            name = self.plan.holder(v.name) if v.name in self.plan.same else v.name
            return self.local(name) if v.item is None else "%s[%d]" % (self.local(name), v.item)
        if not _has_ref(v):
            if v is None or type(v) in (bool, int, str) or (type(v) is float and math.isfinite(v)):
                return repr(v)
            return self.const(v)               # the same object every call, as the interpreter passes it
        if type(v) is list:
            return "[%s]" % ", ".join(self.expr(x) for x in v)
        if type(v) is tuple:
            return "(%s%s)" % (", ".join(self.expr(x) for x in v), "," if len(v) == 1 else "")
        if type(v) is dict:
            return "{%s}" % ", ".join("%r: %s" % (k, self.expr(x)) for k, x in v.items())
        return "%s(%s)" % (self.const(type(v), "t"), self.expr(list(v)))

    def emit(self, line, depth=2):
        self.lines.append("    " * depth + line)

    # ---------------------------------------------------------------- the function
    def body(self) -> bool:
        p, plan = self.p, self.plan
        read = set().union(*plan.reads) if plan.reads else set()
        used = [n for n in p.input_names if n in read or n in self.keep]
        self.defined |= set(used)
        self.emit("def run(args):", 0)
        head = len(self.lines)
        self.emit("try:", 1)
        if p.input_names:
            self.emit("%s, = args" % ", ".join(self.local(n) if n in used else "_" for n in p.input_names))
        self.emit("if isinstance(args, list):")
        self.emit("args.clear()", 3)
        self.emit("_i = -1                        # the step that may switch to ATen, set before it runs")
        top = len(self.lines)
        for i, step in enumerate(p.steps):
            if not self.step(i, step):
                return False
            new = {plan.holder(n) for n in writes(step)} - self.defined
            self.defined |= new
            # read for the last time here, or never read at all (the interpreter kept those until the end)
            dead = [n for n in plan.frees[i] if n in self.defined] + sorted(n for n in new if n not in read)
            dead = [n for n in dict.fromkeys(dead) if n not in self.keep]
            self.defined -= set(dead)
            if dead:
                self.emit("del %s" % ", ".join(self.local(n) for n in dead))
        if self.fast_alloc:
            self.lines.insert(top, "        _own_empty = torch.empty_strided is %s"
                              % self.const(TORCH_EMPTY_STRIDED, "torch_empty"))
        self.emit("return [%s]" % ", ".join(self.expr(o) for o in self.fg.outputs))
        self.emit("except _Switch as _e:     # a step switches to ATen: the call ends interpreted", 1)
        self.emit("if _i < 0:", 2)
        self.emit("raise", 3)
        self.emit("return _resume(_i, _e, locals())", 2)
        if self.shared_arrays:                 # ctypes pointer arrays of the call sites: one call at a time
            self.lines[head:head] = ["    if not _acquire(False):    # another thread is inside: its arrays are in use",
                                     "        return _interpret(args)"]
            self.emit("finally:", 1)
            self.emit("_release()", 2)
        return True

    def step(self, i, s) -> bool:
        t = type(s)
        self.emit("# %d %s" % (i, _label(s)))
        if not (t in (KernelStep, BatchKernelStep, ViewStep) or self.plan._reads_only(s)):
            for n in self.p.reads[i]:          # it may change a tensor's metadata in place (set_, resize_)
                self.layout.pop(n, None)
        if t is AtenStep:
            self.aten(s)
        elif t is CheckedAtenStep:             # its checks read the step's state each call (tests change it)
            self.emit("_i = %d" % i)
            self.aten(s)
            self.emit("%s = %s.conform(%s)" % (self.local(s.name), self.const(s, "s"), self.local(s.name)))
        elif t is ViewStep:
            self.view(i, s)
        elif t is KernelStep and s.meta is not None:
            self.kernel(s)
        elif t is BatchKernelStep and s.plan is not None and s.plan is not False:
            wrapper_steps.batch(self, s)
            self.layout.update(zip(s.out_names, s.outputs.layouts()))
        elif getattr(s, "kind", None) == "fallback" and all(type(a) is AtenStep for a in s.steps):
            for a in s.steps:
                self.aten(a)
        elif t is DynamicKernelStep and wrapper_steps.dynamic(self, i, s):
            pass
        elif t in (KernelStep, DynamicKernelStep, BatchKernelStep) or getattr(s, "kind", None) == "fallback":
            self.emit("_i = %d" % i)
            self.generic(s, self.p.reads[i], writes(s))
        else:
            return False
        return True

    def aten(self, s):
        out = self.local(s.name)
        if s.call is operator.getitem:
            self.emit("%s = %s[%s]" % (out, self.expr(s.node_args[0]), self.expr(s.node_args[1])))
            return
        args = [self.expr(a) for a in s.node_args] + [
            ("%s=%s" if k.isidentifier() and not keyword.iskeyword(k) else "**{%r: %s}") % (k, self.expr(x))
            for k, x in s.node_kwargs.items()]
        self.emit("%s = %s(%s)" % (out, self.const(s.call, "op"), ", ".join(args)))

    def generic(self, s, reads, outs, depth=2):
        """Calls the step object over a dict of the values it reads; its outputs come back as locals."""
        sym = getattr(s, "sym", None)
        if sym is not None:                    # a symbolic size reads its placeholder or its source
            reads = set(reads) | set(sym.symbols.values()) | {src[0] for src in sym.sources.values()}
        names = sorted(n for n in reads if n in self.defined)
        self.emit("_e = {%s}" % ", ".join("%r: %s" % (n, self.local(n)) for n in names), depth)
        self.emit("%s(_e)" % self.const(s, "s"), depth)
        for n in outs:
            self.emit("%s = _e[%r]" % (self.local(n), n), depth)

    def view(self, i, s):
        plan, name = self.plan, s.name
        out, obj, base = self.local(name), self.const(s, "s"), self.local(s.base_name)
        if not s.planned or s.plan is None:    # not planned yet, or not a plain view: the step runs its ops
            self.emit("%s = %s.run(%s)" % (out, obj, base))
            return
        sizes, strides, delta = tuple(s.plan[2]), tuple(s.plan[3]), s.plan[4]
        elided = name in plan.elided           # only kernels read it: its address, not a tensor
        addr = "%s = %%s.data_ptr() + %d" % (self.address(name), delta * s.itemsize)
        if s.base_name in plan.elided:         # a view of a view passed as an address: an address too
            self.emit("%s = %s + %d" % (self.address(name), self.address(s.base_name), delta * s.itemsize))
            return
        if s.base_name in self.kernel_made and s.base_item is None:    # our own allocation: its layout, offset 0
            holder = self.local(plan.holder(s.base_name))
            if plan.alloc_as.get(s.base_name) == name or name in plan.same:
                self.emit("pass                       # the kernel allocated its output in this layout")
            elif elided:
                self.emit(addr % holder)
            else:
                self.emit("%s = %s" % (out, self.alias(name, holder, sizes, strides, delta)))
            if not elided:
                self.layout[name] = (sizes, strides)
            return
        if s.base_item is None and self.layout.get(s.base_name) == (tuple(s.plan[0]), tuple(s.plan[1])):
            # the base has the layout the plan was recorded for on every call: no check
            if elided:
                self.emit(addr % base)
            else:
                self.emit("%s = %s" % (out, self.alias(name, base, sizes, strides, delta)))
                self.layout[name] = (sizes, strides)
            return
        b = base if s.base_item is None else "_b"
        if s.base_item is not None:
            self.emit("_b = %s[%d]" % (base, s.base_item))
        self.emit("if %s.stride() == %r and %s.shape == %s:" % (b, tuple(s.plan[1]), b, self.const(s.plan[0], "sz")))
        if elided:
            self.emit(addr % b, 3)
        else:
            self.emit("%s = %s" % (out, self.alias(name, b, sizes, strides, delta)), 3)
        self.emit("else:                      # another layout: the step's ops, as the interpreter runs them")
        # addresses derived from it would be wrong, or the views of it are written unchecked: the loop goes on
        if elided or name in self.view_bases:
            self.emit("_i = %d" % i, 3)
            self.emit("raise _Relayout()", 3)
            if not elided:
                self.layout[name] = (sizes, strides)
        else:
            self.emit("%s = %s.run(%s)" % (out, obj, base), 3)

    def alias(self, name, base, sizes, strides, delta) -> str:
        """The view as one call: Inductor's reinterpret_tensor (a new tensor on the base's storage, no view
        bookkeeping: half the cost) where only our own readers see it, else as_strided (a view, as eager's)."""
        if _REINTERPRET is not None and self.plan.internal(name):
            return "%s(%s, %r, %r, %d)" % (self.const(_REINTERPRET, "alias"), base, sizes, strides, delta)
        return "%s.as_strided(%r, %r, %s.storage_offset() + %d)" % (base, sizes, strides, base, delta)

    def address(self, name) -> str:
        return "_a" + self.local(name)[1:]

    def kernel(self, s):
        outs = [self.local(self.plan.holder(n)) for n in s.out_names]
        self.outputs(s, outs)
        fast = getattr(s.launch, "fast_call", None)
        if fast is None:                       # a launcher of its own (CUDA): the tensors and the packed meta
            ins = [self.expr(r) for r in s.spec.inputs]
            self.emit("%s([%s], %s)" % (self.const(s.launch, "k"), ", ".join(ins + outs), self.const(s.meta, "m")))
            return
        ops = []                               # (operand text, an address already)
        for r in s.spec.inputs:
            how = kernel_input(self.plan, r)
            if how is not None and how[0] == "address":
                ops.append((self.address(how[1]), True))
            else:
                ops.append((self.local(how[1]) if how is not None else self.expr(r), False))
        ops += [(o, False) for o in outs]
        how = fast(s.meta, len(ops))
        self.const(s.meta, "m")                # kept with the function: its address is in the text
        if how[0] == "ext":                    # one C call reads the pointers (launch_ext.py)
            _, launch, kernel, meta, flag, check = how
            self.emit("%s(%d, %d, %s)" % (self.const(launch, "launch"), kernel, meta, ", ".join(o for o, _ in ops)))
        else:                                  # ctypes: this call site's pointer array, filled here
            _, array, fn, meta, flag, check = how
            self.shared_arrays = True
            self.emit("_p = %s" % self.const(array, "P"))
            for k, (o, is_addr) in enumerate(ops):
                self.emit("_p[%d] = %s" % (k, o if is_addr else o + ".data_ptr()"))
            self.emit("%s(%s, %s)" % (self.const(fn, "fn"), self.const(array, "P"), self.const(meta, "ma")))
        if flag is not None:                   # an index read out of range: the kernel raised its flag
            self.emit("if %s.value:" % self.const(flag, "flag"))
            self.emit("%s()" % self.const(check, "chk"), 3)

    def outputs(self, s, outs):
        """A kernel step's outputs: fresh tensors of the layouts the kernel was built for, or of the one view
        they are read through (wrapper_plan.py) -- the one place in the text that decides where a step's
        outputs live (KernelStep.new_outputs is the interpreter's). While torch.empty_strided is torch's own,
        its C++ fast path for the device type allocates (as in Inductor's wrapper: no dispatcher, no argument
        parsing); a replaced one (a test injecting OOM, a memory tracker) is called instead."""
        for out, name, (shape, stride, dtype) in zip(outs, s.out_names, s.out_alloc):
            view = self.plan.alloc_as.get(name)
            if view is not None:
                shape, stride = self.plan.view_of[view].plan[2:4]
            self.alloc(out, s.device, repr(tuple(shape)), repr(tuple(stride)), dtype)
            self.kernel_made.add(name)
            self.layout[name] = (tuple(shape), tuple(stride))

    def alloc(self, out, device, shape: str, stride: str, dtype, depth=2):
        """`out = ` one fresh tensor (shape, stride: their text): torch's C++ fast path for the device type
        while torch.empty_strided is torch's own, else torch.empty_strided itself."""
        dt, dev = self.const(dtype, "dt"), self.const(device, "dev")
        fast = FAST_EMPTY.get(device.type) if device.index is None else None
        slow = "torch.empty_strided(%s, %s, dtype=%s, device=%s)" % (shape, stride, dt, dev)
        if fast is None:
            self.emit("%s = %s" % (out, slow), depth)
        else:
            self.fast_alloc = True
            self.emit("%s = %s(%s, %s, %s) if _own_empty else %s"
                      % (out, self.const(fast, "empty"), shape, stride, dt, slow), depth)


_REINTERPRET = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None), "_reinterpret_tensor", None)


def writes(step) -> list:
    """Names of the values a step puts in the environment."""
    if hasattr(step, "out_names"):
        return list(step.out_names)
    if getattr(step, "kind", None) == "fallback":
        return [s.name for s in step.steps]
    return [step.name]


def _has_ref(v) -> bool:
    if isinstance(v, Ref):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_ref(x) for x in v)
    if isinstance(v, dict):
        return any(_has_ref(x) for x in v.values())
    return False


def _label(s) -> str:
    nodes = getattr(s, "group_nodes", None)
    if nodes:
        return "%s: %s" % (s.kind, " ".join(n.name for n in nodes[:6]) + (" ..." if len(nodes) > 6 else ""))
    return "%s: %s" % (getattr(s, "kind", type(s).__name__), getattr(s, "name", ""))
