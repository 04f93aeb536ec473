"""The hybrid MoE layer's link backlog and prefetch (runtime/hybrid_moe.py, runtime/cpu_worker.py StagingPool):
what a prefetch in flight leaves for the next call, which experts are worth prefetching, and copies only where
they pay before a deadline. On the CPU through the stand-in for the CUDA calls (hybrid_sim.py)."""
from types import SimpleNamespace

import pytest
import torch

from fusebackend.runtime import cpu_worker as cw
from fusebackend.runtime import hybrid_moe as hm
from fusebackend.runtime import hybrid_plan as hp
from hybrid_sim import _Ev, assert_like_eager, Forced, make_experts, make_routing, sim_layer, SimApi  # noqa: E402


class InFlightApi(SimApi):
    """Copies never complete: the copy stream's backlog stays as queued."""

    def event(self, timing=False):
        class Ev(_Ev):
            def query(self): return False
        return Ev()


def test_sim_a_prefetch_in_flight_is_the_next_calls_link_backlog(monkeypatch):
    from fusebackend.passes.cost_model import expert_terms
    from fusebackend.passes.hardware_profile import reference_h200
    # the backlog is the host clock's distance to the copies' expected end: a stopped clock makes it exact
    # (on a loaded box the walk from one assert to the next took longer than any tolerance)
    monkeypatch.setattr(cw, "time", SimpleNamespace(perf_counter=lambda: 1000.0))
    experts = make_experts(6, 16, 32, torch.float32)
    prof = reference_h200().replace(h2d_bw=1e6)                    # a slow link: a fill takes ~6 ms here
    one = expert_terms(prof, 16, 32, torch.float32).transfer()
    x = torch.randn(12, 16)
    idx, w = make_routing(12, 6, 2, force=[3, 4])
    for api, fill in ((SimApi(), 0.0), (InFlightApi(), one)):     # done copies leave no backlog
        sched = Forced("streamed")
        layer = hm.HybridMoELayer(experts, api=api, scheduler=sched, resident=[0], profile=prof, learn=False)
        assert layer.pool.backlog_s() == pytest.approx(fill, abs=1e-9)       # expert 0's load rides the link
        assert layer.prefetch([3]) == [3]
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
        assert sched.busy[-1] == pytest.approx(2 * fill, abs=1e-9)
        n_streamed = len([e for e, _, res in sched.seen[-1] if not res])
        # the call's own fills queued behind the load and the prefetch
        assert layer.pool.backlog_s() == pytest.approx((2 + n_streamed) * fill, abs=1e-9)


def test_likely_offers_only_experts_worth_prefetching():
    experts = make_experts(8, 16, 32, torch.float32)
    layer = sim_layer(experts, scheduler=Forced("cpu"), resident=[0, 1])
    zipf = [1.0 / (j + 1) for j in range(8)]
    layer.score = [z / sum(zipf) for z in zipf]
    layer._last_k = 2
    assert layer.likely(1, tokens=1) == []                           # expert 2 is routed ~1 call in 4
    assert layer.likely(1, tokens=4) == [2] and layer.likely(2, tokens=64) == [2, 3]
    assert layer.likely(1, tokens=1, min_prob=0.0) == [2]            # the old behaviour on request


def test_prefetch_with_a_deadline_copies_only_what_pays():
    import time
    from fusebackend.passes.hardware_profile import reference_h200
    experts = make_experts(8, 16, 32, torch.float32)
    prof = reference_h200().replace(h2d_bw=1e6)                       # one fill ~6 ms
    zipf = [1.0 / (j + 1) for j in range(8)]
    for until, want in ((None, [2, 3]), (0.0, []), (1.0, [2, 3])):   # no deadline / none left / a whole second
        layer = hm.HybridMoELayer(experts, api=SimApi(), scheduler=Forced("cpu"), resident=[0, 1], profile=prof,
                                  learn=False)
        layer.score, layer._last_k, layer._last_tokens = [z / sum(zipf) for z in zipf], 2, 4
        deadline = None if until is None else time.perf_counter() + until
        assert layer.prefetch(layer.likely(2, min_prob=0.0), until=deadline) == want
    # an idle window of half a fill: worth it for a likely expert only (gain = p/2 - (1-p)/2)
    assert hp.prefetch_gain(0.9, 3e-3, 6e-3) > 0 > hp.prefetch_gain(0.4, 3e-3, 6e-3)
    assert hp.prefetch_gain(0.1, 7e-3, 6e-3) == pytest.approx(0.1 * 6e-3)  # all of it free: any chance pays
