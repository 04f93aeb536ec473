"""Horizontal fusion: independent kernel groups that can share one launch.

Groups at the same depth of the group DAG never depend on each other. The pass orders groups by depth
(a valid schedule) and proposes batches: kernel groups of one depth, device and structure. The runtime
launches a batch as one kernel whose problems each carry their own pointers and sizes (the emitters'
batch entry point), when the members' kernels are the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..graph.fusion_graph import FusionGraph
from .horizontal_cost import group_bytes, merge_note, split_batch


@dataclass
class Batch:
    id: int
    device: str
    groups: list = field(default_factory=list)    # group ids, in launch order
    note: str = ""                                # why merging pays (horizontal_cost.merge_note)
    apart: list = field(default_factory=list)     # (group id, reason): same code, kept out by the cost rule

    def describe(self) -> str:
        if len(self.groups) < 2:       # the cost rule dissolved it: only the reasons are left
            text = "b%d %s: not merged" % (self.id, self.device)
            return text + "".join("; " + why for _, why in self.apart)
        text = "b%d %s: %d kernels in one launch (g%s)" % (self.id, self.device, len(self.groups),
                                                          ", g".join(str(g) for g in self.groups))
        text += ": " + self.note if self.note else ""
        return text + "".join("; kept apart: " + why for _, why in self.apart)


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
    """Returns (groups in depth order, batches). Groups of one signature at one depth form a batch, less those
    the cost rule keeps apart (horizontal_cost.py; threads: the CPU's, default torch's intra-op threads)."""
    owner = {n: g.id for g in groups for n in g.nodes}
    depth = {}
    for g in groups:                                  # groups arrive in a topological order
        producers = {owner[p] for n in g.nodes for p in fg.producers(n) if p in owner and owner[p] != g.id}
        depth[g.id] = 1 + max((depth[p] for p in producers), default=-1)
    ordered = sorted(groups, key=lambda g: depth[g.id])   # stable: keeps the order within a depth
    buckets: dict = {}
    for g in ordered:
        if g.is_kernel and all(fg.node(n).meta is not None and fg.node(n).meta.is_static for n in g.nodes):
            buckets.setdefault((depth[g.id], signature(fg, g)), []).append(g.id)
    batches = []
    by_id = {g.id: g for g in groups}
    threads = threads or torch.get_num_threads()
    for members in buckets.values():
        if len(members) < min_size:
            continue
        device = by_id[members[0]].device
        sizes = {m: group_bytes(fg, by_id[m]) for m in members}
        kept, apart = split_batch(device, members, sizes, threads)
        if len(kept) >= min_size:
            batches.append(Batch(len(batches), device, kept, merge_note(device, kept, sizes), apart))
        elif apart:                    # kept for explain: what the rule split, and why (runs as no batch)
            batches.append(Batch(len(batches), device, kept, "", apart))
    return ordered, batches

