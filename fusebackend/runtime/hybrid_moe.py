"""Hybrid CPU/GPU execution of one MoE layer's routed experts (DESIGN.md, "Placement").

Per call: one small device->host copy of the routing gives the token counts; the cost model's schedule_experts
splits the non-resident experts between the CPU worker thread and the copy stream (one maybe by FFN rows); the
GPU runs resident and streamed experts meanwhile; outputs are index_add'ed in float32 on the GPU and cast once
(eager's k-term sum, rounded once). Pure parts are functions here, tested without CUDA; CUDA goes through CudaApi.

Positions are grouped by expert on the host from that copy (host_order) and sent back in one tiny copy; each
expert's weighted output fills its rows of one buffer, summed per token by a single index_add. A layer whose
experts are all resident has nothing to schedule: fast_path_mode picks a sync-free dense loop (every expert over
all rows, where nearly all are routed anyway) or the sorted loop without the scheduler. Scheduled calls feed a
CostCorrection (measured / predicted per side: CPU worker, link, GPU) that corrects the profile of the next
calls. Prefetch is offered only for experts likely enough to be routed (likely()).
"""
from __future__ import annotations

import math
import time
from collections import namedtuple
from itertools import accumulate

import torch

from .cpu_worker import (CudaApi, PinnedRows, StagingPool, StreamPipe, default_worker, expert_ffn, expert_layout,
                         run_cpu_job)

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


def expected_routed(score, experts, tokens, k):
    """Expected number of `experts` routed at least once in a call of `tokens` tokens (uniform shares while the
    score has seen nothing)."""
    experts = list(experts)
    if not experts:
        return 0.0
    total = sum(score[e] for e in experts)
    shares = [score[e] for e in experts] if total > 0 else [1.0 / len(score)] * len(experts)
    return sum(routed_probability(s, tokens, k) for s in shares)


def fast_path_mode(tokens, k, score, resident, gpu_time=None):
    """How a call whose experts are all resident runs -- no scheduler, no CPU, no link -- (pure):
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
    if expected_routed(score, resident, tokens, k) < n - 1.0:
        return "sorted"
    per = max(1, -(-tokens * k // n))
    if gpu_time is None:
        return "dense" if tokens <= 128 else "sorted"
    return "dense" if gpu_time(tokens) <= 1.25 * gpu_time(per) else "sorted"


class CostCorrection:
    """Online correction of the cost model from what the layer measures, per side:
      cpu   the worker's compute wall time of a call vs the schedule's CPU side (contention included)
      link  the copy stream's timing events of the call's own fills vs the schedule's link side
      gpu   the compute stream's events around the resident experts vs the model's time for them
    Each side keeps a factor f (measured / model), an EWMA in log space of the factor each observation implies:
    log f <- (1 - alpha) log f + alpha log(f_used * measured / predicted), f_used the factor the prediction was
    made with (link and GPU observations arrive a call or more late). Bounded: one observation's ratio is
    clipped to [1/clip, clip], f to [lo, hi]; predictions under min_pred_s (launch-dominated) are ignored.
    apply(profile) scales the profile's rates of each side by 1/f (CPU GEMV/GEMM rates and dispatch; h2d_bw; GPU
    bandwidth, matmul rate and launch), so any scheduler that reads the profile -- and the DRAM-contention model
    with it -- sees the measured machine. Factors are quantized (steps of 2**(1/32), ~2%) so the corrected
    profiles, and the cost model's per-profile caches, stay few. Share one object between the layers of a model:
    they run on the same CPU and link."""

    SIDES = ("cpu", "link", "gpu")
    MIN_PRED_S = {"cpu": 2e-4, "link": 2e-4, "gpu": 5e-5}

    def __init__(self, alpha=0.3, lo=0.25, hi=8.0, clip=3.0, min_pred_s=None, step=1.0 / 32):
        if not 0.0 < alpha <= 1.0 or not 0.0 < lo <= 1.0 <= hi or clip < 1.0:
            raise ValueError("CostCorrection: need 0 < alpha <= 1, 0 < lo <= 1 <= hi, clip >= 1")
        self.alpha, self.lo, self.hi, self.clip, self.step = alpha, lo, hi, clip, step
        self.min_pred_s = dict(self.MIN_PRED_S, **(min_pred_s or {}))
        self.factor = dict.fromkeys(self.SIDES, 1.0)
        self.observations = dict.fromkeys(self.SIDES, 0)
        self._profiles = {}

    def observe(self, side, measured_s, predicted_s, used=None):
        """One measurement of `side`; `used`: the factor the prediction was made with (default: the current
        one). Returns whether it counted."""
        if side not in self.factor:
            raise ValueError("CostCorrection: side must be one of %s, got %r" % (self.SIDES, side))
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (measured_s, predicted_s))
        if not ok or measured_s <= 0 or predicted_s < self.min_pred_s[side]:
            return False
        r = min(self.clip, max(1.0 / self.clip, measured_s / predicted_s))
        used = self.factor[side] if used is None else used
        log_f = (1 - self.alpha) * math.log(self.factor[side]) + self.alpha * math.log(used * r)
        self.factor[side] = min(self.hi, max(self.lo, math.exp(log_f)))
        self.observations[side] += 1
        return True

    def quantized(self):
        q = lambda f: 2.0 ** (round(math.log2(f) / self.step) * self.step)     # noqa: E731
        return tuple(q(self.factor[s]) for s in self.SIDES)

    def apply(self, profile):
        """The profile with each side's rates divided by its (quantized) factor; the profile itself at 1."""
        fc, fl, fg = key = self.quantized()
        if key == (1.0, 1.0, 1.0) or profile is None:
            return profile
        got = self._profiles.get((id(profile), key))
        if got is not None and got[0] is profile:
            return got[1]
        tab = lambda t, f: {d: v / f for d, v in t.items()}                      # noqa: E731
        out = profile.replace(
            name=profile.name + " (corrected cpu x%.2f link x%.2f gpu x%.2f)" % key,
            cpu_gemv_bw=tab(profile.cpu_gemv_bw, fc), cpu_gemm_flops=tab(profile.cpu_gemm_flops, fc),
            cpu_dispatch_s=profile.cpu_dispatch_s * fc, h2d_bw=profile.h2d_bw / fl,
            gpu_mem_bw=profile.gpu_mem_bw / fg, gpu_matmul_flops=tab(profile.gpu_matmul_flops, fg),
            gpu_launch_s=profile.gpu_launch_s * fg)
        if len(self._profiles) >= 64:
            self._profiles.clear()
        self._profiles[id(profile), key] = (profile, out)
        return out

    def summary(self):
        return {s: round(self.factor[s], 3) for s in self.SIDES} | {
            "n_" + s: self.observations[s] for s in self.SIDES}


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


class HybridMoELayer:
    """One MoE layer's routed SwiGLU experts, some resident on the GPU, the rest homed in pinned host memory.

    experts: [(gate [F, H], up [F, H], down [H, F])] per expert (or `from_3d` for HF's gate_up_proj/down_proj).
    Host tensors are pinned in place (cudaHostRegister; a pinned copy only if that fails), shared storages once.
    scheduler(profile, experts, hidden, ffn, dtype, allow_split) -> decision; default: the cost model's.
    staging: a StagingPool to share between layers (else `staging_slots` experts of this layer's own).
    learn / correction: correct the cost model online from the call's own measurements (CostCorrection; pass
    one object to every layer of a model to share it); the scheduler gets the corrected profile.
    prefetch_min_prob: likely() offers an expert for prefetch only if it is at least this likely to be routed
    in a call of the last call's token count: a prefetch that misses holds the FIFO copy stream for a whole
    expert (6.4 ms on the H200) in front of the next layer's own transfers.
    """

    def __init__(self, experts, *, resident=(), capacity=None, profile=None, scheduler=None, device=None,
                 staging=None, staging_slots=2, allow_split=True, max_swaps=1, decay=0.9, margin=0.02,
                 rebalance_every=0, trace=False, trace_cap=1024, worker=None, api=None, learn=True,
                 correction=None, prefetch_min_prob=0.5):
        self.api = api if api is not None else CudaApi(device)
        if scheduler is None:
            if profile is None:
                raise ValueError("HybridMoELayer: the cost-model scheduler needs profile= (a HardwareProfile)")
            from ..passes.cost_schedule import schedule_experts as scheduler    # the cost model's, per step
        self.scheduler, self.profile = scheduler, profile
        experts = [tuple(w) for w in experts]
        if not experts or any(len(w) != 3 for w in experts):
            raise ValueError("HybridMoELayer: experts must be a non-empty list of (gate, up, down)")
        (self.ffn, self.hidden), self.dtype, self.num_experts = experts[0][0].shape, experts[0][0].dtype, len(experts)
        want = ((self.ffn, self.hidden), (self.ffn, self.hidden), (self.hidden, self.ffn))
        for i, w in enumerate(experts):
            if tuple(tuple(t.shape) for t in w) != want or any(t.dtype != self.dtype for t in w):
                raise ValueError("expert %d: want gate, up, down of shapes %s and dtype %s; got %s" % (
                    i, want, self.dtype, [(tuple(t.shape), t.dtype) for t in w]))
        self._homes = []                 # the tensors handed to the pin registry, released by close()
        self.host = [tuple(self._home(t) for t in w) for w in experts]
        self.pool = staging if staging is not None else (
            StagingPool(self.api, self.hidden, self.ffn, self.dtype, staging_slots) if staging_slots else None)
        shape = (self.hidden, self.ffn, self.dtype)
        if self.pool is not None and (self.pool.hidden, self.pool.ffn, self.pool.dtype) != shape:
            raise ValueError("staging pool is for (H, F, dtype) %s, the experts are %s" % (
                (self.pool.hidden, self.pool.ffn, self.pool.dtype), shape))
        self.copy_stream = self.pool.stream if self.pool is not None else self.api.new_stream()
        self.allow_split = bool(allow_split and self.pool is not None and self.api.can_copy2d())
        self.worker = worker if worker is not None else default_worker()
        self._route, self._y_free = {}, None
        self._xbuf, self._ybuf = (PinnedRows(self.api, (self.hidden,), self.dtype) for _ in range(2))
        self._ordbuf = PinnedRows(self.api, (), torch.int64)
        self.correction = correction if correction is not None else CostCorrection() if learn else None
        self.prefetch_min_prob, self._last_tokens, self._last_k, self._learn_pending = prefetch_min_prob, 0, 1, []
        self._arange = None
        self.score = [0.0] * self.num_experts
        self.decay, self.margin, self.max_swaps, self.rebalance_every = decay, margin, max_swaps, rebalance_every
        self.gpu, self._loading, self.calls, self.swaps = {}, {}, 0, 0
        self.capacity = len(set(resident)) if capacity is None else capacity
        self.set_resident(list(resident), max_swaps=self.num_experts)
        self.swaps = 0                   # the initial load is not a swap
        self.tracing, self.trace_cap, self.trace, self._pending, self._prefetch_ev = trace, trace_cap, [], [], []
        if (trace or self.correction is not None) and self.pool is not None:
            self.pool.timing = True      # the copy stream's fills are timed: the link's measurements

    @classmethod
    def from_3d(cls, gate_up_proj, down_proj, **kw):
        """HF 5.x layout: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]; views, no copies."""
        f, gu, dn = gate_up_proj.shape[1] // 2, gate_up_proj.detach(), down_proj.detach()
        return cls([(gu[e, :f], gu[e, f:], dn[e]) for e in range(gu.shape[0])], **kw)

    def _home(self, t):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")              # a device tensor gets the one host copy
        if not t.is_contiguous():
            t = t.contiguous()           # row blocks must be contiguous to stream in one copy
        self._homes.append(t)
        return self.api.pin(t)

    def _key(self, e):
        return self.host[e][0].data_ptr()    # the weights' identity: layers sharing experts share staged copies

    # ------------------------------------------------------------------ residency, popularity, prefetch
    def set_resident(self, expert_ids, max_swaps=None):
        """Move the resident set toward expert_ids (priority order): at most max_swaps loads (default the
        layer's), evicting least popular first; loads ride the copy stream. Returns (loaded, evicted)."""
        load, evict = plan_swaps(sorted(self.gpu), list(expert_ids), self.capacity,
                                 self.max_swaps if max_swaps is None else max_swaps, self.score)
        for e in evict:
            del self.gpu[e]
            self._loading.pop(e, None)
        main, s = self.api.current_stream(), self.copy_stream
        for e in load:
            buf = self.api.empty((3 * self.ffn * self.hidden,), self.dtype)
            with self.api.stream(s):
                s.wait_stream(main)      # the block may be memory the compute stream freed and still reads
                for dst, src in zip(expert_layout(buf, self.ffn, self.hidden), self.host[e]):
                    dst.copy_(src, non_blocking=True)
                ev = self.api.event()
                ev.record(s)
            self.api.record_stream(buf, s)
            self.gpu[e], self._loading[e] = buf, ev
        self.swaps += len(load)
        return load, evict

    def propose_resident(self):
        return propose_resident(self.score, sorted(self.gpu), self.capacity, self.margin)

    def rebalance(self):
        return self.set_resident(self.propose_resident())

    def likely(self, n, tokens=None, min_prob=None):
        """What to prefetch: up to n most popular non-resident experts, each at least min_prob (default the
        layer's prefetch_min_prob) likely to be routed in a call of `tokens` tokens (default: the last call's).
        At batch 1 a Zipf layer's best outsider is routed ~1 call in 4: a prefetch then mostly delays the link."""
        tokens = self._last_tokens if tokens is None else tokens
        min_prob = self.prefetch_min_prob if min_prob is None else min_prob
        out = sorted((e for e in range(self.num_experts) if e not in self.gpu), key=lambda e: (-self.score[e], e))
        return [e for e in out if routed_probability(self.score[e], tokens, self._last_k) >= min_prob][:n]

    def prefetch(self, expert_ids):
        """Start copying these experts (most likely first) into the staging slots on the copy stream, e.g. while
        the previous layer's attention runs; the next call finds them staged. Returns the ids staged."""
        got, protect = [], set()
        for e in expert_ids:
            if self.pool is None or len(protect) == len(self.pool.bufs):
                break
            if e not in self.gpu:
                s, _, tev = self.pool.stage(self._key(e), self.host[e], 0, self.ffn, protect)
                protect.add(s)
                got.append(e)
                self._prefetch_ev += [tev] if tev else []
        return got

    def gpu_bytes(self, include_staging=True):
        """Device bytes this layer holds: resident experts, plus the staging pool (shared pools count fully)."""
        res = sum(b.numel() * b.element_size() for b in self.gpu.values())
        return res + (self.pool.nbytes() if include_staging and self.pool is not None else 0)

    def close(self):
        self.gpu.clear()
        for t in self._homes:
            self.api.unpin(t)
        self._homes = []

    # ------------------------------------------------------------------ the call
    def all_resident(self):
        """Every expert of the layer is on the GPU: no call of it has anything to schedule."""
        return len(self.gpu) == self.num_experts

    def _terms(self, profile):
        if profile is None:
            return None
        from ..passes.cost_model import expert_terms
        return expert_terms(profile, self.hidden, self.ffn, self.dtype)

    def _wait_loading(self, main, experts):
        for e in experts:
            if e in self._loading:
                main.wait_event(self._loading.pop(e))

    def forward(self, hidden, idx, weights, after_issue=None):
        """hidden [T, H], idx / weights [T, k] on the GPU -> [T, H] (hidden's dtype). after_issue() runs once the
        GPU work is queued and before waiting for the CPU: a place to prefetch the next layer's experts."""
        api, E, Fn, H, pool = self.api, self.num_experts, self.ffn, self.hidden, self.pool
        if hidden.dim() != 2 or hidden.shape[1] != H or hidden.dtype != self.dtype:
            raise ValueError("hidden must be [T, %d] %s, got %s %s" % (H, self.dtype, tuple(hidden.shape),
                                                                     hidden.dtype))
        t_host, main, k, T = time.perf_counter(), api.current_stream(), idx.shape[-1], hidden.shape[0]
        self._resolve(block=False)
        self._last_tokens, self._last_k = T, k
        marks = [api.event(True)] if self.tracing else []
        for ev in marks:
            ev.record(main)
        acc_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        terms = self._terms(self.profile)
        if self.all_resident() and fast_path_mode(T, k, self.score, sorted(self.gpu),
                                                  terms and terms.gpu) == "dense":
            out = self._dense(hidden, idx, weights, acc_dtype, main)
            if after_issue is not None:
                after_issue()
            self.calls += 1
            if self.tracing:
                self._record(None, Plan([], [], sorted(self.gpu), None), None, {}, marks[0], main, [],
                             dict(tokens=T, host_s=time.perf_counter() - t_host, cpu_s=0.0, cpu_wait_s=0.0,
                                  mode="dense"), predicted=terms and E * terms.gpu(T))
            return out

        flat = idx.reshape(-1)
        rbuf = self._route.setdefault(flat.dtype, PinnedRows(api, (), flat.dtype)).get(flat.numel())
        rbuf.copy_(flat, non_blocking=True)                 # the one small device->host copy per call
        ev = api.event()
        ev.record(main)
        ev.synchronize()                                     # waits for this event only, not the device
        counts = routing_counts(rbuf, E)
        off, nv = [0, *accumulate(counts)], sum(counts)
        self._observe(counts)
        order, tok_h = host_order(rbuf, E, k)                # grouped on the host: no device argsort
        pk = self._ordbuf.get(2 * nv)
        pk[:nv], pk[nv:] = order[:nv], tok_h[:nv]
        pkd = pk.to(hidden.device, non_blocking=True)        # one tiny host->device copy: positions and tokens
        order, tok = pkd[:nv], pkd[nv:]
        w32 = weights.reshape(-1).index_select(0, order).to(acc_dtype)
        xs = hidden.index_select(0, tok)                     # every routed row, grouped by expert, once
        ybuf = torch.empty((nv, H), dtype=acc_dtype, device=hidden.device)
        staged = {e: pool.book.find(self._key(e), 0, Fn) for e in range(E)
                  if pool is not None and counts[e] and e not in self.gpu}
        staged = {e: s for e, s in staged.items() if s is not None}      # prefetched: no link time left
        experts = [(e, n, e in self.gpu or e in staged) for e, n in enumerate(counts) if n]
        prof, used = self.profile, None
        if all(r for _, _, r in experts):                    # nothing to decide: no scheduler call
            dec, mode = None, "resident"
            plan = Plan([], [], [e for e, _, _ in experts], None)
        else:
            mode = "scheduled"
            if self.correction is not None and prof is not None:
                prof, used = self.correction.apply(prof), dict(self.correction.factor)
            dec = self.scheduler(prof, experts, H, Fn, self.dtype, allow_split=self.allow_split)
            plan = normalize_decision(dec, experts, Fn, self.allow_split)
        split_e = plan.split[0] if plan.split else None

        def run(e, g, u, d):
            return expert_ffn(xs[off[e]:off[e + 1]], g, u, d)

        def combine(e, y):                                   # weighted, in acc_dtype, into the expert's rows
            torch.mul(y, w32[off[e]:off[e + 1], None], out=ybuf[off[e]:off[e + 1]])

        # CPU work first: its activations leave now (one copy), so the worker starts at once.
        cpu_items = [(e, 0, Fn) for e in plan.cpu] + ([(split_e, 0, plan.split[1])] if plan.split else [])
        fut, segs, o = None, [], 0
        if cpu_items:
            parts = [xs[off[e]:off[e + 1]] for e, _, _ in cpu_items]
            n_cpu = sum(p.shape[0] for p in parts)
            xh, yh = self._xbuf.get(n_cpu), self._ybuf.get(n_cpu)
            xh.copy_(parts[0] if len(parts) == 1 else torch.cat(parts), non_blocking=True)
            evx = api.event()
            evx.record(main)
            for e, f0, f1 in cpu_items:
                g, u, d = self.host[e]
                segs.append((g[f0:f1], u[f0:f1], d[:, f0:f1], o, counts[e]))
                o += counts[e]
            fut = self.worker.submit(run_cpu_job, (evx, self._y_free), xh, yh, segs)
        items = [(e, 0, Fn) for e in plan.streamed] + ([(split_e, plan.split[1], Fn)] if plan.split else [])
        if items and pool is None:
            raise RuntimeError("cost-model decision streams experts, but this layer has no staging buffers")
        protect = {staged[e] for e in plan.resident if e in staged}
        pipe = StreamPipe(pool, items, lambda e: (self._key(e), self.host[e]), protect)
        if items:
            pipe.issue()                                     # the link starts before resident compute
        on_gpu = [e for e in plan.resident if e in self.gpu]
        learn_gpu = (used is not None and on_gpu
                     and not any(e in self._loading for e in on_gpu))
        if learn_gpu:
            g0 = api.event(True)
            g0.record(main)
        self._wait_loading(main, on_gpu)
        for e in on_gpu:
            combine(e, run(e, *expert_layout(self.gpu[e], Fn, H)))
        if learn_gpu:                                        # the resident block alone: no link waits in it
            g1 = api.event(True)
            g1.record(main)
            pterms = self._terms(prof)
            self._learn_pending.append(("gpu", g0, g1, sum(pterms.gpu(counts[e]) for e in on_gpu), used["gpu"]))
        for e in plan.resident:
            if e not in self.gpu:
                pool.acquire(staged[e], main)
                combine(e, run(e, *pool.views(staged[e], 0, Fn)))
                pool.release(staged[e], main)
                protect.discard(staged[e])
        partial = []                                         # the split's GPU rows; the CPU's rows come later
        pipe.drain(main, lambda e, f0, f1, g, u, d: (partial.append(run(e, g, u, d)) if e == split_e
                                                     else combine(e, run(e, g, u, d))))
        if used is not None and pipe.timings and getattr(dec, "link_s", None):
            self._learn_pending.append(("link", None, list(pipe.timings), dec.link_s, used["link"]))
        if after_issue is not None:
            after_issue()
        cpu_wait = cpu_s = 0.0
        if fut is not None:
            cpu_wait, cpu_s = fut.result()
            if used is not None and getattr(dec, "cpu_s", None):
                self.correction.observe("cpu", cpu_s, dec.cpu_s, used["cpu"])
            yd = yh.to(hidden.device, non_blocking=True)
            self._y_free = api.event()
            self._y_free.record(main)
            for (e, _, _), (_, _, _, o, n) in zip(cpu_items, segs):
                y = yd[o:o + n]
                combine(e, y.to(acc_dtype) + partial[0] if e == split_e else y)
        acc = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
        if nv:
            acc.index_add_(0, tok, ybuf)                     # the k terms of each token, summed once
        out = acc if acc_dtype == self.dtype else acc.to(self.dtype)
        if self.tracing:
            self._record(dec, plan, counts, staged, marks[0], main, pipe.timings,
                         dict(tokens=T, host_s=time.perf_counter() - t_host, cpu_s=cpu_s, cpu_wait_s=cpu_wait,
                              mode=mode),
                         predicted=None if dec is not None or terms is None else sum(
                             terms.gpu(counts[e]) for e in plan.resident))
        return out

    __call__ = forward

    def _dense(self, hidden, idx, weights, acc_dtype, main):
        """All experts resident, `dense` mode (fast_path_mode): each expert over every row, times its column of
        the [T, E] combine matrix (0 where not routed); nothing leaves the GPU, nothing is waited for."""
        E, Fn, H = self.num_experts, self.ffn, self.hidden
        if self._arange is None or self._arange.device != idx.device:
            self._arange = torch.arange(E, device=idx.device)
        cw = ((idx.unsqueeze(-1) == self._arange) * weights.unsqueeze(-1).to(acc_dtype)).sum(1)   # [T, E]
        self._wait_loading(main, list(self._loading))
        acc = None
        for e in sorted(self.gpu):
            y = expert_ffn(hidden, *expert_layout(self.gpu[e], Fn, H))
            if acc is None:
                acc = y * cw[:, e:e + 1]                     # acc_dtype by promotion
            else:
                acc.addcmul_(y, cw[:, e:e + 1])
        if acc.dtype != acc_dtype:
            acc = acc.to(acc_dtype)
        return acc if acc_dtype == self.dtype else acc.to(self.dtype)

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, counts):
        self.score = update_popularity(self.score, counts, self.decay)
        self.calls += 1
        if self.rebalance_every and self.calls % self.rebalance_every == 0:
            self.rebalance()

    def _record(self, dec, plan, counts, staged, ev0, main, stage_ev, measured, predicted=None):
        """One trace entry. dec None: a call with nothing to decide (mode 'resident' or 'dense'); `predicted` is
        then the cost model's GPU time of its experts."""
        ev1 = self.api.event(True)
        ev1.record(main)
        pred = {k: getattr(dec, a, None) for k, a in (("predicted_s", "predicted_s"), ("pred_cpu_s", "cpu_s"),
                                                      ("pred_link_s", "link_s"), ("pred_gpu_s", "gpu_s"))}
        if dec is None:
            pred.update(predicted_s=predicted, pred_cpu_s=0.0, pred_link_s=0.0, pred_gpu_s=predicted)
        entry = {"call": self.calls, "counts": counts, "cpu": plan.cpu,
                 "streamed": plan.streamed, "resident": plan.resident, "prefetched": sorted(staged),
                 "split": None if plan.split is None else (plan.split[0], plan.split[1] / self.ffn),
                 **pred, **measured, "link_s": None, "prefetch_link_s": None, "total_s": None,
                 "correction": None if self.correction is None else self.correction.summary()}
        self._pending.append((entry, ev0, ev1, stage_ev, self._prefetch_ev))
        self._prefetch_ev = []
        self.trace.append(entry)
        del self.trace[:max(0, len(self.trace) - self.trace_cap)]

    def _resolve(self, block):
        """Fill in the GPU times of traced calls whose events completed (all of them when block): total_s from
        the call's start to its output on the compute stream, link_s the copy stream's fills for it."""
        keep, el = [], lambda a, b: a.elapsed_time(b) / 1e3     # noqa: E731
        todo = []
        for p in self._learn_pending:                        # measurements for the cost correction
            side, a, b, predicted, used = p
            evs = [b] if side == "gpu" else [e for _, e in b]
            if not block and not all(ev.query() for ev in evs):
                todo.append(p)
                continue
            for ev in evs:
                ev.synchronize()
            measured = el(a, b) if side == "gpu" else sum(el(x, y) for x, y in b)
            self.correction.observe(side, measured, predicted, used)
        self._learn_pending = todo
        for p in self._pending:
            entry, ev0, ev1, stage_ev, pre_ev = p
            if not block and not (ev1.query() and all(b.query() for _, b in pre_ev)):
                keep.append(p)
                continue
            for ev in [ev1] + [b for _, b in stage_ev + pre_ev]:
                ev.synchronize()
            entry.update(total_s=el(ev0, ev1), link_s=sum(el(a, b) for a, b in stage_ev),
                         prefetch_link_s=sum(el(a, b) for a, b in pre_ev))
        self._pending = keep

    def collect_trace(self):
        """The trace with every measured time filled in (waits for the traced calls' events)."""
        self._resolve(block=True)
        return self.trace
