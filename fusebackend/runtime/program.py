"""The compiled-graph callable: a flat list of steps, run as one generated function (wrapper.py) once the first
call, interpreted over an environment of named values, settled them."""
from __future__ import annotations

import operator
import os
import threading
import warnings

from ..graph.fusion_graph import Ref
from .meta_check import MetaMismatch, step_nodes
from .steps import AtenStep, LayoutMismatch, ref_names, resolver
from .wrapper import Relayout, generate


class Program:
    """Calls steps in order; AOT autograd calls it boxed (a list of inputs that it may free).

    The first call runs the steps interpreted (a loop over an environment dict), which settles them (kernel
    layouts checked and meta arrays packed, view plans recorded); then the steps become one generated function
    (runtime/wrapper.py) that later calls run. A step that switches to ATen (LayoutMismatch, MetaMismatch) ends
    its call interpreted and has the function generated again. `FUSEBACKEND_INTERPRET=1` (or `interpret =
    True`) keeps the loop."""
    _boxed_call = True

    def __init__(self, fg, steps, input_names):
        self.fg = fg
        self.steps = steps
        self.input_names = list(input_names)
        self.outputs = [resolver(o) for o in fg.outputs]
        names = [o.name for o in fg.outputs if isinstance(o, Ref) and o.item is None]
        # many plain outputs (a horizontal batch returns a list): one C call gathers them
        self.gather = operator.itemgetter(*names) if len(names) == len(fg.outputs) >= 2 else None
        self.keep = kept_values(fg)
        self._refresh()
        self._lock = threading.Lock()       # the generated code's prebuilt pointer arrays: one call at a time
        self._interpret = os.environ.get("FUSEBACKEND_INTERPRET", "") not in ("", "0")
        # CUDA programs run generated too (H200, 2026-12-02: the GPU tests pass with it; per call 1.4-1.5x faster
        # than the loop); FUSEBACKEND_GENERATED_CUDA=0 keeps them on the loop
        if any(n.device == "cuda" for n in fg.nodes()) and os.environ.get("FUSEBACKEND_GENERATED_CUDA", "") == "0":
            self._interpret = True
        self.generated = None               # wrapper.Generated, once the first call settled the steps
        self._run = None
        self._generate = True               # False: a step kind the wrapper does not know; the loop runs

    @property
    def interpret(self) -> bool:
        return self._interpret

    @interpret.setter
    def interpret(self, value: bool):
        self._interpret, self._run = bool(value), None

    @property
    def source(self):
        """The generated function's text (None before the first call, or while interpreting)."""
        return self.generated.source if self.generated is not None else None

    def __call__(self, args):
        run = self._run
        if run is not None:
            return run(args)
        out = self._call_interpreted(args)
        if not self._interpret and self._generate and self._run is None:
            self.generated = generate(self, self._call_interpreted, self._resume, self._lock)
            self._generate = self.generated is not None
            self._run = self.generated.fn if self.generated is not None else None
        return out

    def _call_interpreted(self, args):
        env = dict(zip(self.input_names, args))
        if isinstance(args, list):
            args.clear()
        self._loop(env, 0)
        return self._outputs(env)

    def _outputs(self, env):
        if self.gather is not None:
            return list(self.gather(env))
        return [o(env) for o in self.outputs]

    def _loop(self, env, start):
        steps, frees = self.steps, self.frees
        for i in range(start, len(steps)):
            try:
                steps[i](env)
            except (LayoutMismatch, MetaMismatch) as e:
                if self._switch(i, e, env):
                    return
                frees = self.frees
            for name in frees[i]:
                env.pop(name, None)      # a call resumed from the generated function may lack some

    def _switch(self, i, why, env) -> bool:
        """Step i raised `why`: replace it (LayoutMismatch: that group as ATen, for good) or the rest of the
        program (MetaMismatch: a value no kernel can read) and run the replacement; True when the call is done.
        The generated function no longer matches the steps: the next call generates it again."""
        self._run, self.generated, self._generate = None, None, True
        if isinstance(why, LayoutMismatch):
            step = self.steps[i]
            self.steps[i] = FallbackStep(step.group_nodes, "layout: %s" % why)
            self._refresh()
            self.steps[i](env)
            return False
        self._tail_as_aten(i, why)
        self.steps[i + 1](env)
        return True

    def _resume(self, local_of, rebuild, i, why, frame_locals):
        """The generated function's step i raised `why`: finish the call as the interpreted loop would, from
        the environment its locals hold (`local_of`: value name -> local; `rebuild`: the values the function
        did not make, e.g. views it passed to kernels as addresses, made here)."""
        env = {n: frame_locals[l] for n, l in local_of.items() if l in frame_locals}
        for name, make in rebuild:
            if name not in env:
                value = make(env)
                if value is not None:
                    env[name] = value
        if isinstance(why, MetaMismatch) and hasattr(why, "value"):
            env[self.steps[i].name] = why.value
        if isinstance(why, Relayout):
            self._loop(env, i)
        elif not self._switch(i, why, env):
            for name in self.frees[i]:
                env.pop(name, None)
            self._loop(env, i + 1)
        return self._outputs(env)

    def _tail_as_aten(self, i, why):
        nodes = [n for s in self.steps[i + 1:] for n in step_nodes(self.fg, s)]
        self.steps[i + 1:] = [FallbackStep(nodes, "metadata: %s" % why)]
        self._refresh()

    def _refresh(self):
        self.reads = [step_reads(s) for s in self.steps]
        self.frees = _last_uses(self.fg, self.steps)


def step_reads(step) -> set:
    """Names of the values a step reads from the environment."""
    if isinstance(step, AtenStep) or hasattr(step, "chain"):      # an ATen call, a view (chain)
        return step.reads
    if hasattr(step, "members"):                       # a horizontal batch
        return set().union(*(step_reads(m) for m in step.members))
    if hasattr(step, "spec"):
        return {r.name for r in list(step.spec.inputs) + list(getattr(step.spec, "scalars", ()))}
    if hasattr(step, "steps"):                         # a fallback group
        return set().union(*(step_reads(s) for s in step.steps)) if step.steps else set()
    return ref_names([(n.args, n.kwargs) for n in getattr(step, "group_nodes", [])])


def kept_values(fg) -> set:
    """Values that live until the call returns: the outputs, and values whose sizes give a data-dependent
    symbol."""
    return fg.output_names() | {src[0] for src in fg.symbol_sources.values()}


def _last_uses(fg, steps) -> list:
    """Per step, the tensors no later step reads: dropped from the environment after it, so memory a value
    held returns to the allocator while the graph runs (eager's lifetime, not the whole call's). Outputs,
    and values whose sizes give a data-dependent symbol, are kept."""
    keep = kept_values(fg)
    last = {}
    for i, step in enumerate(steps):
        for name in step_reads(step):
            last[name] = i
    frees = [[] for _ in steps]
    for name, i in last.items():
        if name in keep or name not in fg.g or fg.node(name).kind == "symbol":
            continue
        frees[i].append(name)
    return frees


class FallbackStep:
    """A group whose kernel could not be built or used: its nodes run as ATen calls, in order."""
    kind = "fallback"

    def __init__(self, nodes, reason):
        self.steps = [AtenStep(n) for n in nodes]
        self.reason = reason
        warnings.warn("fusebackend: a fused group fell back to ATen (%s): %s" % (_summary(reason), describe(nodes)),
                      stacklevel=3)

    def __call__(self, env):
        for s in self.steps:
            s(env)


def describe(nodes, max_ops: int = 8, max_lines: int = 2) -> str:
    """What a fallback runs, in the user's terms: the ATen ops and the source lines they came from."""
    ops = [n.op_name.split(".")[0] for n in nodes if n.target is not None]
    text = "%d ATen call%s (%s%s)" % (len(ops), "" if len(ops) == 1 else "s", ", ".join(ops[:max_ops]),
                                      ", ..." if len(ops) > max_ops else "")
    where = []
    for n in nodes:
        line = source_line(getattr(n, "stack_trace", ""))
        if line and line not in where:
            where.append(line)
    if where:
        text += " from " + "; ".join(where[:max_lines]) + ("; ..." if len(where) > max_lines else "")
    return text


def source_line(stack_trace: str) -> str:
    """The innermost frame of an FX node's stack trace, as 'file:line in fn: code'."""
    lines = [l.strip() for l in (stack_trace or "").splitlines() if l.strip()]
    for k in range(len(lines) - 1, -1, -1):
        l = lines[k]
        if l.startswith("File "):
            parts = l.split(", ")
            path = parts[0][len("File "):].strip('"')
            lineno = parts[1].replace("line ", "") if len(parts) > 1 else "?"
            fn = parts[2].replace("in ", "") if len(parts) > 2 else "?"
            code = lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File ") else ""
            return "%s:%s in %s%s" % (path, lineno, fn, (": " + code) if code else "")
    return ""


def _summary(reason: str) -> str:
    """The reason's first line; for a compiler's output ('...failed:' then its log), also its first error."""
    lines = [l.strip() for l in reason.splitlines() if l.strip()]
    if not lines:
        return "no reason given"
    if lines[0].endswith(":") and len(lines) > 1:
        err = next((l for l in lines[1:] if "error" in l), lines[1])
        return "%s %s" % (lines[0], err[:300])
    return lines[0]
