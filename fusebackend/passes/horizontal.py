"""Horizontal fusion: independent kernel groups that can share one launch.

Groups at one level of a schedule of the group DAG never depend on each other. The levels come from
horizontal_levels.py: each group's window runs from its depth (the earliest) to the latest level its
consumers allow, and kernels that could meet another kernel of their key wait within it, so kernels ready at
the same time batch even at different depths (q's rotary and v's repeat in attention). The pass orders groups
by level (a valid schedule: every data and order edge points to a later level) and proposes batches: kernel
groups of one level and device, whatever code each runs. Groups of one signature are one chain (the same
generated body); a batch of several chains is divergent: each problem carries its own pointers, sizes and
chain id, and the runtime launches the batch as one kernel that switches on the chain (CUDA:
emit/cuda_batch.py; the CPU: one parallel region calling each problem's kernel, runtime/cpu_batch.py).
horizontal_cost.py decides which merges pay and says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..graph.fusion_graph import FusionGraph
from .horizontal_cost import group_bytes, plan_merges
from .horizontal_levels import elsewhere, group_producers, schedule, waited_note


@dataclass
class Batch:
    id: int
    device: str
    groups: list = field(default_factory=list)    # group ids, in launch order
    note: str = ""                                # why merging pays (horizontal_cost.merge_note)
    apart: list = field(default_factory=list)     # (group id, reason): of this depth, kept out by the cost rule
    chains: int = 1                               # distinct signatures among the groups (1: one code)
    launches: list = field(default_factory=list)  # how the runtime launched it, where not as one (its notes)
    level: int = 0                                # its level in the schedule (horizontal_levels.py)
    waited: list = field(default_factory=list)    # (group id, depth): members that waited from their depth
    elsewhere: list = field(default_factory=list) # (level, reason): why not with kernels at other levels

    def describe(self) -> str:
        if len(self.groups) < 2:       # the cost rule dissolved it: only the reasons are left
            text = "b%d %s: not merged" % (self.id, self.device)
            return text + "".join("; " + why for _, why in self.apart + self.elsewhere)
        ids = ["g%d" % g for g in self.groups]
        if len(ids) > 12:
            ids = ids[:6] + ["..."] + ids[-2:]
        text = "b%d %s: %d kernels in one launch (%s)" % (self.id, self.device, len(self.groups), ", ".join(ids))
        text += ": " + self.note if self.note else ""
        text += "; " + waited_note(self.level, self.waited) if self.waited else ""
        text += "".join("; kept apart: " + why for _, why in self.apart)
        text += "".join("; " + why for _, why in self.elsewhere)
        return text + "".join("; runtime: " + why for why in self.launches)


def signature(fg: FusionGraph, group) -> tuple:
    """Groups with equal signatures compute the same function on operands of the same layout class."""
    sig = []
    for n in group.nodes:
        node = fg.node(n)
        args = tuple(a if isinstance(a, (int, float, bool, str, type(None))) else type(a).__name__
                     for a in node.args)
        sig.append((node.op_name, node.meta.dtype, node.meta.rank, args))
    for ref in group.inputs:
        m = fg.meta_of(ref)
        sig.append(("in", m.dtype if m else None, m.rank if m else None, m.contiguous if m else None))
    return (group.kind, group.device, len(group.domain), tuple(group.reduce_dims), tuple(sig))


def batch_horizontal(fg: FusionGraph, groups: list, min_size: int = 2, threads: int = 0):
    """Returns (groups in level order, batches). The kernel groups of one level and device form batches, as
    the cost rule merges and splits them (horizontal_cost.plan_merges; threads: the CPU's, default torch's
    intra-op threads)."""
    by_id = {g.id: g for g in groups}
    ids = [g.id for g in groups]                      # groups arrive in a topological order
    producers = group_producers(fg, groups)
    keys = {g.id: batch_key(fg, g) for g in groups}
    sched = schedule(ids, producers, keys)
    level, depth = sched.level, sched.asap
    ordered = sorted(groups, key=lambda g: level[g.id])   # stable: keeps the order within a level
    buckets: dict = {}
    for g in ordered:
        if keys[g.id] is not None:
            buckets.setdefault((level[g.id], g.device), []).append(g.id)
    batches = []
    threads = threads or torch.get_num_threads()
    for (lvl, device), members in buckets.items():
        if len(members) < min_size:
            continue
        sizes = {m: group_bytes(fg, by_id[m]) for m in members}
        sigs = {m: signature(fg, by_id[m]) for m in members}
        kinds = {m: by_id[m].kind for m in members}
        for kept, note, apart in plan_merges(device, members, sizes, sigs, kinds, threads):
            chains = len({sigs[m] for m in kept})
            waited = [(m, depth[m]) for m in kept if depth[m] != lvl]
            if len(kept) >= min_size:
                batches.append(Batch(len(batches), device, kept, note, apart, chains, level=lvl, waited=waited))
            elif apart:                # kept for explain: what the rule split, and why (runs as no batch)
                batches.append(Batch(len(batches), device, kept, "", apart, level=lvl))
    for b in batches:
        b.elsewhere = elsewhere(b, keys, sched)
    return ordered, batches


def batch_key(fg: FusionGraph, group):
    """Kernels of one key can share a launch: static kernel groups of one device; on CUDA of one launch family
    too (horizontal_cost: pointwise and row kernels never share a CUDA kernel). None: the group never batches."""
    if not group.is_kernel or not all(fg.node(n).meta is not None and fg.node(n).meta.is_static
                                      for n in group.nodes):
        return None
    return (group.device,) if group.device == "cpu" else (group.device, group.kind)
