"""Hybrid CPU/GPU execution of one MoE layer's routed experts (DESIGN.md, "Placement").

Per call: one small device->host copy of the routing gives the token counts; the cost model's schedule_experts
splits the non-resident experts between the CPU worker thread and the copy stream (one maybe by FFN rows); the
GPU runs resident and streamed experts meanwhile; outputs are index_add'ed in float32 on the GPU and cast once
(eager's k-term sum, rounded once). The pure scheduling and bookkeeping is in hybrid_plan.py (tested without
CUDA), the online correction in cost_correction.py, the trace in hybrid_trace.py; CUDA goes through CudaApi.

Positions are grouped by expert on the host from that copy (host_order) and sent back in one tiny copy; each
expert's weighted output fills its rows of one buffer, summed per token by a single index_add. A layer whose
experts are all resident has nothing to schedule: its experts sit in one stacked buffer and fast_path_mode picks
the sync-free grouped matmuls over the routed rows (runtime/resident_moe.py), or, without grouped matmuls, a
sync-free dense loop (where nearly all experts are routed anyway) or the sorted loop without the scheduler.
Scheduled calls feed a CostCorrection (measured / predicted per side: CPU worker, link, GPU) that corrects the profile of the next
calls. Prefetch is offered only for experts likely enough to be routed (likely()).
"""
from __future__ import annotations

import time
from itertools import accumulate

import torch

from .cost_correction import CostCorrection
from .cpu_worker import (CudaApi, PinnedRows, StagingPool, StreamPipe, default_worker, expert_ffn, expert_layout,
                         run_cpu_job)
from .hybrid_plan import (Plan, host_order, normalize_decision, plan_swaps, prefetch_gain,
                          propose_resident, routed_probability, routing_counts, takes_keyword, update_popularity)
from .hybrid_trace import CallTrace
from .resident_moe import ResidentPaths, fast_predicted_s, grouped_layout_ok

FAST_PATHS = ("auto", "grouped", "dense", "sorted")


class HybridMoELayer(CallTrace, ResidentPaths):
    """One MoE layer's routed SwiGLU experts, some resident on the GPU, the rest homed in pinned host memory.

    experts: [(gate [F, H], up [F, H], down [H, F])] per expert (or `from_3d` for HF's gate_up_proj/down_proj).
    Host tensors are pinned in place (cudaHostRegister; a pinned copy only if that fails), shared storages once.
    scheduler(profile, experts, hidden, ffn, dtype, allow_split, link_busy_s) -> decision; default: the cost
    model's. link_busy_s: the copy stream's backlog (a prefetch still in flight: the stream is FIFO).
    staging: a StagingPool to share between layers (else `staging_slots` experts of this layer's own).
    learn / correction: correct the cost model online from the call's own measurements (CostCorrection; pass
    one object to every layer of a model to share it); the scheduler gets the corrected profile.
    prefetch_min_prob: likely() offers an expert for prefetch only if it is at least this likely to be routed
    in a call of the last call's token count: a prefetch that misses holds the FIFO copy stream for a whole
    expert (6.4 ms on the H200) in front of the next layer's own transfers.
    fast_path: how calls of an all-resident layer run: "auto" (grouped where this torch can, else
    fast_path_mode's dense or sorted), or one of "grouped", "dense", "sorted" forced (for measuring them).
    """

    def __init__(self, experts, *, resident=(), capacity=None, profile=None, scheduler=None, device=None,
                 staging=None, staging_slots=2, allow_split=True, max_swaps=1, decay=0.9, margin=0.02,
                 rebalance_every=0, trace=False, trace_cap=1024, worker=None, api=None, learn=True,
                 correction=None, prefetch_min_prob=0.5, fast_path="auto"):
        if fast_path not in FAST_PATHS:
            raise ValueError("HybridMoELayer: fast_path must be one of %s, got %r" % (FAST_PATHS, fast_path))
        self.fast_path = fast_path
        self.api = api if api is not None else CudaApi(device)
        if scheduler is None:
            if profile is None:
                raise ValueError("HybridMoELayer: the cost-model scheduler needs profile= (a HardwareProfile)")
            from ..passes.cost_schedule import schedule_experts as scheduler    # the cost model's, per step
        self.scheduler, self.profile = scheduler, profile
        self._fixed_kw = takes_keyword(scheduler, "cpu_fixed_s")     # hand it the learned per-call CPU overhead
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
        self.host = [tuple(self._pin(self._host_copy(t)) for t in w) for w in experts]
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
        self._arange, self.expected_end = None, 0.0
        self.score = [0.0] * self.num_experts
        self.decay, self.margin, self.max_swaps, self.rebalance_every = decay, margin, max_swaps, rebalance_every
        self.gpu, self._loading, self.calls, self.swaps = {}, {}, 0, 0
        self.capacity = len(set(resident)) if capacity is None else capacity
        # every expert fits: one stacked buffer, rows in expert order, which the grouped matmuls index
        self._stack = (self.api.empty((self.num_experts, 3 * self.ffn * self.hidden), self.dtype)
                       if self.capacity >= self.num_experts and fast_path in ("auto", "grouped")
                       and grouped_layout_ok(self.hidden, self.ffn, self.dtype) else None)
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

    @staticmethod
    def _host_copy(t):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")              # a device tensor gets the one host copy
        if not t.is_contiguous():
            t = t.contiguous()           # row blocks must be contiguous to stream in one copy
        return t

    def _pin(self, t):
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
        terms = self._terms(self._profile_now())
        for e in load:
            buf = self._stack[e] if self._stack is not None else self.api.empty((3 * self.ffn * self.hidden,),
                                                                                  self.dtype)
            with self.api.stream(s):
                s.wait_stream(main)      # the block may be memory the compute stream freed and still reads
                for dst, src in zip(expert_layout(buf, self.ffn, self.hidden), self.host[e]):
                    dst.copy_(src, non_blocking=True)
                ev = self.api.event()
                ev.record(s)
            if self.pool is not None and s is self.pool.stream:
                self.pool.note_copy(ev, terms.transfer() if terms else 0.0)
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

    def prefetch(self, expert_ids, until=None):
        """Start copying these experts (most likely first) into the staging slots on the copy stream, e.g. while
        the previous layer's attention runs; the next call finds them staged. Returns the ids staged.
        until: host time this layer's next call is expected to start (the previous layer's expected_end): then
        only while prefetch_gain says a copy pays, given the link's backlog and each expert's chance."""
        got, protect, terms = [], set(), self._terms(self._profile_now())
        window = None if until is None or terms is None or self.pool is None else (
            until - time.perf_counter() - self.pool.backlog_s())
        for e in expert_ids:
            if self.pool is None or len(protect) == len(self.pool.bufs):
                break
            if e not in self.gpu and window is not None:
                p = routed_probability(self.score[e], self._last_tokens, self._last_k)
                if prefetch_gain(p, window, terms.transfer()) <= 0:
                    break
                window -= terms.transfer()
            if e not in self.gpu:
                s, _, tev = self.pool.stage(self._key(e), self.host[e], 0, self.ffn, protect,
                                            terms.transfer() if terms else 0.0)
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

    def _profile_now(self):
        """The profile the scheduler sees: corrected by this layer's measurements so far."""
        if self.correction is not None and self.profile is not None:
            return self.correction.apply(self.profile)
        return self.profile

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
        fast = self._fast_mode(T, k, terms) if self.all_resident() else None
        out = self._fast_call(fast, hidden, idx, weights, acc_dtype, main) if fast != "sorted" else None
        if out is not None:
            self.expected_end = time.perf_counter()
            if after_issue is not None:
                after_issue()
            self.calls += 1
            if self.tracing:
                self._record(None, Plan([], [], sorted(self.gpu), None), None, {}, marks[0], main, [],
                             dict(tokens=T, host_s=time.perf_counter() - t_host, cpu_s=0.0, cpu_wait_s=0.0,
                                  mode=fast), predicted=terms and fast_predicted_s(terms, fast, T, k, E))
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
        prof, used, busy = self.profile, None, pool.backlog_s() if pool is not None else 0.0
        kw = {}
        if all(r for _, _, r in experts):                    # nothing to decide: no scheduler call
            dec, mode = None, "resident"
            plan = Plan([], [], [e for e, _, _ in experts], None)
        else:
            mode = "scheduled"
            if self.correction is not None and prof is not None:
                prof, used = self.correction.apply(prof), dict(self.correction.factor)
            kw = {"cpu_fixed_s": self.correction.cpu_fixed_s} if self._fixed_kw and self.correction else {}
            dec = self.scheduler(prof, experts, H, Fn, self.dtype, allow_split=self.allow_split, link_busy_s=busy,
                                 **kw)
            plan = normalize_decision(dec, experts, Fn, self.allow_split)
        split_e, t_sched = plan.split[0] if plan.split else None, time.perf_counter() - t_host

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
        t_submit = time.perf_counter() - t_host
        items = [(e, 0, Fn) for e in plan.streamed] + ([(split_e, plan.split[1], Fn)] if plan.split else [])
        if items and pool is None:
            raise RuntimeError("cost-model decision streams experts, but this layer has no staging buffers")
        protect = {staged[e] for e in plan.resident if e in staged}
        lterms = self._terms(prof) if items else None
        pipe = StreamPipe(pool, items, lambda e: (self._key(e), self.host[e]), protect,
                          lterms and (lambda f0, f1: lterms.transfer((f1 - f0) / Fn)))
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
        # when this call should end, for the next layer's prefetch (prefetch(until=...)): the CPU side's end
        self.expected_end = t_host + t_sched + (getattr(dec, "predicted_s", None) or 0.0)
        if after_issue is not None:
            after_issue()
        cpu_wait = cpu_s = t_cpu_back = 0.0
        if fut is not None:
            cpu_wait, cpu_s, t_start = fut.result()
            t_cpu_back = time.perf_counter() - t_host
            if used is not None and getattr(dec, "cpu_s", None):
                self.correction.observe("cpu", cpu_s, dec.cpu_s - kw.get("cpu_fixed_s", 0.0), used["cpu"])
                self.correction.observe_fixed(t_start - (t_host + t_submit) + cpu_wait)
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
                              mode=mode, link_busy_s=busy, sched_at_s=t_sched,
                              cpu_submit_at_s=t_submit if cpu_items else None,
                              cpu_back_at_s=t_cpu_back if cpu_items else None),
                         predicted=None if dec is not None or terms is None else sum(
                             terms.gpu(counts[e]) for e in plan.resident))
        return out

    __call__ = forward

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, counts):
        self.score = update_popularity(self.score, counts, self.decay)
        self.calls += 1
        if self.rebalance_every and self.calls % self.rebalance_every == 0:
            self.rebalance()
