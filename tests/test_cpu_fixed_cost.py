"""The CPU side's per-call overhead (the worker's wake-up and its waits for the activations' copies): the
scheduler adds it to a CPU side that has work (passes/cost_schedule.py: cpu_fixed_s), the hybrid MoE layer
learns it from each call (runtime/cost_correction.py: observe_fixed), apart from the CPU's rate factor."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hybrid_sim import assert_like_eager, make_experts, make_routing, sim_layer  # noqa: E402

from fusebackend.passes.cost_schedule import schedule_experts  # noqa: E402
from fusebackend.passes.hardware_profile import reference_h200  # noqa: E402
from fusebackend.runtime.cost_correction import CostCorrection  # noqa: E402

H, FF, BF16 = 4096, 14336, torch.bfloat16


def _cpu_rows(d):
    return len(d.cpu) + (d.split[1] if d.split else 0)


def test_a_larger_fixed_cost_never_gives_the_cpu_more_work():
    p = reference_h200()
    for tokens in ([1, 1], [1, 3, 2, 1], [8, 4, 2, 1, 1, 1]):
        experts = [(e, t, False) for e, t in enumerate(tokens)]
        rows = [_cpu_rows(schedule_experts(p, experts, H, FF, BF16, cpu_fixed_s=f)) for f in (0.0, 1e-3, 4e-3, 2e-2)]
        assert rows == sorted(rows, reverse=True), (tokens, rows)
        assert rows[-1] < rows[0] or rows[0] == 0


def test_the_fixed_cost_is_in_the_cpu_side_only_when_it_has_work():
    p = reference_h200()
    one = [(0, 1, False)]
    base = schedule_experts(p, one, H, FF, BF16, allow_split=False)
    more = schedule_experts(p, one, H, FF, BF16, allow_split=False, cpu_fixed_s=1e-3)
    if more.cpu:
        assert more.cpu_s == pytest.approx(base.cpu_s + 1e-3, rel=1e-9)
    streamed = schedule_experts(p, [(0, 1, False)], H, FF, BF16, allow_split=False, cpu_fixed_s=1.0)
    assert streamed.cpu == [] and streamed.cpu_s == 0.0 and streamed.predicted_s < 1.0
    with pytest.raises(ValueError, match="cpu_fixed_s"):
        schedule_experts(p, one, H, FF, BF16, cpu_fixed_s=-1e-3)


def test_observe_fixed_is_a_clipped_ewma():
    c = CostCorrection(alpha=0.5)
    assert c.observe_fixed(2e-3) and c.cpu_fixed_s == pytest.approx(2e-3)
    c.observe_fixed(4e-3)
    assert c.cpu_fixed_s == pytest.approx(3e-3)
    c.observe_fixed(1.0)                     # clipped to FIXED_MAX_S
    assert c.cpu_fixed_s == pytest.approx(0.5 * 3e-3 + 0.5 * c.FIXED_MAX_S)
    assert not c.observe_fixed(float("nan")) and c.n_fixed == 3
    c.observe_fixed(-1.0)
    assert c.cpu_fixed_s >= 0.0 and "cpu_fixed_ms" in c.summary()


class LateWorker:
    """A worker thread that starts each CPU job `delay` seconds after its submit: a wake-up the layer should
    learn."""

    def __init__(self, delay):
        from concurrent.futures import ThreadPoolExecutor
        self.delay, self.pool = delay, ThreadPoolExecutor(max_workers=1)

    def submit(self, fn, *args):
        def late():
            time.sleep(self.delay)
            return fn(*args)
        return self.pool.submit(late)


def test_sim_layer_learns_the_overhead_and_hands_it_to_the_scheduler():
    seen = []

    def mixtral(p, experts, hidden, ffn, dtype, allow_split=True, link_busy_s=0.0, cpu_fixed_s=0.0):
        seen.append(cpu_fixed_s)
        return schedule_experts(p, experts, H, FF, dtype, allow_split, link_busy_s=link_busy_s,
                                cpu_fixed_s=cpu_fixed_s)
    experts = make_experts(8, 32, 128, torch.bfloat16)
    corr = CostCorrection()
    layer = sim_layer(experts, scheduler=mixtral, profile=reference_h200(), resident=[0, 1], correction=corr,
                      worker=LateWorker(3e-3))
    x = torch.randn(1, 32).to(torch.bfloat16)
    idx, w = make_routing(1, 8, 2, seed=3, force=[5])
    for _ in range(8):
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    if corr.n_fixed == 0:
        pytest.skip("the scheduler put no expert on the CPU")
    assert 2.5e-3 <= corr.cpu_fixed_s <= corr.FIXED_MAX_S and seen[0] == 0.0 and seen[-1] >= 2.5e-3
