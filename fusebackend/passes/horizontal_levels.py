"""The level each group runs at, chosen so that independent kernels meet: a schedule of the group DAG.

Batching by exact depth misses kernels that are ready at the same time but sit at different depths: in an
attention layer q's rotary follows slices of the projection, v's repeat follows an unsqueeze and an expand,
so v's kernel is one level deeper than q's and k's although nothing orders them. Each group has a window of
levels it can run at: from its depth (ASAP, the earliest) to the latest level that still leaves room for its
consumers (ALAP, against the DAG's longest path, so no schedule is longer than the depth order's).

The schedule walks the levels in order (list scheduling; a group is ready once every producer ran at an
earlier level, so every data and order edge is kept). Views and ATen calls run as soon as they are ready, as
in the depth order. A kernel runs when it is ready too, unless another kernel of its batch key (device, and on
CUDA its launch family) not ready yet could join it later: it then waits while it can, and when some kernel
of the key reaches the end of its window (or none still to come can meet the waiting ones), every ready
kernel of that key runs at that level, in one batch. That is the greedy that stabs intervals at their
earliest deadline -- the fewest points for independent windows -- applied as the windows open. A kernel with
no possible partner keeps its depth, so values live as long as before wherever waiting cannot save a launch,
and none waits more than MAX_WAIT levels.
"""
from __future__ import annotations

from dataclasses import dataclass

# levels a kernel may wait past its depth: waiting keeps its inputs alive longer (a sink's window reaches the
# graph's end), so it is bounded to keep peak memory near the depth order's
MAX_WAIT = 4


@dataclass
class Schedule:
    level: dict       # id -> the level it runs at
    asap: dict        # id -> its depth, the earliest level
    alap: dict        # id -> the latest level it may wait to (ALAP, at most MAX_WAIT past its depth)
    anc: dict         # id -> its ancestors, a bit set over `bit`
    bit: dict         # id -> its bit


def group_producers(fg, groups) -> dict:
    """group id -> the ids of the groups it reads (data and order edges alike)."""
    owner = {n: g.id for g in groups for n in g.nodes}
    return {g.id: {owner[p] for n in g.nodes for p in fg.producers(n) if p in owner and owner[p] != g.id}
            for g in groups}


def windows(order: list, producers: dict):
    """(asap, alap) dicts over ids in a topological order: the earliest and the latest level of each."""
    asap = {}
    for g in order:
        asap[g] = 1 + max((asap[p] for p in producers[g]), default=-1)
    last = max(asap.values(), default=0)
    alap = {g: last for g in order}
    for g in reversed(order):
        for p in producers[g]:
            alap[p] = min(alap[p], alap[g] - 1)
    return asap, alap


def ancestors(order, producers):
    """(id -> its ancestors as a bit set, id -> its bit)."""
    bit = {g: 1 << i for i, g in enumerate(order)}
    anc = {}
    for g in order:
        a = 0
        for p in producers[g]:
            a |= anc[p] | bit[p]
        anc[g] = a
    return anc, bit


def _partners(order, key, asap, alap, anc, bit) -> set:
    """Keyed ids that some other kernel of their key could share a level with (overlapping windows, neither
    an ancestor of the other)."""
    by_key: dict = {}
    for g in order:
        if key.get(g) is not None:
            by_key.setdefault(key[g], []).append(g)
    found = set()
    for gs in by_key.values():
        gs = sorted(gs, key=lambda g: asap[g])
        for i, g in enumerate(gs):
            if g in found:
                continue
            for h in gs[i + 1:]:            # one partner is enough: the first that fits
                if asap[h] > alap[g]:
                    break                   # sorted by asap: no later window opens in time
                if alap[h] >= asap[g] and not anc[h] & bit[g]:
                    found.update((g, h))
                    break
            if g in found:
                continue
            for h in reversed(gs[:i]):      # an earlier one that found another partner first
                if asap[h] + MAX_WAIT < asap[g]:
                    break                   # its window closed before g's opens
                if alap[h] >= asap[g] and not anc[g] & bit[h]:
                    found.update((g, h))
                    break
    return found


def schedule(order: list, producers: dict, key: dict) -> Schedule:
    """The levels. order: ids in a topological order; key: id -> batch key, None for
    groups that never batch (they run as soon as they are ready)."""
    asap, alap = windows(order, producers)
    alap = {g: min(alap[g], asap[g] + MAX_WAIT) for g in order}
    anc, bit = ancestors(order, producers)
    partners = _partners(order, key, asap, alap, anc, bit)
    consumers: dict = {g: [] for g in order}
    for g in order:
        for p in producers[g]:
            consumers[p].append(g)
    waiting = {g: len(producers[g]) for g in order}
    pos = {g: i for i, g in enumerate(order)}
    ready = [g for g in order if not waiting[g]]
    coming: dict = {}                             # key -> its kernels with a partner, not ready yet
    for g in order:
        if g in partners and waiting[g]:
            coming.setdefault(key[g], set()).add(g)
    level, lvl = {}, 0
    while ready:
        now, held = [], {}
        for g in ready:
            if g in partners:
                held.setdefault(key[g], []).append(g)
            else:
                now.append(g)
        for k, gs in held.items():
            # one is due, or none can meet a kernel still to come: every ready kernel of the key goes now
            if any(alap[g] <= lvl for g in gs) or not _can_meet(gs, coming.get(k, ()), asap, alap, anc, bit):
                now += gs
        assert now or lvl <= max(alap.values()), "horizontal levels: a kernel waited past its window"
        left = [g for g in ready if g not in set(now)]
        for g in now:
            level[g] = lvl
        nxt = []
        for g in now:
            for c in consumers[g]:
                waiting[c] -= 1
                if not waiting[c]:
                    nxt.append(c)
                    coming.get(key.get(c), set()).discard(c)
        ready = sorted(left + nxt, key=pos.get)
        lvl += 1
    return Schedule(level, asap, alap, anc, bit)


def _can_meet(held, coming, asap, alap, anc, bit) -> bool:
    """Whether a kernel not ready yet could still join one of the held ones: its window opens before theirs
    closes and it does not read their results."""
    for h in coming:
        for g in held:
            if asap[h] <= alap[g] and not anc[h] & bit[g]:
                return True
    return False


def waited_note(level: int, waited: list) -> str:
    """What explain says of members run later than their depth."""
    gs = ", ".join("g%d" % g for g, _ in waited[:6]) + (" and %d more" % (len(waited) - 6) if len(waited) > 6
                                                          else "")
    return "level %d: %s waited from depth %s to meet the others" % (
        level, gs, "/".join(str(d) for d in sorted({d for _, d in waited})))


def elsewhere(batch, key: dict, s: Schedule, most: int = 2) -> list:
    """[(level, reason)]: why the batch does not run with kernels of its key at other levels that one of the
    two could have waited for or reached (a window holds the other's level): a member and one of them are
    ordered by the DAG, or that level's launch came due before the other side was ready. The `most` nearest."""
    members = batch.groups
    k = key[members[0]]
    at: dict = {}
    near = set()
    for g, lv in s.level.items():
        if key.get(g) != k or lv == batch.level:
            continue
        at.setdefault(lv, []).append(g)
        if s.asap[g] <= batch.level <= s.alap[g] or any(s.asap[m] <= lv <= s.alap[m] for m in members):
            near.add(lv)
    mine = anc = 0
    for m in members:
        mine, anc = mine | s.bit[m], anc | s.anc[m]
    out = []
    for lv in sorted(near, key=lambda lv: (abs(lv - batch.level), lv))[:most]:
        gs = at[lv]
        later = next((g for g in gs if s.anc[g] & mine), None)      # reads a member's result
        earlier = next((g for g in gs if anc & s.bit[g]), None)      # a member reads its result
        due = [g for g in gs if s.alap[g] == lv]
        if later is not None:
            why = "g%d reads a result of g%d" % (later, next(m for m in members if s.anc[later] & s.bit[m]))
        elif earlier is not None:
            why = "g%d reads a result of g%d" % (next(m for m in members if s.anc[m] & s.bit[earlier]), earlier)
        elif lv < batch.level:
            why = "g%d %s there, before g%d was ready" % (due[0] if due else gs[0], "was due" if due else "ran",
                                                          members[0])
        else:
            why = "g%d was due at level %d, before g%d was ready" % (
                min(members, key=s.alap.get), batch.level, gs[0])
        out.append((lv, "not with level %d's %s (%s): %s" % (lv, "kernel" if len(gs) == 1 else "kernels",
                                                                _names(gs), why)))
    return out


def _names(gs) -> str:
    return ", ".join("g%d" % g for g in gs[:3]) + (" and %d more" % (len(gs) - 3) if len(gs) > 3 else "")
