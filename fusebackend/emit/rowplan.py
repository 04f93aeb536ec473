"""Phase plan for a reduction group (target independent).

Reductions are levelled: a reduction whose input needs another reduction's result runs one phase later.
Phase p loops over the reduced index once, feeding the level-p reductions; a last phase writes row-level
outputs. Row-level values needed again in a later phase are cached on chip rather than recomputed, so a
softmax or a layer norm reads its input from memory once.
"""
from __future__ import annotations

import re

from ..graph.fusion_graph import FusionGraph, Ref
from ..passes.shapes import is_per_row


class RowPlan:
    def __init__(self, fg: FusionGraph, group, meta_of):
        self.fg, self.group, self.meta_of = fg, group, meta_of
        self.domain, self.rdims = tuple(group.domain), tuple(group.reduce_dims)
        self.members = set(group.nodes)
        self.reductions = [n for n in group.nodes if fg.node(n).kind == "reduction"]
        self.level = {}
        for r in self.reductions:
            self.level[r] = self._level(r)
        self.num_levels = 1 + max(self.level.values())
        self.row_outputs = [n for n in group.outputs if not self.per_row(n)]
        self.scalar_outputs = [n for n in group.outputs if self.per_row(n)]
        self.num_phases = self.num_levels + (1 if self.row_outputs else 0)
        self.home, self.cached, self.uncacheable = {}, [], set()
        self._plan_cache()

    def key(self, ref):
        return (ref.name, ref.item) if isinstance(ref, Ref) else (ref, None)

    def per_row(self, ref, at=None) -> bool:
        """Constant along the reduced dims (computed once per row). `at`, the index a value is read at, rules
        out a read through a view: x[1, 1030] transposed to [1030, 1] and reduced over dim 0 has a per-row
        shape but is read at a reduced index."""
        if not is_per_row(self.meta_of(ref).shape, self.domain, self.rdims):
            return False
        if at is not None:
            text = " ".join(at)
            if re.search(r"\bix\d+\b", text):   # read where an index tensor points (a take): not per row
                return False
            used = {int(d) for d in re.findall(r"\bi(\d+)\b", text)}
            return not (used & set(self.rdims))
        return True

    def red_input(self, name) -> Ref:
        return self.fg.node(name).args[0]

    def _deps(self, name):
        """The tensor values a member reads (a view's symbolic sizes are not values)."""
        node = self.fg.node(name)
        out = []
        for a in node.args:
            if isinstance(a, Ref):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, Ref))
        return [r for r in out if self.meta_of(r) is not None]

    def _level(self, red) -> int:
        best, stack, seen = -1, [self.red_input(red)], set()
        while stack:
            ref = stack.pop()
            k = self.key(ref)
            if k in seen or ref.name not in self.members:
                continue
            seen.add(k)
            if self.fg.node(ref.name).kind == "reduction":
                best = max(best, self.level.get(ref.name, self._level(ref.name)))
                continue
            stack.extend(self._deps(ref.name))
        return best + 1

    def targets(self, phase: int) -> list:
        if phase < self.num_levels:
            return [self.red_input(r) for r in self.reductions if self.level[r] == phase]
        return list(self.row_outputs)

    def _plan_cache(self):
        """home[k] = first phase computing row-level value k; a value reached again later is cached."""
        for p in range(self.num_phases):
            stack = [(t if isinstance(t, Ref) else Ref(t), False) for t in self.targets(p)]
            seen = set()
            while stack:
                ref, under_view = stack.pop()
                k = self.key(ref)
                if (k, under_view) in seen or self.per_row(ref):
                    continue
                seen.add((k, under_view))
                if under_view:
                    self.uncacheable.add(k)
                if k in self.home and self.home[k] < p:
                    if k not in self.cached and k not in self.uncacheable:
                        self.cached.append(k)
                    if k not in self.uncacheable:
                        continue
                self.home.setdefault(k, p)
                if ref.name in self.members:
                    view = self.fg.node(ref.name).kind == "view"
                    stack.extend((d, under_view or view) for d in self._deps(ref.name))
        # only values spanning the whole domain are cached (stored and read back at the row index); one that
        # broadcasts into it (a [3] bias in a [33, 3] row group) is simply read again
        self.cached = [k for k in self.cached if k not in self.uncacheable
                       and tuple(self.meta_of(Ref(*k)).shape) == self.domain]
