"""The hybrid MoE layer's pure scheduling and bookkeeping (runtime/hybrid_moe.py runs them; no CUDA here).

Routing counts and the positions grouped by expert (host_order on the host from the routing's one copy,
grouped_positions on the device); a split expert's CPU rows (split_rows, multiples of 1/GRANULE); the popularity
score and the resident set it asks for (update_popularity, propose_resident, plan_swaps, bounded swaps); the
chance an expert is routed (routed_probability, expected_routed), which gates prefetch and picks the all-resident
fast path (fast_path_mode); and normalize_decision, which checks a cost-model decision and makes it a Plan.
"""
from __future__ import annotations

import math
from collections import namedtuple

import torch

GRANULE = 64                     # a split expert's CPU share is a multiple of 1/64 of its FFN rows


def routing_counts(idx, num_experts) -> list:
    """Tokens routed to each expert; ids outside [0, num_experts) (padding) count for none."""
    flat = idx.reshape(-1).to(torch.int64)
    return torch.bincount(flat[(flat >= 0) & (flat < num_experts)], minlength=num_experts).tolist()


def grouped_positions(idx, num_experts):
    """The device-side equivalent of host_order, for callers without the routing on the host. Flat positions
    (token * k + slot) grouped by expert id, ascending within an expert (a stable sort), on idx's device:
    with the host's counts, expert e's positions are one slice, no index list crosses the link."""
    flat = idx.reshape(-1)
    bad = (flat < 0) | (flat >= num_experts)
    return torch.argsort(torch.where(bad, torch.full_like(flat, num_experts), flat), stable=True)


def split_rows(ffn, fraction, granule=GRANULE) -> int:
    """FFN rows of a split expert done on the CPU: the fraction rounded to a multiple of 1/granule."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError("split fraction must be in [0, 1], got %r" % (fraction,))
    return round(fraction * granule) * ffn // granule


def update_popularity(score, counts, decay) -> list:
    """score = decay * score + (1 - decay) * share of this call's routed tokens; unchanged on an empty call."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError("popularity decay must be in [0, 1], got %r" % (decay,))
    total = sum(counts)
    return [decay * s + (1.0 - decay) * c / total for s, c in zip(score, counts)] if total else list(score)


def propose_resident(score, current, capacity, margin=0.0) -> list:
    """The resident set the score asks for, most popular first: free places go to the most popular outsiders;
    a resident expert yields only to an outsider whose score beats it by more than `margin` (no thrashing)."""
    rank = lambda e: (-score[e], e)          # noqa: E731
    res = sorted(set(current), key=rank)[:capacity]
    out = [e for e in sorted(range(len(score)), key=rank) if e not in res]
    while out and len(res) < capacity:
        res.append(out.pop(0))
    while out and res:
        weakest = max(res, key=rank)
        if score[out[0]] <= score[weakest] + margin:
            break
        res[res.index(weakest)] = out.pop(0)
    return sorted(res, key=rank)


def plan_swaps(current, desired, capacity, max_swaps, score) -> tuple:
    """(load, evict) moving `current` toward `desired` (priority order, cut to capacity): at most max_swaps
    loads, and only the evictions they need room for, least popular first."""
    desired = list(dict.fromkeys(desired))[:capacity]
    load = [e for e in desired if e not in current][:max(0, max_swaps)]
    spare = sorted((e for e in current if e not in desired), key=lambda e: (score[e], -e))
    need = max(0, len(current) + len(load) - capacity)
    return load, spare[:need]


def host_order(flat, num_experts, k):
    """On the host, from the routing's one device->host copy: (order, tok) as int64 -- the flat positions
    (token * k + slot) grouped by expert id, stable (ascending within an expert), padding ids last; and each
    position's token. One tiny host->device copy of both replaces a device argsort (several launches)."""
    flat = flat.reshape(-1).to(torch.int64)
    key = torch.where((flat < 0) | (flat >= num_experts), torch.full_like(flat, num_experts), flat)
    order = torch.argsort(key, stable=True)
    return order, torch.div(order, k, rounding_mode="floor")


def routed_probability(share, tokens, k):
    """Chance that an expert with `share` of the routed slots (the decayed popularity score) gets at least one
    of `tokens` tokens, each picking k distinct experts: 1 - (1 - min(1, k * share)) ** tokens."""
    p = min(1.0, max(0.0, k * share))
    return 1.0 - (1.0 - p) ** max(0, tokens)


def prefetch_gain(prob, window_s, transfer_s):
    """Expected link time a prefetch saves the next layer (s; <= 0: not worth it). The copy stream is FIFO: the
    part of the copy that fits in the link's idle window before the next layer starts is free; the rest is a
    backlog the next layer's own transfers wait behind. A hit (prob) saves the free part; a miss costs the rest."""
    free = min(max(window_s, 0.0), transfer_s)
    return prob * free - (1.0 - prob) * (transfer_s - free)


def expected_routed(score, experts, tokens, k):
    """Expected number of `experts` routed at least once in a call of `tokens` tokens (uniform shares while the
    score has seen nothing)."""
    experts = list(experts)
    if not experts:
        return 0.0
    total = sum(score[e] for e in experts)
    shares = [score[e] for e in experts] if total > 0 else [1.0 / len(score)] * len(experts)
    return sum(routed_probability(s, tokens, k) for s in shares)


def fast_path_mode(tokens, k, score, resident, gpu_time=None, grouped=False):
    """How a call whose experts are all resident runs -- no scheduler, no CPU, no link -- (pure):
      'grouped' (when the layer has its experts stacked and this torch has grouped matmuls: `grouped`) the
               routing sorted on the GPU, two grouped matmuls over the routed rows only: no host round trip and
               no weight read in vain, so it is taken at every token count (runtime/resident_moe.py).
      'dense'  every resident expert over all `tokens` rows, weighted by a [T, E] combine matrix built on the
               GPU: no device->host copy, no synchronisation, a fixed ~5 launches per expert. Only when that
               costs no more GPU time than the routed rows would: nearly every resident expert is expected to be
               routed anyway (expected_routed >= n - 1: on average at most one
               expert's weights read in vain) and the expert is still weight-bound at `tokens` rows
               (gpu_time(tokens) <= 1.25 * gpu_time(rows per expert); without a cost model, tokens <= 128).
      'sorted' otherwise (few tokens: at batch 1 only k of E experts run; prefill: FLOP-bound): the routing's
               one small copy, positions grouped on the host, ~5 launches per routed expert.
    gpu_time(tokens) -> seconds of one resident expert (the cost model's), or None."""
    n = len(resident)
    if n == 0 or tokens <= 0:
        return "sorted"
    if grouped:
        return "grouped"
    if expected_routed(score, resident, tokens, k) < n - 1.0:
        return "sorted"
    per = max(1, -(-tokens * k // n))
    if gpu_time is None:
        return "dense" if tokens <= 128 else "sorted"
    return "dense" if gpu_time(tokens) <= 1.25 * gpu_time(per) else "sorted"


# split: None or (expert, rows): FFN rows [0, rows) on the CPU, the rest streamed to the GPU
Plan = namedtuple("Plan", "cpu streamed resident split")


def normalize_decision(decision, experts, ffn, allow_split=True, granule=GRANULE) -> Plan:
    """Check a cost-model decision against the routed experts [(id, tokens, resident)] and make it executable:
    every routed expert placed exactly once, 'resident' only for experts on the GPU; a resident expert asked to
    stream is computed in place, a split of 0 rows streams and one of all rows runs on the CPU."""
    on_gpu = {int(e): bool(r) for e, _, r in experts}
    cpu, streamed, resident = ([int(e) for e in getattr(decision, f)] for f in ("cpu", "streamed", "resident"))
    split = getattr(decision, "split", None)
    named = cpu + streamed + resident + ([int(split[0])] if split is not None else [])
    dup = sorted({e for e in named if named.count(e) > 1})
    missing, extra = sorted(set(on_gpu) - set(named)), sorted(set(named) - set(on_gpu))
    if dup or missing or extra:
        raise ValueError("cost-model decision must place each routed expert once: duplicated %s, missing %s, "
                         "not routed %s" % (dup, missing, extra))
    bad = [e for e in resident if not on_gpu[e]]
    if bad:
        raise ValueError("cost-model decision computes experts %s as resident, but they are not on the GPU" % bad)
    resident += [e for e in streamed if on_gpu[e]]
    streamed = [e for e in streamed if not on_gpu[e]]
    sp = None
    if split is not None:
        e, rows = int(split[0]), split_rows(ffn, float(split[1]), granule)
        if not allow_split:
            raise ValueError("cost-model decision splits expert %d, but splitting is off for this layer" % e)
        if on_gpu[e]:
            resident.append(e)
        elif rows == 0:
            streamed.append(e)
        elif rows == ffn:
            cpu.append(e)
        else:
            sp = (e, rows)
    return Plan(cpu, streamed, resident, sp)


def takes_keyword(fn, name: str) -> bool:
    """Whether fn accepts the keyword `name` (a user's scheduler may predate one the runtime hands in)."""
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
