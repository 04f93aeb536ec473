"""The hybrid MoE executor's pure parts, on the CPU: the scheduling and bookkeeping of runtime/hybrid_plan.py,
the CPU worker's building blocks (runtime/cpu_worker.py), the cost correction (runtime/cost_correction.py) and the
all-resident fast path's choice. The layer itself is tested in test_hybrid_moe.py."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fusebackend.runtime import cpu_worker as cw
from fusebackend.runtime import hybrid_plan as hp
from fusebackend.runtime.cost_correction import CostCorrection


# ---------------------------------------------------------------- helpers
def make_experts(E, H, Fn, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(dtype)   # noqa: E731
    return [(mk(Fn, H), mk(Fn, H), mk(H, Fn)) for _ in range(E)]


# ---------------------------------------------------------------- the plan
def test_routing_counts_ignore_padding_and_grouped_positions_match_where():
    idx = torch.tensor([[0, 3], [3, 1], [-1, 3], [8, 0], [2, 1]])
    assert hp.routing_counts(idx, 8) == [2, 2, 1, 3, 0, 0, 0, 0]
    order = hp.grouped_positions(idx, 8)
    off = [0]
    for c in hp.routing_counts(idx, 8):
        off.append(off[-1] + c)
    flat = idx.reshape(-1)
    for e in range(8):
        assert order[off[e]:off[e + 1]].tolist() == torch.where(flat == e)[0].tolist()
    assert sorted(order[off[8]:].tolist()) == [4, 6]            # padding sorts last, outside every expert


def test_split_rows_round_to_64ths_and_reject_bad_fractions():
    assert hp.split_rows(14336, 0.5) == 7168
    assert hp.split_rows(14336, 1 / 64) == 224
    assert hp.split_rows(14336, 0.3) == 19 * 224                  # rounded to the nearest 64th
    assert hp.split_rows(14336, 0.0) == 0 and hp.split_rows(14336, 1.0) == 14336
    assert hp.split_rows(100, 0.5) == 50
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(ValueError):
            hp.split_rows(14336, bad)


def test_popularity_decays_toward_the_routed_share():
    s = [0.0] * 4
    for _ in range(60):
        s = hp.update_popularity(s, [6, 2, 0, 0], 0.9)
    assert s[0] == pytest.approx(0.75, abs=1e-2) and s[1] == pytest.approx(0.25, abs=1e-2) and s[2] == 0.0
    one = hp.update_popularity([0.5, 0.5, 0, 0], [0, 4, 0, 0], 0.75)
    assert one == pytest.approx([0.375, 0.625, 0, 0])
    assert hp.update_popularity([0.2, 0.8], [0, 0], 0.5) == [0.2, 0.8]         # an empty call changes nothing
    with pytest.raises(ValueError):
        hp.update_popularity([0.0], [1], 1.5)


def test_propose_resident_fills_free_places_and_keeps_residents_within_the_margin():
    score = [0.30, 0.25, 0.24, 0.21]
    assert hp.propose_resident(score, [], 2) == [0, 1]
    assert hp.propose_resident(score, [2, 3], 2, margin=0.05) == [0, 2]        # 0.30 > 0.21 + 0.05; 0.25 < 0.29
    assert hp.propose_resident(score, [2, 3], 2, margin=0.10) == [2, 3]        # nobody beats by 0.10
    assert hp.propose_resident(score, [2, 3], 2, margin=0.0) == [0, 1]
    assert hp.propose_resident(score, [3], 2, margin=0.5) == [0, 3]            # free place: best outsider


def test_plan_swaps_is_bounded_and_evicts_the_least_popular():
    score = [0.4, 0.3, 0.2, 0.1, 0.0]
    load, evict = hp.plan_swaps([2, 3, 4], [0, 1, 2], 3, 1, score)
    assert load == [0] and evict == [4]                            # one swap; 4 is least popular of {3, 4}
    load, evict = hp.plan_swaps([2], [0, 1, 2], 3, 5, score)
    assert load == [0, 1] and evict == []                          # room: nothing evicted
    load, evict = hp.plan_swaps([0, 1], [4, 3, 2, 1, 0], 2, 2, score)
    assert load == [4, 3] and sorted(evict) == [0, 1]              # desired cut to capacity, loads in order
    assert hp.plan_swaps([0, 1], [0, 1], 2, 3, score) == ([], [])


def test_normalize_decision_checks_and_repairs():
    experts = [(0, 3, True), (2, 1, False), (5, 7, False)]
    ok = SimpleNamespace(cpu=[2], streamed=[0], resident=[], split=(5, 0.5))
    assert hp.normalize_decision(ok, experts, 128) == hp.Plan([2], [], [0], (5, 64))
    for bad in (SimpleNamespace(cpu=[2], streamed=[], resident=[0], split=None),              # 5 missing
                SimpleNamespace(cpu=[2, 5], streamed=[5], resident=[0], split=None),          # 5 twice
                SimpleNamespace(cpu=[2, 5, 7], streamed=[], resident=[0], split=None),        # 7 not routed
                SimpleNamespace(cpu=[2], streamed=[], resident=[0, 5], split=None)):          # 5 not on GPU
        with pytest.raises(ValueError):
            hp.normalize_decision(bad, experts, 128)
    edge = lambda f: hp.normalize_decision(SimpleNamespace(cpu=[2], streamed=[], resident=[0], split=(5, f)),
                                           experts, 128)                                     # noqa: E731
    assert edge(0.0) == hp.Plan([2], [5], [0], None) and edge(1.0) == hp.Plan([2, 5], [], [0], None)
    with pytest.raises(ValueError, match="splitting is off"):
        hp.normalize_decision(ok, experts, 128, allow_split=False)


# ---------------------------------------------------------------- the CPU worker's pieces
def test_staging_slots_lru_protect_and_ranges():
    b = cw.StagingSlots(2)
    assert b.victim() in (0, 1)
    b.assign(0, "a", 0, 128)
    b.assign(1, "b", 64, 128)
    assert b.find("a", 32, 128) == 0 and b.find("b", 64, 128) == 1 and b.find("b", 0, 128) is None
    assert b.victim() == 0                                          # a is older
    b.touch(0)
    assert b.victim() == 1 and b.victim(protect={1}) == 0 and b.victim(protect={0, 1}) is None


def test_expert_ffn_is_additive_over_ffn_row_blocks():
    (g, u, d), = make_experts(1, 16, 64, torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    whole = cw.expert_ffn(x, g, u, d)
    out = torch.empty(5, 16, dtype=torch.float64)
    parts = cw.expert_ffn(x, g[:24], u[:24], d[:, :24], out=out) + cw.expert_ffn(x, g[24:], u[24:], d[:, 24:])
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    gu = torch.cat([g, u])
    assert cw.fused_gate_up(gu[:64], gu[64:]).data_ptr() == gu.data_ptr() and cw.fused_gate_up(g, u) is None


def test_fused_gate_up_refuses_adjacent_but_separate_storages():
    """The setStorage error of bench/offload.py (cpu_nonres, accelerate): gate and up back to back in memory,
    each its own storage (a caching allocator splits a freed block so), must not be fused into one view."""
    np = pytest.importorskip("numpy")
    arr = np.random.default_rng(0).standard_normal(2 * 8 * 4).astype(np.float32)
    g, u = torch.from_numpy(arr[:32]).view(8, 4), torch.from_numpy(arr[32:]).view(8, 4)
    assert u.data_ptr() == g.data_ptr() + g.numel() * 4 and g.untyped_storage().nbytes() == 128
    assert cw.fused_gate_up(g, u) is None
    d, x = torch.randn(4, 8), torch.randn(3, 4)
    ref = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    torch.testing.assert_close(cw.expert_ffn(x, g, u, d), ref)


# ---------------------------------------------------------------- cost correction
def test_cost_correction_converges_is_bounded_and_ignores_noise():
    c = CostCorrection(alpha=0.3)
    for _ in range(30):                          # predictions made with the raw model, machine 2x slower
        assert c.observe("cpu", 2.0e-3, 1.0e-3, used=1.0)
    assert c.factor["cpu"] == pytest.approx(2.0, rel=1e-3)
    c2 = CostCorrection(alpha=0.5)
    for _ in range(40):                          # a prediction made with the current factor, machine 1.6x
        f = c2.factor["link"]
        c2.observe("link", 1.6 * 5e-3, f * 5e-3, used=f)
    assert c2.factor["link"] == pytest.approx(1.6, rel=1e-2)
    c3 = CostCorrection(alpha=1.0, clip=3.0, hi=8.0)
    c3.observe("gpu", 1.0, 1e-3)                 # one wild sample moves at most by the clip
    assert c3.factor["gpu"] == pytest.approx(3.0)
    for _ in range(10):
        c3.observe("gpu", 1.0, 1e-3, used=c3.factor["gpu"])
    assert c3.factor["gpu"] == 8.0               # bounded above
    assert not c3.observe("cpu", 1.0, 1e-5)      # launch-sized predictions are not evidence
    assert not c3.observe("cpu", float("nan"), 1e-2) and not c3.observe("cpu", 0.0, 1e-2)
    assert c3.factor["cpu"] == 1.0 and c3.observations["cpu"] == 0
    with pytest.raises(ValueError):
        c3.observe("disk", 1.0, 1.0)


def test_corrected_profile_slows_the_side_and_the_scheduler_moves_work_off_it():
    from fusebackend.passes.cost_model import expert_cost
    from fusebackend.passes.cost_schedule import schedule_experts
    from fusebackend.passes.hardware_profile import reference_h200
    p = reference_h200()
    c = CostCorrection()
    assert c.apply(p) is p                       # nothing learnt: the profile itself
    c.factor.update(cpu=2.0, link=1.0, gpu=1.0)
    q = c.apply(p)
    assert c.apply(p) is q                       # cached per quantized factors
    base, slow = (expert_cost(x, 1, 4096, 14336, "bfloat16") for x in (p, q))
    assert slow.cpu_s == pytest.approx(2 * base.cpu_s, rel=0.02) and slow.transfer_s == base.transfer_s
    one = [(0, 3, True), (5, 1, False)]          # batch 1: one non-resident expert, split by rows
    d0, d1 = (schedule_experts(x, one, 4096, 14336, "bfloat16") for x in (p, q))
    assert d0.split and d1.split and d1.split[1] < d0.split[1]       # a slower CPU gets fewer rows
    four = [(0, 2, True), (1, 2, False), (2, 2, False), (3, 1, False), (4, 1, False)]
    d0, d1 = (schedule_experts(x, four, 4096, 14336, "bfloat16") for x in (p, q))
    share = lambda d: len(d.cpu) + (d.split[1] if d.split else 0)     # noqa: E731
    assert share(d1) < share(d0)


# ---------------------------------------------------------------- the all-resident fast path
@pytest.mark.parametrize("tokens,want", [(1, "sorted"), (4, "sorted"), (16, "dense"), (64, "dense"),
                                         (512, "sorted")])
def test_fast_path_mode_against_the_cost_model(tokens, want):
    from fusebackend.passes.cost_model import expert_terms
    from fusebackend.passes.hardware_profile import reference_h200
    terms = expert_terms(reference_h200(), 4096, 14336, "bfloat16")
    zipf = [1.0 / (j + 1) for j in range(8)]
    score = [z / sum(zipf) for z in zipf]
    assert hp.fast_path_mode(tokens, 2, score, range(8), terms.gpu) == want


def test_fast_path_mode_and_routed_probability_edges():
    assert hp.routed_probability(0.0, 100, 2) == 0.0 and hp.routed_probability(0.6, 1, 2) == 1.0
    assert hp.routed_probability(0.1, 1, 2) == pytest.approx(0.2)
    assert hp.expected_routed([0.0] * 8, range(8), 1, 2) == pytest.approx(8 * 0.25)   # uniform when unseen
    assert hp.fast_path_mode(1, 2, [0.0] * 8, range(8)) == "sorted"
    assert hp.fast_path_mode(64, 2, [0.0] * 8, range(8)) == "dense"
    assert hp.fast_path_mode(512, 2, [0.0] * 8, range(8)) == "sorted"   # no cost model: FLOP-bound guess
    assert hp.fast_path_mode(64, 2, [0.0] * 8, []) == "sorted"
