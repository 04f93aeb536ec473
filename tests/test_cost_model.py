"""The placement cost model against the H200 anchors (ANCHORS.md), and the per-step expert scheduler against
brute force."""
import itertools
import math
import random
import time

import pytest
import torch

from fusebackend.passes.cost_model import (ROW_GRAIN, attention_cost, expert_cost, overlap_time,
                                           shared_bw_from_overlap, whole_expert_bound)
from fusebackend.passes.cost_schedule import schedule_experts
from fusebackend.passes.cost_step import Decision, predict_step
from fusebackend.passes.hardware_profile import reference_h200

REF = reference_h200()
H, FF, BF16 = 4096, 14336, torch.bfloat16          # one Mixtral-8x7B expert: 352 MB


def mixtral(tokens, **kw):
    return expert_cost(REF, tokens, H, FF, BF16, **kw)


def near(value, anchor, tol=0.15):
    return abs(value / anchor - 1) <= tol


def test_one_mixtral_expert_matches_the_anchors():
    c = mixtral(1)
    assert math.isclose(c.weight_bytes, 352321536) and near(c.transfer_s, 6.48e-3)
    for tokens, ms in ((1, 5.5), (16, 6.9), (32, 9.1), (64, 10.3)):      # offload_anchors2.py, CPU
        assert near(mixtral(tokens).cpu_s, ms * 1e-3), (tokens, mixtral(tokens).cpu_s)
    assert c.gpu_streamed_s > c.transfer_s > 30 * c.gpu_resident_s


def test_expert_costs_grow_with_tokens_and_zero_tokens_cost_nothing():
    prev = mixtral(0)
    assert prev.cpu_s == prev.gpu_resident_s == prev.flops == 0 and prev.transfer_s > 0
    for t in range(1, 300, 7):
        c = mixtral(t)
        assert c.cpu_s > prev.cpu_s and c.gpu_resident_s >= prev.gpu_resident_s
        assert c.gpu_streamed_s >= prev.gpu_streamed_s and c.transfer_s == prev.transfer_s
        prev = c
    # many tokens: the GPU becomes compute-bound, and so its time keeps growing
    assert mixtral(8192).gpu_resident_s > 2 * mixtral(64).gpu_resident_s


def test_cpu_wins_at_few_tokens_streaming_at_many():
    wins = [t for t in range(1, 257) if mixtral(t).gpu_streamed_s < mixtral(t).cpu_s]
    assert mixtral(1).cpu_s < mixtral(1).gpu_streamed_s and wins and wins == list(range(wins[0], 257))
    # The anchors put it at or below 16: CPU 5.5 ms at 1 token, 6.9 ms at 16, against 6.48 ms over the link
    # (interpolated: ~13 tokens); the model puts it at 16.
    assert 8 <= wins[0] <= 20, wins[0]


def test_row_fraction_moves_that_share_of_the_weights():
    half, whole = mixtral(4, row_fraction=0.5), mixtral(4)
    assert math.isclose(half.weight_bytes * 2, whole.weight_bytes) and math.isclose(half.flops * 2, whole.flops)
    assert whole.transfer_s / 2 < half.transfer_s < whole.transfer_s / 2 * 1.01       # plus its copy launches
    assert whole.cpu_s / 2 < half.cpu_s < whole.cpu_s / 2 * 1.05                       # plus fixed overheads
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match="row_fraction"):
            mixtral(4, row_fraction=bad)
    with pytest.raises(ValueError, match="tokens"):
        mixtral(-1)


def attn(b, t, **kw):
    return attention_cost(REF, b, 32, 8, t, 128, BF16, **kw)


@pytest.mark.parametrize("b,t,resident_ms,streamed_ms", [(1, 32768, 0.075, 2.55), (4, 32768, 0.167, 9.97),
                                                         (16, 8192, 0.163, 9.97), (1, 131072, 0.174, 9.95)])
def test_decode_attention_matches_the_anchors(b, t, resident_ms, streamed_ms):
    a = attn(b, t)
    assert math.isclose(a.kv_bytes, 2 * b * 8 * t * 128 * 2)
    assert near(a.gpu_resident_s, resident_ms * 1e-3) and near(a.gpu_streamed_s, streamed_ms * 1e-3)
    # a fused CPU kernel reading K/V once at the host's copy rate beats streaming them (ANCHORS.md)
    assert a.kv_bytes / REF.cpu_mem_bw < a.cpu_s < a.gpu_streamed_s


def test_attention_costs_grow_with_context_and_split_by_fraction():
    prev = None
    for t in (1024, 4096, 8192, 32768, 131072):
        a = attn(1, t)
        if prev:
            assert a.kv_bytes > prev.kv_bytes and a.cpu_s > prev.cpu_s
            assert a.gpu_resident_s > prev.gpu_resident_s and a.gpu_streamed_s > prev.gpu_streamed_s
        prev = a
    assert math.isclose(attn(1, 32768, context_fraction=0.25).kv_bytes, attn(1, 8192).kv_bytes)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention_cost(REF, 1, 32, 6, 1024, 128, BF16)


def test_contention_slows_the_cpu_side_like_the_probes():
    mb = mixtral(1).weight_bytes
    cpu, dma = overlap_time(mb, 7.36e-3, mb, 6.41e-3, REF)   # contention_probe.py: together 8.83 / 6.89 ms
    # the link keeps its rate; the CPU cores get the DRAM left and finish late
    assert cpu > 7.36e-3 and dma == pytest.approx(6.41e-3) and max(cpu, dma) > max(7.36e-3, 6.41e-3)
    assert near(cpu, 8.83e-3, 0.06) and near(dma, 6.89e-3, 0.08)
    assert shared_bw_from_overlap(mb, 7.36e-3, cpu, mb, 6.41e-3, dma) == pytest.approx(REF.shared_dram_bw)
    # the H200 cost check (2026-12-01): alone 6.59 / 6.47 ms, together 9.33 / 6.80; the inverse reproduces it
    shared = shared_bw_from_overlap(mb, 6.59e-3, 9.33e-3, mb, 6.47e-3, 6.80e-3)
    cpu, dma = overlap_time(mb, 6.59e-3, mb, 6.47e-3, REF.replace(shared_dram_bw=shared))
    assert near(cpu, 9.33e-3, 0.05) and near(dma, 6.80e-3, 0.06)
    # the CPU can end first when its share still lets it: then the link runs at its own rate afterwards
    cpu, dma = overlap_time(mb / 8, 1e-3, mb, 6.41e-3, REF)
    assert 1e-3 < cpu < 6.41e-3 and dma == pytest.approx(6.41e-3)
    starved = REF.replace(shared_dram_bw=mb / 6.41e-3)         # the link alone fills DRAM: CPU waits for it
    cpu, dma = overlap_time(mb, 7.36e-3, mb, 6.41e-3, starved)
    assert cpu == pytest.approx(6.41e-3 + 7.36e-3) and dma == pytest.approx(6.41e-3)
    roomy = REF.replace(shared_dram_bw=1e12)
    assert overlap_time(mb, 7.36e-3, mb, 6.41e-3, roomy) == (7.36e-3, 6.41e-3)
    assert overlap_time(0, 0, mb, 6.41e-3, REF) == (0, 6.41e-3)


def brute_force(profile, experts, hidden, ffn, busy=0.0):
    """The layer time of every whole-expert assignment, by the scheduler's documented model, from scratch;
    busy: seconds of copies already queued on the link before this step's."""
    res = [t for _, t, r in experts if r and t > 0]
    far = [t for _, t, r in experts if not r and t > 0]
    gpu_res = sum(expert_cost(profile, t, hidden, ffn, BF16).gpu_resident_s for t in res)
    out = {}
    for mask in itertools.product((0, 1), repeat=len(far)):
        on_cpu = [expert_cost(profile, t, hidden, ffn, BF16) for t, m in zip(far, mask) if not m]
        on_link = [expert_cost(profile, t, hidden, ffn, BF16) for t, m in zip(far, mask) if m]
        c, l = overlap_time(sum(x.weight_bytes for x in on_cpu), sum(x.cpu_s for x in on_cpu),
                            busy * profile.h2d_bw + sum(x.weight_bytes for x in on_link),
                            busy + sum(x.transfer_s for x in on_link), profile)
        g = [x.gpu_resident_s for x in on_link]
        gpu_end = max(gpu_res + sum(g), l + min(g)) if g else max(gpu_res, l) if busy else gpu_res
        out[mask] = max(c, gpu_end)
    return out


def random_profile(rng):
    p = REF
    if rng.random() < 0.5:
        p = p.replace(shared_dram_bw=rng.choice([30e9, 60e9, 88.8e9, 300e9]), h2d_bw=rng.choice([25e9, 54e9, 1e11]))
    if rng.random() < 0.3:
        p = p.replace(cpu_gemv_bw={**p.cpu_gemv_bw, "bfloat16": rng.choice([15e9, 150e9])})
    return p


def test_schedule_is_never_worse_than_any_whole_expert_assignment():
    rng = random.Random(7)
    for _ in range(150):
        p = random_profile(rng)
        hidden, ffn = rng.choice([(4096, 14336), (2048, 1408), (7168, 2048)])
        experts = [(e, rng.choice([0, 1, 1, 2, 3, 5, 8, 16, 33, 64, 300]), rng.random() < 0.3)
                   for e in rng.sample(range(64), rng.randint(1, 9))]
        every = brute_force(p, experts, hidden, ffn)
        all_cpu, all_link = every[min(every)], every[max(every)]
        for allow in (False, True):
            s = schedule_experts(p, experts, hidden, ffn, BF16, allow_split=allow)
            assert s.predicted_s <= min(every.values()) * (1 + 1e-9), (experts, s)
            assert s.predicted_s <= all_cpu * (1 + 1e-9) and s.predicted_s <= all_link * (1 + 1e-9)
            placed = s.cpu + s.streamed + ([s.split[0]] if s.split else [])
            assert sorted(placed) == sorted(e for e, t, r in experts if t > 0 and not r)
            assert sorted(s.resident) == sorted(e for e, t, r in experts if t > 0 and r)
            if not allow:
                assert s.split is None and math.isclose(s.predicted_s, min(every.values()), rel_tol=1e-9)


def test_a_busy_link_is_waited_for_and_the_schedule_stays_the_best():
    # a prefetch still in flight: this step's transfers queue behind it on the FIFO copy stream
    rng = random.Random(5)
    for _ in range(60):
        p = random_profile(rng)
        experts = [(e, rng.choice([1, 1, 2, 5, 16, 64]), rng.random() < 0.25) for e in rng.sample(range(8), 6)]
        free = schedule_experts(p, experts, H, FF, BF16, allow_split=False)
        for busy in (0.002, 0.0064, 0.02):
            every = brute_force(p, experts, H, FF, busy)
            s = schedule_experts(p, experts, H, FF, BF16, allow_split=False, link_busy_s=busy)
            assert math.isclose(s.predicted_s, min(every.values()), rel_tol=1e-9), (experts, busy, s)
            assert s.predicted_s >= free.predicted_s * (1 - 1e-9)
            if s.streamed:                        # the layer ends after the backlog and this step's transfers
                assert s.predicted_s >= busy + s.link_s - 1e-12
            split = schedule_experts(p, experts, H, FF, BF16, link_busy_s=busy)
            assert split.predicted_s <= s.predicted_s * (1 + 1e-9)
    # the 6.4 ms of a whole prefetched expert still on the link moves work to the CPU (as on the H200, decode16)
    ex = [(0, 9, True), (1, 7, True), (2, 5, False), (3, 4, False), (4, 3, False), (5, 2, False), (6, 2, False)]
    a = schedule_experts(REF, ex, H, FF, BF16, allow_split=False)
    b = schedule_experts(REF, ex, H, FF, BF16, allow_split=False, link_busy_s=0.0064)
    assert len(b.streamed) < len(a.streamed) and len(b.cpu) > len(a.cpu)
    with pytest.raises(ValueError, match="link_busy_s"):
        schedule_experts(REF, ex, H, FF, BF16, link_busy_s=-1.0)


def test_many_experts_are_scheduled_close_to_the_best():
    # above EXHAUSTIVE_MAX (10) the search is local: within 2% of brute force on random cases (measured 1.75%)
    rng = random.Random(11)
    for _ in range(3):
        experts = [(e, rng.choice([1, 1, 2, 3, 5, 8, 16, 40, 100]), False) for e in range(rng.choice([11, 12]))]
        every = brute_force(REF, experts, H, FF)
        s = schedule_experts(REF, experts, H, FF, BF16, allow_split=False)
        assert s.predicted_s <= min(every.values()) * 1.03
        assert s.predicted_s <= min(every[min(every)], every[max(every)])       # all-CPU, all-streamed


def gpu_side(s, tokens):
    """The GPU side's end for a split schedule with nothing else streamed (as the scheduler models it)."""
    part = expert_cost(REF, tokens, H, FF, BF16, row_fraction=1 - s.split[1])
    return max(s.gpu_s, s.link_s + part.gpu_resident_s)


@pytest.mark.parametrize("experts", [[(0, 1, True), (5, 1, False)],        # batch 1, 2 of 8 resident
                                     [(3, 1, False), (6, 1, False)],       # batch 1, nothing resident
                                     [(2, 40, False)]])                     # one expert, many tokens
def test_a_dominant_expert_is_split_so_both_sides_finish_together(experts):
    s = schedule_experts(REF, experts, H, FF, BF16)
    whole = schedule_experts(REF, experts, H, FF, BF16, allow_split=False)
    assert s.split is not None and 0 < s.split[1] < 1
    assert (s.split[1] * ROW_GRAIN).is_integer()
    assert s.predicted_s < whole.predicted_s
    if not s.cpu and not s.streamed:              # the split expert alone on both sides: both end together
        end = gpu_side(s, dict((e, t) for e, t, _ in experts)[s.split[0]])
        assert s.predicted_s == pytest.approx(max(s.cpu_s, end))
        assert abs(s.cpu_s - end) <= 0.03 * s.predicted_s, (s.cpu_s, end)      # to within one 1/64 step
        # ANCHORS: splitting halves the batch-1 expert without contention; sharing DRAM takes some of it back
        assert s.predicted_s < 0.8 * whole.predicted_s
        roomy = REF.replace(shared_dram_bw=1e12)
        no_contention = schedule_experts(roomy, experts, H, FF, BF16)
        assert no_contention.predicted_s < 0.6 * schedule_experts(roomy, experts, H, FF, BF16, False).predicted_s


def test_batch_one_with_a_quarter_resident_beats_the_anchors_target():
    # ANCHORS: 25% budget, batch 1 -- best fixed strategy 6.99 ms, whole-expert bound 6.07, target <= 4.7 ms
    s = schedule_experts(REF, [(0, 1, True), (5, 1, False)], H, FF, BF16)
    assert s.predicted_s <= 4.7e-3
    bound = whole_expert_bound(REF, [(0, 1, True), (5, 1, False)], H, FF, BF16)
    assert s.predicted_s < bound


def test_whole_expert_bound_is_the_best_split_without_contention():
    rng = random.Random(3)
    for _ in range(60):
        experts = [(e, rng.choice([0, 1, 2, 4, 9, 30, 64]), rng.random() < 0.25) for e in range(rng.randint(1, 8))]
        costs = [(expert_cost(REF, t, H, FF, BF16), r) for _, t, r in experts if t > 0]
        gpu_all = sum(c.gpu_resident_s for c, _ in costs)
        far = [c for c, r in costs if not r]
        want = min(max(sum(c.cpu_s for c, m in zip(far, mask) if not m),
                       sum(c.transfer_s for c, m in zip(far, mask) if m), gpu_all)
                   for mask in itertools.product((0, 1), repeat=len(far)))
        assert whole_expert_bound(REF, experts, H, FF, BF16) == pytest.approx(want, rel=1e-12)


def test_schedule_is_fast_enough_for_every_decode_step():
    worst = [(e, t, False) for e, t in enumerate([30, 20, 10, 5, 3, 2, 1, 1])]   # 8 experts, none resident
    typical = [(0, 9, True), (1, 4, True)] + [(e, t, False) for e, t in enumerate([8, 5, 3, 2, 1, 1], 2)]
    for experts, limit in ((worst, 1.5e-3), (typical, 1.0e-3)):
        schedule_experts(REF, experts, H, FF, BF16)
        best = float("inf")
        for _ in range(3):                       # best of three batches: the CI box is shared
            t0 = time.perf_counter()
            for _ in range(50):
                schedule_experts(REF, experts, H, FF, BF16)
            best = min(best, (time.perf_counter() - t0) / 50)
        # ~100 us on an idle Xeon core; the limit leaves room for a loaded 2-core CI machine
        assert best < limit, best


def test_predict_step_overlaps_cpu_gpu_and_prefetch():
    a, e = attn(1, 32768), mixtral(1)
    gpu_only = predict_step(REF, [Decision.of("a0", 0, "gpu", a)])
    assert gpu_only.total_s == pytest.approx(a.gpu_resident_s)
    # a CPU expert next to a resident one: overlapped, one sync to hand the result back
    both = predict_step(REF, [Decision.of("e0", 1, "gpu", e), Decision.of("e1", 1, "cpu", e)])
    assert both.total_s == pytest.approx(e.cpu_s + REF.sync_s)
    # CPU and link in one phase contend for host DRAM
    mixed = predict_step(REF, [Decision.of("e1", 0, "cpu", e), Decision.of("e2", 0, "stream", e)])
    assert mixed.total_s > max(e.cpu_s, e.gpu_streamed_s)
    # the next layer's expert prefetched during this layer's attention hides that attention
    layers = [Decision.of("a0", 0, "gpu", a), Decision.of("e0", 1, "stream", e), Decision.of("a1", 2, "gpu", a)]
    plain = predict_step(REF, layers + [Decision.of("e1", 3, "stream", e)])
    pref = predict_step(REF, layers + [Decision.of("e1", 3, "stream", e, prefetch=True)])
    assert plain.total_s - pref.total_s == pytest.approx(a.gpu_resident_s, rel=1e-6)
    assert [p.phase for p in pref.phases] == [0, 1, 2, 3] and pref.phases[-1].end_s == pref.total_s


def test_predict_step_agrees_with_the_schedule():
    experts = [(0, 3, True), (1, 1, False), (2, 6, False), (3, 2, False)]
    s = schedule_experts(REF, experts, H, FF, BF16, allow_split=False)
    tok = {e: t for e, t, _ in experts}
    ds = [Decision.of("e%d" % i, 0, "gpu", mixtral(tok[i])) for i in s.resident]
    ds += [Decision.of("e%d" % i, 0, "cpu", mixtral(tok[i])) for i in s.cpu]
    ds += [Decision.of("e%d" % i, 0, "stream", mixtral(tok[i])) for i in s.streamed]
    got = predict_step(REF, ds).total_s
    assert s.cpu and s.streamed and got == pytest.approx(s.predicted_s, rel=0.01)


def test_decisions_are_validated():
    with pytest.raises(ValueError, match="where"):
        Decision("x", 0, "tpu")
    with pytest.raises(ValueError, match="CPU subgraph"):
        Decision("x", 0, "cpu", cpu_s=1.0, link_s=1.0)
    with pytest.raises(ValueError, match="prefetched"):
        Decision("x", 0, "gpu", gpu_s=1.0, prefetch=True)
    with pytest.raises(ValueError, match="CPU part"):
        Decision.of("x", 0, "split", mixtral(1))
    with pytest.raises(ValueError, match="listed twice"):
        schedule_experts(REF, [(1, 1, False), (1, 2, False)], H, FF, BF16)


def test_a_layer_without_staging_room_runs_its_far_experts_on_the_cpu_at_the_cpu_cost():
    """link=False (no staging buffer): nothing is streamed or split, and the prediction is the CPU's time --
    it was once made by a profile with a 1 B/s link, which put 3.5e5 s into the trace's predicted column."""
    experts = [(0, 1, False), (1, 1, False), (2, 3, True)]
    s = schedule_experts(REF, experts, H, FF, BF16, link=False)
    assert s.streamed == [] and s.split is None and sorted(s.cpu) == [0, 1] and s.resident == [2]
    one = schedule_experts(REF, [(0, 1, False)], H, FF, BF16, link=False).predicted_s
    assert 0 < one < 0.1 and s.predicted_s == pytest.approx(max(s.cpu_s, s.gpu_s))
    assert s.cpu_s == pytest.approx(2 * one, rel=0.05)
