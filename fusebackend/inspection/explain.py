"""fusebackend.explain(fn, *args, **kwargs): compile fn with the fuse backend, run it once, report."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..capture import records as report_mod


@dataclass
class Report:
    num_kernels: int = 0          # fused kernels launched per call (all graphs)
    num_aten_calls: int = 0       # opaque ATen calls + ops of groups that fell back
    num_views: int = 0            # zero-copy views taken at run time
    num_graphs: int = 0
    groups: list = field(default_factory=list)     # dicts: graph, id, kind, device, domain, ops
    fallbacks: list = field(default_factory=list)  # (op or group, reason)
    sources: list = field(default_factory=list)
    graph_reports: list = field(default_factory=list)
    placements: list = field(default_factory=list)   # PlacementPlan of each placed graph (gpu_memory_budget)
    moe_trace: list = field(default_factory=list)    # hybrid MoE layers' per-call decisions (inspection/moe_trace)
    moe_layers: list = field(default_factory=list)   # MoE layers run as one op without a budget (moe_rewrite)
    profiles: list = field(default_factory=list)     # explain(profile=True): call_profile.CallProfile per backend

    def __str__(self):
        lines = ["fusebackend report: %d graph(s), %d fused kernel(s), %d ATen call(s), %d view(s) per call"
                 % (self.num_graphs, self.num_kernels, self.num_aten_calls, self.num_views)]
        for r in self.graph_reports:
            lines.append("graph (%s): %d ATen nodes -> %d kernels, %d ATen calls"
                         % (r.kind, len(r.graph), r.num_kernels, r.num_aten_calls))
            for g in r.groups:
                flag = "  [fallback: %s]" % g.fallback_reason.splitlines()[0] if g.fallback_reason else ""
                lines.append("  " + g.describe(r.graph) + flag)
            steps = [s for s in getattr(r.program, "steps", ()) if getattr(s, "kind", None) == "batch"]
            for b in getattr(r, "batches", None) or ():
                lines.append("  " + b.describe())
                lines += ["    runs: " + s.describe() for s in steps
                          if getattr(s, "batch_id", None) == b.id and hasattr(s, "describe")]
            lines += ["  " + m for m in getattr(r, "moe_layers", None) or ()]
            if getattr(r, "placement", None) is not None:
                from ..passes.placement import format_plan
                lines += ["  " + l for l in format_plan(r.placement).splitlines()]
        if self.moe_trace:
            from .moe_trace import format_trace
            lines.append(format_trace(self.moe_trace))
        if self.profiles:
            from .call_profile import format_profiles
            lines.append(format_profiles(self.profiles))
        if self.fallbacks:
            lines.append("fallbacks:")
            lines += ["  %s: %s" % (op, reason.splitlines()[0]) for op, reason in self.fallbacks]
        return "\n".join(lines)


def explain(fn, *args, options=None, profile=False, **kwargs) -> Report:
    """Compile `fn` with backend="fuse" (Dynamo state is reset first), call it once on args, report.
    profile=True also times calls of eager, Inductor and fuse (inspection/call_profile.py): host time, GPU busy
    time, kernel launch-plus-queue time per call, and whether the call is launch- or GPU-bound."""
    from ..capture.backend import fuse
    from .moe_trace import report_trace_rows
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=fuse, options=options) if options else torch.compile(fn, backend=fuse)
    own = "FUSEBACKEND_MOE_TRACE" not in os.environ       # hybrid MoE layers record their decisions
    if own:
        os.environ["FUSEBACKEND_MOE_TRACE"] = "16"
    try:
        with report_mod.collect() as reps:
            compiled(*args, **kwargs)
    finally:
        if own:
            os.environ.pop("FUSEBACKEND_MOE_TRACE", None)
    rep = Report(graph_reports=list(reps), num_graphs=len(reps))
    if profile:
        from .call_profile import compare_backends
        rep.profiles = compare_backends(fn, args, options, kwargs=kwargs)
    rep.moe_trace += report_trace_rows(reps)
    for r in reps:
        if r.kind == "backward":
            continue
        rep.num_kernels += r.num_kernels
        rep.num_aten_calls += r.num_aten_calls
        rep.num_views += r.num_views
        rep.sources += r.sources
        rep.fallbacks += r.fallbacks
        if getattr(r, "placement", None) is not None:
            rep.placements.append(r.placement)
        rep.moe_layers += getattr(r, "moe_layers", None) or []
        for g in r.groups:
            rep.groups.append({"graph": r.kind, "id": g.id, "kind": g.kind, "device": g.device,
                               "domain": tuple(g.domain), "reduce_dims": tuple(g.reduce_dims),
                               "ops": [r.graph.node(n).op_name for n in g.nodes],
                               "fallback": g.fallback_reason})
    return rep
