"""The hybrid MoE layer's measurements (runtime/hybrid_moe.py): the per-call trace and the timing events behind
it, and the events whose elapsed times feed the layer's CostCorrection, read back once they complete."""
from __future__ import annotations


class CallTrace:
    """HybridMoELayer's trace and measurement bookkeeping, a mixin: it reads the layer's api, calls, ffn,
    correction, trace / trace_cap and the pending event lists (_pending, _prefetch_ev, _learn_pending)."""

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
        the call's start to its output on the compute stream, link_s the copy stream's fills for it, and when
        they started and ended after the call's start."""
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
                         prefetch_link_s=sum(el(a, b) for a, b in pre_ev),
                         # the call's own fills on the call's clock: a late start is a backlog on the link
                         link_start_at_s=el(ev0, stage_ev[0][0]) if stage_ev else None,
                         link_end_at_s=el(ev0, stage_ev[-1][1]) if stage_ev else None)
        self._pending = keep

    def collect_trace(self):
        """The trace with every measured time filled in (waits for the traced calls' events)."""
        self._resolve(block=True)
        return self.trace
