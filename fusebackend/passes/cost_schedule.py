"""Per-step expert schedule: after the router, which non-resident experts run on the CPU and which are streamed
over the link so the layer ends soonest; one dominant expert may be split by rows between the two.

Runs every decode step of every MoE layer, so it is plain arithmetic over precomputed costs. The layer-time
model (`_layer_time`):
  CPU side   sum of the CPU experts' times (one worker that uses every CPU thread, one expert after another)
  link side  sum of the streamed transfers, in order of decreasing tokens
  GPU side   resident experts first (while the first transfer is in flight), each streamed expert as soon as its
             weights land: max(all GPU compute, link end + the last, smallest, streamed expert's compute)
  backlog    copies already queued on the link (a prefetch for this layer, a swap-in) run first: the copy stream
             is FIFO, so this step's transfers start only after them (`link_busy_s`); prefetched experts count
             as resident, but the GPU waits for them too
  CPU and link share host DRAM (cost_model.overlap_time); the layer takes max(CPU side, GPU side).
"""
from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass
from typing import Optional

from .cost_model import ROW_GRAIN, expert_terms, overlap_time
from .hardware_profile import HardwareProfile

EXHAUSTIVE_MAX = 10     # up to this many non-resident experts the search over whole-expert splits is exact


@dataclass
class ExpertSchedule:
    cpu: list            # expert ids computed on the CPU, in order
    streamed: list       # expert ids streamed over the link, in transfer order (most tokens first)
    resident: list       # resident expert ids that have tokens (they run on the GPU)
    split: Optional[tuple]  # (expert_id, cpu_row_fraction) or None; that expert is in neither list above
    predicted_s: float   # the layer-step: max(cpu_s, GPU side)
    cpu_s: float         # CPU side, contention included
    link_s: float        # this step's own transfers, contention included (the backlog before them excluded)
    gpu_s: float         # GPU compute (resident + streamed experts), excluding waits for the link


def _layer_time(profile, cpu_s, cpu_bytes, link_s, link_bytes, gpu_s, tail_s, cpu_fixed_s=0.0):
    c, l = overlap_time(cpu_bytes, cpu_s, link_bytes, link_s, profile)
    if cpu_s > 0:
        c += cpu_fixed_s         # outside the compute: it reads no weights, so it does not contend for DRAM
    gpu_end = max(gpu_s, l + tail_s) if link_s > 0 else gpu_s
    return max(c, gpu_end), c, l


class _Costs:
    """Per-expert costs for one step (every non-resident expert has the same shape: same bytes, same transfer)."""

    def __init__(self, profile, far, terms, busy_s=0.0, cpu_fixed_s=0.0):
        self.profile, self.terms, self.cpu_fixed = profile, terms, cpu_fixed_s
        self.busy, self.busy_b = busy_s, busy_s / terms.link_per_byte      # the backlog and the bytes it moves
        self.ids = [e for e, _ in far]
        self.tokens = [t for _, t in far]
        self.c = [terms.cpu(t) for t in self.tokens]
        self.g = [terms.gpu(t) for t in self.tokens]
        self.c_all = sum(self.c)
        self.l, self.b = terms.transfer(), terms.weight_bytes

    def evaluate(self, streamed, gpu_res, extra=None):
        """Layer time with the experts at indices `streamed` on the link and the rest on the CPU.
        extra: (cpu_s, cpu_bytes, link_s, link_bytes, gpu_s) added for a split expert's two parts."""
        c, g = self.c, self.g
        cpu, gpu, tail = self.c_all, gpu_res, float("inf")
        for i in streamed:
            cpu -= c[i]
            gpu += g[i]
            tail = min(tail, g[i])
        return self.time_of(len(streamed), cpu, gpu, tail, extra)

    def time_of(self, k, cpu, gpu, tail, extra=None):
        """Layer time from the aggregates: k streamed, CPU sum, GPU compute sum, least streamed compute."""
        link, cpu_b, link_b = self.busy + k * self.l, (len(self.c) - k) * self.b, self.busy_b + k * self.b
        if extra is not None:
            cpu, cpu_b, link, link_b = cpu + extra[0], cpu_b + extra[1], link + extra[2], link_b + extra[3]
            gpu, tail = gpu + extra[4], min(tail, extra[4])
        return _layer_time(self.profile, cpu, cpu_b, link, link_b, gpu, tail if tail < float("inf") else 0.0,
                           self.cpu_fixed)


def _best_whole(costs: _Costs, gpu_res: float):
    """Best set of streamed indices. All non-resident experts cost the same on the link, so for k streamed the
    subset matters only through the CPU sum (and the small GPU compute of the streamed ones). Per k:
      - the k dearest on the CPU streamed ("prefix", least CPU sum) is optimal if the CPU side decides there:
        the CPU side only grows with the CPU sum;
      - the k cheapest streamed ("suffix", largest CPU sum) is optimal if the GPU side decides there: a CPU side
        that takes longer for the same bytes draws less DRAM, so the link only gets faster with the CPU sum;
      - otherwise the best subset sits between: a lower bound prunes k, else all subsets of size k are tried
        (exact up to EXHAUSTIVE_MAX experts; above, the prefix improved by swaps).
    The shortcuts hold when neither side alone wants more than shared_dram_bw (checked; else enumerate)."""
    n, p = len(costs.c), costs.profile
    order = sorted(range(n), key=lambda i: (-costs.c[i], i))
    g_sorted, c_sorted, shared = sorted(costs.g), sorted(costs.c), p.shared_dram_bw
    # running sums: c_lo[j] / g_lo[j] = the j cheapest experts' CPU / GPU times (order by tokens = by either)
    c_lo, g_lo = list(itertools.accumulate(c_sorted, initial=0.0)), list(itertools.accumulate(g_sorted, initial=0.0))
    inf = float("inf")
    best_t, best_set, todo = inf, (), []
    for k in range(n + 1):
        cpu_min, cpu_max = c_lo[n - k], c_lo[n] - c_lo[k]
        t_pre, c_pre, _ = costs.time_of(k, cpu_min, gpu_res + g_lo[n] - g_lo[n - k], g_sorted[n - k] if k else inf)
        if t_pre < best_t:
            best_t, best_set = t_pre, k
        if k in (0, n):
            continue
        cpu_b, link_b, link = (n - k) * costs.b, costs.busy_b + k * costs.b, costs.busy + k * costs.l
        cpu_monotone, link_monotone = cpu_b / cpu_min <= shared, link_b / link <= shared
        if c_pre >= t_pre and cpu_monotone:
            continue
        t_suf, c_suf, _ = costs.time_of(k, cpu_max, gpu_res + g_lo[k], g_sorted[0])
        if t_suf < best_t:
            best_t, best_set = t_suf, -k
        if c_suf < t_suf and link_monotone:
            continue
        # bound over all subsets of size k: CPU side at the least CPU sum, link at the largest, least GPU compute
        lb_cpu = (overlap_time(cpu_b, cpu_min, link_b, link, p)[0] if cpu_monotone else cpu_min) + costs.cpu_fixed
        lb_link = overlap_time(cpu_b, cpu_max, link_b, link, p)[1] if link_monotone else link
        todo.append((max(lb_cpu, lb_link + g_sorted[0], gpu_res + g_lo[k]), k, cpu_monotone and link_monotone))
    # best_set so far is a count: k for the prefix of k, -k for the suffix of k
    best_set = tuple(order[:best_set]) if best_set >= 0 else tuple(order[n + best_set:])
    todo.sort()
    if n > EXHAUSTIVE_MAX:      # local search from the two most promising counts' prefixes
        for lower, k, _ in todo[:2]:
            if lower < best_t:
                best_t, best_set = _improve_by_swaps(costs, gpu_res, order[:k], best_t, best_set)
        return best_t, best_set
    for lower, k, monotone in todo:
        if lower >= best_t:
            break
        if monotone:
            best_t, best_set = _walk_from_crossing(costs, gpu_res, k, gpu_res + g_lo[k], g_sorted[0], best_t,
                                                   best_set)
        else:
            for s in itertools.combinations(range(n), k):
                t = costs.evaluate(s, gpu_res)[0]
                if t < best_t:
                    best_t, best_set = t, s
    return best_t, best_set


def _walk_from_crossing(costs, gpu_res, k, gpu_lb, tail_lb, best_t, best_set):
    """All subsets of size k, exactly, evaluating few: sorted by CPU sum, each is bounded below by its CPU side
    (growing with the sum) and by its GPU side with the least GPU compute (shrinking with the sum). Start where
    the two bounds cross and walk outwards; each direction stops once its bound reaches the best time."""
    n, c, p = len(costs.c), costs.c, costs.profile
    cpu_b, link_b, link = (n - k) * costs.b, costs.busy_b + k * costs.b, costs.busy + k * costs.l
    subsets = list(itertools.combinations(range(n), k))       # same order as combinations of the costs
    sums = sorted(zip([costs.c_all - sum(t) for t in itertools.combinations(c, k)], itertools.count()))

    def bounds(j):
        a, l = overlap_time(cpu_b, sums[j][0], link_b, link, p)
        return a + (costs.cpu_fixed if sums[j][0] > 0 else 0.0), max(l + tail_lb, gpu_lb)
    lo, hi = 0, len(sums)
    while lo < hi:                       # first subset whose CPU bound reaches its GPU bound
        mid = (lo + hi) // 2
        a, g = bounds(mid)
        if a >= g:
            hi = mid
        else:
            lo = mid + 1
    for j in range(lo, len(sums)):       # larger CPU sums: the CPU bound only grows
        if bounds(j)[0] >= best_t:
            break
        t = costs.evaluate(subsets[sums[j][1]], gpu_res)[0]
        if t < best_t:
            best_t, best_set = t, subsets[sums[j][1]]
    for j in range(lo - 1, -1, -1):      # smaller CPU sums: the GPU bound only grows
        if bounds(j)[1] >= best_t:
            break
        t = costs.evaluate(subsets[sums[j][1]], gpu_res)[0]
        if t < best_t:
            best_t, best_set = t, subsets[sums[j][1]]
    return best_t, best_set


def _improve_by_swaps(costs, gpu_res, start, best_t, best_set, near=8, rounds=3):
    """Many experts: swap a streamed expert for a CPU one while that helps, trying only the `near` of each side
    closest to the boundary (cheapest streamed, dearest on the CPU): a swap changes the CPU sum by their
    difference, and the best sum is near the prefix's. Bounded, and O(1) per trial: this runs every step."""
    c, g = costs.c, costs.g
    cur = set(start)
    cpu = costs.c_all - sum(c[i] for i in cur)
    gpu = gpu_res + sum(g[i] for i in cur)
    tails = sorted(g[i] for i in cur)
    cur_t = costs.time_of(len(cur), cpu, gpu, tails[0] if tails else float("inf"))[0]
    for _ in range(rounds):
        on_link = sorted(cur, key=lambda a: c[a])[:near]
        on_cpu = sorted(set(range(len(c))) - cur, key=lambda b: -c[b])[:near]
        move = None
        for a, b in itertools.product(on_link, on_cpu):
            # the least streamed compute once a leaves: the old least, unless a was it
            rest = tails[0] if g[a] != tails[0] else tails[1] if len(tails) > 1 else float("inf")
            t = costs.time_of(len(cur), cpu + c[a] - c[b], gpu - g[a] + g[b], min(rest, g[b]))[0]
            if t < cur_t:
                cur_t, move = t, (a, b)
        if move is None:
            break
        a, b = move
        cur.remove(a)
        cur.add(b)
        cpu, gpu = cpu + c[a] - c[b], gpu - g[a] + g[b]
        tails = sorted(g[i] for i in cur)
    if cur_t < best_t:
        return cur_t, tuple(sorted(cur))
    return best_t, best_set


def _best_split(costs: _Costs, gpu_res: float, streamed: tuple, i: int):
    """Split expert i by rows, the others as in `streamed`: the CPU row fraction (a multiple of 1/ROW_GRAIN) at
    which the CPU side and the GPU side finish together, nearest that; returns (layer time, fraction)."""
    others = tuple(j for j in streamed if j != i)
    m, tokens, parts = costs.terms, costs.tokens[i], {}

    def at(k):                                    # k/ROW_GRAIN of the rows on the CPU
        if k not in parts:
            f = k / ROW_GRAIN
            # evaluate() counts expert i whole on the CPU (it is not in `others`): swap in its CPU part
            extra = (m.cpu(tokens, f) - costs.c[i], (f - 1) * costs.b, m.transfer(1 - f), (1 - f) * costs.b,
                     m.gpu(tokens, 1 - f))
            parts[k] = costs.evaluate(others, gpu_res, extra)
        return parts[k]
    lo, hi = 1, ROW_GRAIN - 1                     # find the first k where the CPU side is the later one
    while lo < hi:
        mid = (lo + hi) // 2
        t, c, _ = at(mid)
        if c >= t:
            hi = mid
        else:
            lo = mid + 1
    cands = [k for k in (lo - 1, lo, lo + 1) if 1 <= k < ROW_GRAIN]
    k = min(cands, key=lambda k: at(k)[0])
    return at(k)[0], k / ROW_GRAIN


def schedule_experts(profile: HardwareProfile, experts, hidden: int, ffn: int, dtype, allow_split: bool = True,
                     n_mats: int = 3, link: bool = True, link_busy_s: float = 0.0,
                     cpu_fixed_s: float = 0.0) -> ExpertSchedule:
    """experts: (expert_id, tokens, resident) for one MoE layer-step. Resident experts run on the GPU; each
    non-resident expert with tokens goes to the CPU or over the link, minimising the predicted layer time.
    allow_split: also try splitting one expert's FFN rows between the CPU and the link (the largest CPU expert
    when the CPU side decides, the smallest streamed one when the GPU side does); kept only when it wins.
    link=False: a layer with no staging buffer -- every non-resident expert runs on the CPU.
    link_busy_s: how long the copy stream is still busy with copies queued before this step (the runtime's
    estimate); this step's transfers queue behind them.
    cpu_fixed_s: what a call with CPU work pays beyond that work (the worker's wake-up, its waits for the
    activations' copies; runtime/cost_correction.py learns it), added to the CPU side when it has work."""
    for name, v in (("link_busy_s", link_busy_s), ("cpu_fixed_s", cpu_fixed_s)):
        if not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError("schedule_experts: %s must be a number >= 0 (seconds), got %r" % (name, v))
    seen, res, far = set(), [], []
    for e, t, r in experts:
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0:
            raise ValueError("schedule_experts: expert %r has token count %r (need an int >= 0)" % (e, t))
        if e in seen:
            raise ValueError("schedule_experts: expert %r listed twice" % (e,))
        seen.add(e)
        if t > 0:
            (res if r else far).append((e, int(t)))
    terms = expert_terms(profile, hidden, ffn, dtype, n_mats)
    gpu_res = sum(terms.gpu(t) for _, t in res)
    costs = _Costs(profile, far, terms, float(link_busy_s), float(cpu_fixed_s))
    best_t, streamed = _best_whole(costs, gpu_res) if link else (None, ())
    split = None
    if allow_split and link and far:
        cpu_idx = [i for i in range(len(far)) if i not in streamed]
        cands = set()
        t, c, _ = costs.evaluate(streamed, gpu_res)
        if cpu_idx and c >= t:                    # CPU side decides: move rows of its dearest expert to the link
            cands.add(max(cpu_idx, key=lambda i: costs.c[i]))
        if streamed and c < t:                    # GPU side decides: move rows of its cheapest expert to the CPU
            cands.add(min(streamed, key=lambda i: costs.c[i]))
        for i in sorted(cands):
            found = _best_split(costs, gpu_res, streamed, i)
            if found[0] < best_t:
                best_t, split = found[0], (i, found[1])
    return _finish(costs, gpu_res, streamed, split, res)


def _finish(costs, gpu_res, streamed, split, res) -> ExpertSchedule:
    """Fill in the schedule's lists and its per-side times (recomputed from the parts, so they are consistent)."""
    p = costs.profile
    si = split[0] if split else None
    on_link = sorted((i for i in streamed if i != si), key=lambda i: (-costs.tokens[i], i))
    on_cpu = sorted((i for i in range(len(costs.c)) if i not in streamed and i != si),
                    key=lambda i: (-costs.tokens[i], i))
    cpu = sum(costs.c[i] for i in on_cpu)
    g = [costs.g[i] for i in on_link]
    link, gpu = costs.busy + len(on_link) * costs.l, gpu_res + sum(g)
    cpu_b, link_b, tail = len(on_cpu) * costs.b, costs.busy_b + len(on_link) * costs.b, min(g) if g else 0.0
    if split:
        m, t, f = costs.terms, costs.tokens[si], split[1]
        cpu, cpu_b, link, link_b = cpu + m.cpu(t, f), cpu_b + f * costs.b, link + m.transfer(1 - f), \
            link_b + (1 - f) * costs.b
        gpu, tail = gpu + m.gpu(t, 1 - f), min(tail, m.gpu(t, 1 - f)) if g else m.gpu(t, 1 - f)
    t, c, l = _layer_time(p, cpu, cpu_b, link, link_b, gpu, tail, costs.cpu_fixed)
    return ExpertSchedule(cpu=[costs.ids[i] for i in on_cpu], streamed=[costs.ids[i] for i in on_link],
                          resident=[e for e, _ in res], split=(costs.ids[si], split[1]) if split else None,
                          predicted_s=t, cpu_s=c, link_s=max(l - costs.busy, 0.0) if on_link or split else 0.0,
                          gpu_s=gpu)
