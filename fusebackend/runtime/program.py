"""The compiled-graph callable: a flat list of steps over an environment of named values."""
from __future__ import annotations

import operator
import warnings

from ..graph.fusion_graph import Ref
from .steps import AtenStep, KernelStep, LayoutMismatch, resolver


class Program:
    """Calls steps in order; AOT autograd calls it boxed (a list of inputs that it may free)."""
    _boxed_call = True

    def __init__(self, fg, steps, input_names):
        self.fg = fg
        self.steps = steps
        self.input_names = list(input_names)
        self.outputs = [resolver(o) for o in fg.outputs]
        names = [o.name for o in fg.outputs if isinstance(o, Ref) and o.item is None]
        # many plain outputs (a horizontal batch returns a list): one C call gathers them
        self.gather = operator.itemgetter(*names) if len(names) == len(fg.outputs) >= 2 else None

    def __call__(self, args):
        env = dict(zip(self.input_names, args))
        if isinstance(args, list):
            args.clear()
        for i, step in enumerate(self.steps):
            try:
                step(env)
            except LayoutMismatch as e:    # specialised layout did not hold: run that group as ATen
                self.steps[i] = FallbackStep(step.group_nodes, "layout: %s" % e)
                self.steps[i](env)
        if self.gather is not None:
            return list(self.gather(env))
        return [o(env) for o in self.outputs]


class FallbackStep:
    """A group whose kernel could not be built or used: its nodes run as ATen calls, in order."""
    kind = "fallback"

    def __init__(self, nodes, reason):
        self.steps = [AtenStep(n) for n in nodes]
        self.reason = reason
        warnings.warn("fusebackend: a fused group fell back to ATen (%s)" % _summary(reason), stacklevel=3)

    def __call__(self, env):
        for s in self.steps:
            s(env)


def _summary(reason: str) -> str:
    """The reason's first line; for a compiler's output ('...failed:' then its log), also its first error."""
    lines = [l.strip() for l in reason.splitlines() if l.strip()]
    if not lines:
        return "no reason given"
    if lines[0].endswith(":") and len(lines) > 1:
        err = next((l for l in lines[1:] if "error" in l), lines[1])
        return "%s %s" % (lines[0], err[:300])
    return lines[0]
