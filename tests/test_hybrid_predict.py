"""The hybrid layers' predicted steps that pick streaming buffers against resident experts (CPU only, the
fixed H200 profile): no link without a buffer, a decode step's few picks, residents spread over layers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fusebackend.passes.cost_schedule import schedule_experts
from fusebackend.passes.hardware_profile import reference_h200
from fusebackend.passes.hybrid_predict import choice_cost_ms, decode_step_ms, layer_step_ms, predict_hybrid
from fusebackend.passes.placement import PlacedSubgraph, PlacementPlan

H, F, E, TOP_K = 4096, 14336, 8, 2          # Mixtral-8x7B's expert shape, bf16
PROFILE = reference_h200()


def _patterns(layers=2):
    experts = [SimpleNamespace(layer=l, kind="routed", expert=e, hidden=H, ffn=F, dtype=torch.bfloat16)
               for l in range(layers) for e in range(E)]
    routers = [SimpleNamespace(layer=l, top_k=TOP_K) for l in range(layers)]
    return SimpleNamespace(experts=experts, routers=routers, attention=[])


def _plan(resident, slots, tokens=16, layers=2):
    """resident: {layer: number of resident experts}; slots: streaming buffers."""
    rows = []
    for l in range(layers):
        for e in range(E):
            home = "gpu" if e < resident.get(l, 0) else "host"
            rows.append(PlacedSubgraph("layer%d.expert%d" % (l, e), "expert", frozenset(), (), 1, home,
                                       "cuda", "resident" if home == "gpu" else "streamed", tokens, {}))
    plan = PlacementPlan(0, 0, 0, {}, rows, staging_slots=slots)
    plan.hybrid_layers = list(range(layers))
    return plan


def _sched(entries, link=True):
    return 1e3 * schedule_experts(PROFILE, entries, H, F, torch.bfloat16, link=link).predicted_s


def test_without_a_streaming_buffer_the_prediction_has_no_link():
    pat = _patterns(1)
    none, one = _plan({0: 2}, 0, layers=1), _plan({0: 2}, 1, layers=1)
    entries = [(e, 16, e < 2) for e in range(E)]
    assert layer_step_ms(none, pat, PROFILE, 0) == pytest.approx(_sched(entries, link=False))
    assert layer_step_ms(one, pat, PROFILE, 0) == pytest.approx(_sched(entries))
    assert layer_step_ms(one, pat, PROFILE, 0) < layer_step_ms(none, pat, PROFILE, 0)
    # a later graph of the model uses the buffers an earlier one holds
    none.shared_staging_slots = 2
    assert layer_step_ms(none, pat, PROFILE, 0) == pytest.approx(_sched(entries))


def test_a_decode_step_costs_its_picks_not_every_expert():
    pat = _patterns(1)
    plan = _plan({}, 1, tokens=1, layers=1)
    two = _sched([(0, 1, False), (1, 1, False)])
    assert layer_step_ms(plan, pat, PROFILE, 0, pairs=TOP_K) == pytest.approx(two)
    assert layer_step_ms(plan, pat, PROFILE, 0) > 2 * two          # eight experts at one token each
    # 2 of 8 resident: a pick lands on one with probability 1/4, so half a pick is expected resident
    plan = _plan({0: 2}, 1, tokens=1, layers=1)
    one_hit = _sched([(0, 1, True), (2, 1, False)])
    assert layer_step_ms(plan, pat, PROFILE, 0, pairs=TOP_K) == pytest.approx(0.5 * two + 0.5 * one_hit)
    # a routing profile that sends every pick to the resident experts
    shares = {e: (1.0 if e < 2 else 0.0) for e in range(E)}
    both = _sched([(0, 1, True), (1, 1, True)])
    assert layer_step_ms(plan, pat, PROFILE, 0, pairs=TOP_K, shares=shares) == pytest.approx(both)


def test_one_buffer_beats_all_resident_over_a_generation_at_a_quarter_of_the_experts():
    """Mixtral, 2 layers, room for 4 experts: 4 resident and no link, or 3 resident and one buffer; the prompt
    favours streaming and so do the decode steps (a pick on a host expert splits between CPU and link)."""
    pat = _patterns(2)
    pairs = {0: 64 * TOP_K, 1: 64 * TOP_K}
    costs = {}
    for name, resident, slots in (("4 resident", {0: 2, 1: 2}, 0), ("1 buffer", {0: 2, 1: 1}, 1),
                                  ("2 buffers", {0: 1, 1: 1}, 2)):
        plan = _plan(resident, slots)
        predict_hybrid(plan, pat, PROFILE, pairs)
        costs[name] = (choice_cost_ms(plan, pat, PROFILE, pairs), decode_step_ms(plan, pat, PROFILE))
    assert min(costs, key=lambda k: costs[k][0]) == "1 buffer", costs
    assert costs["1 buffer"][1] < costs["4 resident"][1] and costs["1 buffer"][1] < costs["2 buffers"][1]
