"""When a horizontal batch pays: the rule that splits a proposed batch, with the reason `explain` prints.

Merging n launches into one saves n - 1 launch overheads (a ctypes call and an OpenMP region on the CPU, a
kernel launch on CUDA); it pays most for small, launch-bound problems. What it can cost depends on the target:

* CUDA: every problem of a batch keeps its own range of blocks, sized to the problem (runtime/cuda_batch.py), so
  a big problem beside many tiny ones loses nothing: always merge.
* CPU: the batch entry spreads problems over the threads, one problem per thread (emit/cpu.py). A problem bigger
  than the batch's fair share per thread (total bytes / threads) would run alone on one thread while the others
  idle; by itself it runs its own parallel loop on every thread. Such stragglers are kept out of the batch
  (largest first, the share recomputed); the members left keep their order (the batch entry schedules them
  dynamically, one at a time).

Numbers are nominal (a pass never measures): they size the saving `explain` prints, they decide nothing else.
"""
from __future__ import annotations

LAUNCH_S = {"cpu": 5e-6, "cuda": 8e-6}      # per-launch overhead, seconds
PAR_BYTES = 32768 * 4 * 2                   # a CPU problem below this runs its loop serially anyway (PAR_MIN)


def group_bytes(fg, group) -> int:
    """Bytes one run of the group reads and writes (each external input and written output once; an input it
    stores into, passes/inplace.py, is read and written)."""
    total = 0
    for ref in group.inputs:
        m = fg.meta_of(ref)
        if m is not None and m.is_static:
            total += m.numel * m.dtype.itemsize
    for name in list(group.outputs) + list(getattr(group, "stores", ())):
        m = fg.node(name).meta
        if m is not None and m.is_static:
            total += m.numel * m.dtype.itemsize
    return total


def split_batch(device: str, members: list, sizes: dict, threads: int):
    """(members kept in the batch, in launch order; [(group id, reason)] kept apart)."""
    kept = list(members)
    apart = []
    if device != "cpu":
        return kept, apart
    while len(kept) >= 2:
        big, total = max(kept, key=lambda g: sizes[g]), sum(sizes[g] for g in kept)
        share = total / max(1, threads)
        if sizes[big] <= share or sizes[big] < PAR_BYTES:
            break
        apart.append((big, "%s alone: its %s exceed the batch's share per thread (%s of %s over %d threads); "
                      "by itself it runs on every thread" % ("g%d" % big, human(sizes[big]), human(share),
                                                             human(total), threads)))
        kept.remove(big)
    return kept, apart


def merge_note(device: str, members: list, sizes: dict) -> str:
    n = len(members)
    total = sum(sizes[g] for g in members)
    return "saves %d launches (~%.0f us), %s, largest problem %s" % (
        n - 1, (n - 1) * LAUNCH_S.get(device, 5e-6) * 1e6, human(total), human(max(sizes[g] for g in members)))


def human(nbytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return "%.1f %s" % (nbytes / scale, unit)
    return "%d B" % nbytes
