"""Hybrid CPU/GPU execution of one MoE layer's routed experts (DESIGN.md, "Placement").

Per call: one small device->host copy of the routing gives the token counts; the cost model's schedule_experts
splits the non-resident experts between the CPU worker thread and the copy stream (one maybe by FFN rows); the
GPU runs resident and streamed experts meanwhile; outputs are index_add'ed in float32 on the GPU and cast once
(eager's k-term sum, rounded once). Pure parts are functions here, tested without CUDA; CUDA goes through CudaApi.
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
    """Flat positions (token * k + slot) grouped by expert id, ascending within an expert (a stable sort), on
    idx's device: with the host's counts, expert e's positions are one slice, no index list crosses the link."""
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
    """

    def __init__(self, experts, *, resident=(), capacity=None, profile=None, scheduler=None, device=None,
                 staging=None, staging_slots=2, allow_split=True, max_swaps=1, decay=0.9, margin=0.02,
                 rebalance_every=0, trace=False, trace_cap=1024, worker=None, api=None):
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
        self.score = [0.0] * self.num_experts
        self.decay, self.margin, self.max_swaps, self.rebalance_every = decay, margin, max_swaps, rebalance_every
        self.gpu, self._loading, self.calls, self.swaps = {}, {}, 0, 0
        self.capacity = len(set(resident)) if capacity is None else capacity
        self.set_resident(list(resident), max_swaps=self.num_experts)
        self.swaps = 0                   # the initial load is not a swap
        self.tracing, self.trace_cap, self.trace, self._pending, self._prefetch_ev = trace, trace_cap, [], [], []
        if trace and self.pool is not None:
            self.pool.timing = True

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

    def likely(self, n):
        """The n most popular non-resident experts: what to prefetch."""
        out = [e for e in range(self.num_experts) if e not in self.gpu]
        return sorted(out, key=lambda e: (-self.score[e], e))[:n]

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
    def forward(self, hidden, idx, weights, after_issue=None):
        """hidden [T, H], idx / weights [T, k] on the GPU -> [T, H] (hidden's dtype). after_issue() runs once the
        GPU work is queued and before waiting for the CPU: a place to prefetch the next layer's experts."""
        api, E, Fn, H, pool = self.api, self.num_experts, self.ffn, self.hidden, self.pool
        if hidden.dim() != 2 or hidden.shape[1] != H or hidden.dtype != self.dtype:
            raise ValueError("hidden must be [T, %d] %s, got %s %s" % (H, self.dtype, tuple(hidden.shape),
                                                                     hidden.dtype))
        t_host, main, k = time.perf_counter(), api.current_stream(), idx.shape[-1]
        self._resolve(block=False)
        marks = [api.event(True)] if self.tracing else []
        for ev in marks:
            ev.record(main)
        flat = idx.reshape(-1)
        rbuf = self._route.setdefault(flat.dtype, PinnedRows(api, (), flat.dtype)).get(flat.numel())
        rbuf.copy_(flat, non_blocking=True)                 # the one small device->host copy per call
        ev = api.event()
        ev.record(main)
        order = grouped_positions(idx, E)                    # queued meanwhile; needs no host round trip
        acc_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        tok, w_sorted = order // k, weights.reshape(-1)[order].to(acc_dtype)
        ev.synchronize()                                     # waits for this event only, not the device
        counts = routing_counts(rbuf, E)
        off = [0, *accumulate(counts)]
        self._observe(counts)
        staged = {e: pool.book.find(self._key(e), 0, Fn) for e in range(E)
                  if pool is not None and counts[e] and e not in self.gpu}
        staged = {e: s for e, s in staged.items() if s is not None}      # prefetched: no link time left
        experts = [(e, n, e in self.gpu or e in staged) for e, n in enumerate(counts) if n]
        dec = self.scheduler(self.profile, experts, H, Fn, self.dtype, allow_split=self.allow_split)
        plan = normalize_decision(dec, experts, Fn, self.allow_split)
        split_e = plan.split[0] if plan.split else None
        acc = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)

        def run(e, g, u, d):
            return expert_ffn(hidden.index_select(0, tok[off[e]:off[e + 1]]), g, u, d)

        def combine(e, y):
            acc.index_add_(0, tok[off[e]:off[e + 1]], y.to(acc_dtype) * w_sorted[off[e]:off[e + 1], None])

        # CPU work first: its activations leave now (one gather, one copy), so the worker starts at once.
        cpu_items = [(e, 0, Fn) for e in plan.cpu] + ([(split_e, 0, plan.split[1])] if plan.split else [])
        fut, segs, o = None, [], 0
        if cpu_items:
            pos = torch.cat([tok[off[e]:off[e + 1]] for e, _, _ in cpu_items])
            xh, yh = self._xbuf.get(pos.numel()), self._ybuf.get(pos.numel())
            xh.copy_(hidden.index_select(0, pos), non_blocking=True)
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
        for e in plan.resident:
            if e in self.gpu:
                if e in self._loading:
                    main.wait_event(self._loading.pop(e))
                combine(e, run(e, *expert_layout(self.gpu[e], Fn, H)))
            else:
                pool.acquire(staged[e], main)
                combine(e, run(e, *pool.views(staged[e], 0, Fn)))
                pool.release(staged[e], main)
                protect.discard(staged[e])
        partial = []                                         # the split's GPU rows; the CPU's rows come later
        pipe.drain(main, lambda e, f0, f1, g, u, d: (partial.append(run(e, g, u, d)) if e == split_e
                                                     else combine(e, run(e, g, u, d))))
        if after_issue is not None:
            after_issue()
        cpu_wait = cpu_s = 0.0
        if fut is not None:
            cpu_wait, cpu_s = fut.result()
            yd = yh.to(hidden.device, non_blocking=True)
            self._y_free = api.event()
            self._y_free.record(main)
            for (e, _, _), (_, _, _, o, n) in zip(cpu_items, segs):
                y = yd[o:o + n]
                combine(e, y.to(acc_dtype) + partial[0].to(acc_dtype) if e == split_e else y)
        out = acc if acc_dtype == self.dtype else acc.to(self.dtype)
        if self.tracing:
            self._record(dec, plan, counts, staged, marks[0], main, pipe.timings,
                         dict(tokens=hidden.shape[0], host_s=time.perf_counter() - t_host, cpu_s=cpu_s,
                              cpu_wait_s=cpu_wait))
        return out

    __call__ = forward

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, counts):
        self.score = update_popularity(self.score, counts, self.decay)
        self.calls += 1
        if self.rebalance_every and self.calls % self.rebalance_every == 0:
            self.rebalance()

    def _record(self, dec, plan, counts, staged, ev0, main, stage_ev, measured):
        ev1 = self.api.event(True)
        ev1.record(main)
        entry = {"call": self.calls, "counts": counts, "cpu": plan.cpu,
                 "streamed": plan.streamed, "resident": plan.resident, "prefetched": sorted(staged),
                 "split": None if plan.split is None else (plan.split[0], plan.split[1] / self.ffn),
                 **{k: getattr(dec, a, None) for k, a in (("predicted_s", "predicted_s"), ("pred_cpu_s", "cpu_s"),
                                                          ("pred_link_s", "link_s"), ("pred_gpu_s", "gpu_s"))},
                 **measured, "link_s": None, "prefetch_link_s": None, "total_s": None}
        self._pending.append((entry, ev0, ev1, stage_ev, self._prefetch_ev))
        self._prefetch_ev = []
        self.trace.append(entry)
        del self.trace[:max(0, len(self.trace) - self.trace_cap)]

    def _resolve(self, block):
        """Fill in the GPU times of traced calls whose events completed (all of them when block): total_s from
        the call's start to its output on the compute stream, link_s the copy stream's fills for it."""
        keep, el = [], lambda a, b: a.elapsed_time(b) / 1e3     # noqa: E731
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
