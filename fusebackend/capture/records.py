"""What a compile did: groups, kernels, fallbacks and sources, recorded for `explain` and for dumps.

The records are data; the inspection layer (`fusebackend/inspection/`) formats and writes them. It sits above
capture, so a dump folder's writer is named here, not imported: it is loaded when `dump_dir` is set.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

_local = threading.local()


@dataclass
class GraphReport:
    kind: str
    graph: Any
    groups: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    program: Any = None
    placement: Any = None         # passes.placement.PlacementPlan when compiled with gpu_memory_budget
    patterns: Any = None          # passes.patterns.Patterns found in the graph (placement only)
    moe_layers: list = field(default_factory=list)   # MoE layers rewritten into one op (capture/moe_layers.py)

    def __post_init__(self):
        # a graph that already holds the ops (a warm start from the program cache): name them
        if not self.moe_layers and self.graph is not None and hasattr(self.graph, "nodes"):
            self.moe_layers = ["%s: a MoE layer as one op" % n.name for n in self.graph.nodes()
                               if n.target is not None and n.op_name == "moe_experts.default"]

    @property
    def num_kernels(self) -> int:
        """Kernel launches per call: a horizontal batch counts once."""
        steps = getattr(self.program, "steps", None)
        if steps is not None:
            return sum(1 for s in steps if s.kind in ("kernel", "batch"))
        return sum(1 for g in self.groups if g.is_kernel and not g.fallback_reason)

    @property
    def num_aten_calls(self) -> int:
        if not self.groups:              # the whole graph fell back: every op is an ATen call
            return sum(1 for n in self.graph.nodes() if n.kind not in ("placeholder", "symbol", "view"))
        fused = sum(len(g.nodes) for g in self.groups if g.is_kernel and g.fallback_reason)
        return fused + sum(1 for g in self.groups if g.kind == "opaque" and not self._int_arithmetic(g))

    def _int_arithmetic(self, group) -> bool:
        """A group of symbolic-int arithmetic (s0 + s1, a size read as a value): Python ints, not ATen calls."""
        return all(self.graph.node(n).sym_expr is not None and self.graph.node(n).meta is None for n in group.nodes)

    @property
    def num_views(self) -> int:
        return sum(1 for g in self.groups if g.kind == "view")


DUMP_WRITER = ("fusebackend.inspection.dump", "write_dump")


def record(rep: GraphReport, opts) -> None:
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink.append(rep)
    dump_dir = opts.dump_dir or os.environ.get("FUSEBACKEND_DUMP_DIR")
    if dump_dir:
        module, name = DUMP_WRITER
        getattr(importlib.import_module(module), name)(rep, dump_dir)


class collect:
    """Context manager collecting the GraphReports of compiles in this thread."""

    def __enter__(self):
        self.prev = getattr(_local, "sink", None)
        self.reports = []
        _local.sink = self.reports
        return self.reports

    def __exit__(self, *exc):
        _local.sink = self.prev
        return False
