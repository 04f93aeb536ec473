"""When a horizontal batch pays: the rule that merges or splits the kernels of one depth, with the reasons
`explain` prints.

Merging n launches into one saves n - 1 launch overheads (a ctypes call and an OpenMP region on the CPU, a
kernel launch on CUDA); it pays most for small, launch-bound problems. The kernels of one launch need not run
the same code: each problem carries a chain id (its kernel's body), so kernels of different chains -- the
2-D and the 1-D updates of an optimizer step, different dtypes -- share a launch too (a divergent batch).
What merging can cost depends on the target:

* CPU: one parallel region runs every problem, each on one thread, problems dealt to threads by their bytes
  (runtime/cpu_batch.py); a problem's chain is its kernel's own function, so mixing chains costs nothing. A
  problem bigger than the batch's fair share per thread (total bytes / threads) would run alone on one
  thread while the others idle; by itself it runs its own parallel loop on every thread. Such stragglers are
  kept out of the batch (largest first, the share recomputed).
* CUDA: every problem keeps its own range of blocks, sized to the problem (runtime/cuda_batch.py), so a big
  problem beside many tiny ones of the same chain loses nothing: those always merge. Chains merge into one
  kernel (a switch on the chain id) only when that kernel is launch-bound enough to pay: one kernel has one
  register count, the largest chain's, and one block size, so a chain of another launch family (pointwise
  beside row reductions) never joins, and of the rest the chain with most bytes anchors the launch and
  another chain joins only while its own work is small (nominal time at most MERGE_LAUNCHES launch
  overheads): a big second chain would pay the anchor's register budget for one saved launch. At most
  MAX_CHAINS chains share a kernel (its compile time grows with every body).

Numbers are nominal (a pass never measures): they size the saving `explain` prints and draw the lines above.
"""
from __future__ import annotations

LAUNCH_S = {"cpu": 5e-6, "cuda": 8e-6}      # per-launch overhead, seconds
BYTES_S = {"cpu": 2e10, "cuda": 3e12}       # nominal bytes per second a chain's problems stream at
PAR_BYTES = 32768 * 4 * 2                   # a CPU problem below this runs its loop serially anyway (PAR_MIN)
MERGE_LAUNCHES = 8                          # CUDA: a second chain joins while it runs at most this many launches
MAX_CHAINS = 8                              # CUDA: chain bodies in one divergent kernel


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


def plan_merges(device: str, members: list, sizes: dict, chain_of: dict, family_of: dict, threads: int) -> list:
    """The launches one depth's kernels of one device become: a list of (members, note, apart) with members in
    launch order, note why they merge, apart [(group id, reason)] for the groups of this depth left out of
    them (run alone, or in another launch of the list). chain_of: group id -> its chain (same chain: same
    code); family_of: group id -> its launch family (kernel kind: chains of two families never share a
    CUDA kernel)."""
    chains = {}
    for g in members:
        chains.setdefault(chain_of[g], []).append(g)
    if device == "cpu":
        kept, apart = split_batch(device, members, sizes, threads)
        return [(kept, merge_note(device, kept, sizes, _count(kept, chain_of)), apart)]
    families = {}
    for key, gs in chains.items():
        families.setdefault(family_of[gs[0]], []).append(key)
    sets = []                                       # (family, chain keys, [(group id, reason)])
    for fam, keys in families.items():
        left = sorted(keys, key=lambda k: -_bytes(chains[k], sizes))
        while left:
            cur, why = [left.pop(0)], []
            for k in list(left):
                t = _bytes(chains[k], sizes) / BYTES_S[device]
                if len(cur) >= MAX_CHAINS:
                    why.append((chains[k][0], "chain of %s in another launch: at most %d chains share a kernel"
                                % (_label(chains[k]), MAX_CHAINS)))
                elif t <= MERGE_LAUNCHES * LAUNCH_S[device]:
                    cur.append(k)
                    left.remove(k)
                else:
                    why.append((chains[k][0], "chain of %s in another launch: its %s (~%.0f us at a nominal %.0f "
                                "GB/s) are more than %d launches of work, so the launch it would save is noise "
                                "beside the register budget it would share" % (
                                    _label(chains[k]), human(_bytes(chains[k], sizes)), t * 1e6,
                                    BYTES_S[device] / 1e9, MERGE_LAUNCHES)))
            sets.append((fam, cur, why))
    order = {g: i for i, g in enumerate(members)}
    out = []
    for fam, keys, why in sets:
        for other, ks in families.items():
            if other != fam:
                gs = [g for k in ks for g in chains[k]]
                why.append((gs[0], "%s kernels (%s) in another launch: %s and %s kernels launch with different "
                            "block shapes" % (other, _label(gs), fam, other)))
        gs = sorted((g for k in keys for g in chains[k]), key=order.get)
        out.append((gs, merge_note(device, gs, sizes, len(keys)), why))
    return out


def merge_note(device: str, members: list, sizes: dict, chains: int = 1) -> str:
    n = len(members)
    if not n:
        return ""
    total = sum(sizes[g] for g in members)
    text = "saves %d launches (~%.0f us), %s, largest problem %s" % (
        n - 1, (n - 1) * LAUNCH_S.get(device, 5e-6) * 1e6, human(total), human(max(sizes[g] for g in members)))
    if chains > 1:
        text += "; %d chains in one %s" % (chains, "parallel region, problems dealt to threads by bytes"
                                           if device == "cpu" else "kernel, a switch on each problem's chain")
    return text


def _count(members, chain_of) -> int:
    return len({chain_of[g] for g in members})


def _bytes(gs, sizes) -> int:
    return sum(sizes[g] for g in gs)


def _label(gs) -> str:
    return "g%d" % gs[0] + (" and %d more" % (len(gs) - 1) if len(gs) > 1 else "")


def human(nbytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return "%.1f %s" % (nbytes / scale, unit)
    return "%d B" % nbytes
