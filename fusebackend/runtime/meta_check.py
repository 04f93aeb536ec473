"""ATen outputs that a kernel reads are checked against the fake-tensor metadata the kernel was built for.

A kernel takes the dtype and sizes of its operands from the graph's metadata (fake tensors), not from the
run-time tensor. Where an op's fake kernel and its real kernel disagree, the kernel would read the real
buffer with the wrong element type or extent: torch's `_native_batch_norm_legit_functional` reports float32
running stats for a bfloat16 input while the real op returns bfloat16, and a fused cast read those buffers
as float32 -- twice their size, out of bounds -- and the running stats came back near 1e31.

The check costs one dtype and one shape comparison per checked value and call. A dtype mismatch is repaired
by converting the real value to the dtype the graph (and so the kernel) expects: the real op's result is what
eager computes, and the graphs we see only widen (bf16 -> f32), which is exact. A size or layout the kernel
cannot read raises `MetaMismatch`: the Program then runs the rest of the call as ATen ops, with one warning.
"""
from __future__ import annotations

import warnings

from ..graph.fusion_graph import Ref
from .steps import AtenStep


class MetaMismatch(RuntimeError):
    """An ATen call's real output has sizes its fake metadata did not promise."""


class CheckedAtenStep(AtenStep):
    """An AtenStep whose outputs listed in `checked` ([(item or None, TensorMeta)]) are verified per call."""

    def __init__(self, node, checked):
        super().__init__(node)
        self.checked = [(item, meta, tuple(meta.shape) if meta.is_static else None) for item, meta in checked]
        self.op_label = node.op_name
        self.warned = False

    def __call__(self, env):
        value = self.invoke(self.args(env), self.kwargs(env))
        try:
            env[self.name] = self.conform(value)
        except MetaMismatch as e:
            env[self.name] = e.value
            raise

    def conform(self, value):
        """The op's result, converted where its dtype is not the promised one; MetaMismatch (with the value as
        `.value`) where its sizes are not."""
        for item, meta, shape in self.checked:
            t = value if item is None else value[item]
            if t.dtype is not meta.dtype:
                t = self._conform_dtype(t, meta)
                if item is None:
                    value = t
                else:
                    value = list(value)
                    value[item] = t
            if shape is not None and tuple(t.shape) != shape:
                e = MetaMismatch("%s (%s) returned sizes %s where its fake kernel promised %s"
                                 % (self.op_label, self.name, tuple(t.shape), shape))
                e.value = value
                raise e
        return value

    def _conform_dtype(self, t, meta):
        if not self.warned:
            self.warned = True
            warnings.warn("fusebackend: %s returned %s where its fake kernel promised %s; the value is "
                          "converted before fused kernels read it" % (self.op_label, t.dtype, meta.dtype),
                          stacklevel=4)
        return t.to(meta.dtype)


def kernel_read_values(steps) -> set:
    """(name, item) of every value a kernel or horizontal batch reads."""
    out = set()
    for s in steps:
        members = getattr(s, "members", None) or ([s] if hasattr(s, "spec") else [])
        for m in members:
            for r in m.spec.inputs:
                if isinstance(r, Ref):
                    out.add((r.name, r.item))
    return out


def check_kernel_inputs(fg, steps) -> list:
    """Replace each AtenStep whose tensor output a kernel reads by a CheckedAtenStep."""
    read = kernel_read_values(steps)
    out = []
    for s in steps:
        if type(s) is AtenStep:
            node = fg.node(s.name)
            checked = [(item, fg.meta_of(Ref(s.name, item))) for name, item in read if name == s.name]
            checked = [(i, m) for i, m in checked if m is not None]
            if checked:
                s = CheckedAtenStep(node, checked)
        out.append(s)
    return out


def step_nodes(fg, step) -> list:
    """The FusionGraph nodes a step runs, in order (for re-running a program's tail as ATen calls)."""
    if isinstance(step, AtenStep):
        return [fg.node(step.name)]
    if hasattr(step, "chain"):                                  # a view chain
        return [fg.node(s.name) for s in step.chain]
    if hasattr(step, "group_nodes"):
        return list(step.group_nodes)
    if hasattr(step, "steps"):                                  # a fallback group
        return [fg.node(s.name) for s in step.steps]
    raise TypeError("fusebackend: no nodes known for step %r" % (step,))


