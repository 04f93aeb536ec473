"""The hybrid MoE layer (runtime/hybrid_moe.py): the whole layer on the CPU through a stand-in for the CUDA calls
(same orchestration code, no streams), and on a real GPU (`pytest -m gpu`). Its pure parts: test_hybrid_plan.py."""

import pytest
import torch

from fusebackend.runtime import hybrid_moe as hm
from fusebackend.runtime.cost_correction import CostCorrection
from hybrid_sim import assert_like_eager, CountingApi, Forced, make_experts, make_routing, sim_layer, SimApi  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_without_cuda_the_layer_fails_naming_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        hm.HybridMoELayer(make_experts(2, 8, 16, torch.float32), scheduler=Forced())


# ---------------------------------------------------------------- the layer's orchestration, on the CPU
MODES = {
    "all_resident": (dict(resident=range(8)), Forced()),
    "all_cpu": (dict(), Forced("cpu")),
    "all_streamed": (dict(), Forced("streamed")),
    "split": (dict(resident=[0, 1]), Forced("cpu", streamed={4}, split=(3, 0.375))),
    "mixed": (dict(resident=[0, 5]), Forced("streamed", cpu={1, 2, 7})),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_sim_layer_matches_eager(mode, dtype):
    kw, sched = MODES[mode]
    experts = make_experts(8, 32, 96, dtype)
    layer = sim_layer(experts, scheduler=sched, **kw)
    x = torch.randn(24, 32).to(dtype)
    idx, w = make_routing(24, 8, 2, force=[3, 4, 1, 2])
    for _ in range(2):                                              # slots refilled on the second call
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    if mode == "split":
        assert layer.api.copies2d >= 1                              # the down-proj columns: one strided copy


def test_sim_hf_3d_layout_views_and_trace():
    E, H, Fn = 4, 16, 48
    gate_up, down = torch.randn(E, 2 * Fn, H) * 0.2, torch.randn(E, H, Fn) * 0.2
    sched = Forced("cpu", streamed={1}, split=(2, 0.5))
    layer = hm.HybridMoELayer.from_3d(gate_up, down, api=SimApi(), scheduler=sched, resident=[0], trace=True,
                                      trace_cap=3)
    for g, u, d in layer.host:                                      # views of the user's storage, no copies
        assert g.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
        assert d.untyped_storage().data_ptr() == down.untyped_storage().data_ptr()
    experts = [(gate_up[e, :Fn], gate_up[e, Fn:], down[e]) for e in range(E)]
    x = torch.randn(10, H)
    idx, w = make_routing(10, E, 2, force=[0, 1, 2, 3])
    for _ in range(5):
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    tr = layer.collect_trace()
    assert len(tr) == 3 and tr[-1]["call"] == 5 and tr[-1]["split"] == (2, 0.5)
    # expert 1 still sits in a staging slot from the first call: reused as resident, not copied again
    assert tr[-1]["resident"] == [0, 1] and tr[-1]["prefetched"] == [1] and tr[-1]["streamed"] == []
    assert layer.pool.book.misses == 2 and layer.api.copies2d == 1
    assert tr[-1]["predicted_s"] == 1e-3 and tr[-1]["total_s"] == 0.0 and tr[-1]["tokens"] == 10
    assert sum(tr[-1]["counts"]) == 20 and tr[-1]["cpu_s"] > 0


def test_sim_prefetch_is_seen_as_resident_and_not_copied_again():
    experts = make_experts(6, 16, 32, torch.float32)
    sched = Forced("streamed")
    layer = sim_layer(experts, scheduler=sched, resident=[0])
    x = torch.randn(12, 16)
    idx, w = make_routing(12, 6, 2, force=[3, 4])
    assert layer.prefetch([0, 3, 4, 5]) == [3, 4]                   # 0 is resident; two slots
    misses = layer.pool.book.misses
    assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    flags = {e: res for e, _, res in sched.seen[-1]}
    assert flags[3] and flags[4] and flags[0]                       # staged experts count as resident
    streamed_now = [e for e, _, res in sched.seen[-1] if not res]
    assert layer.pool.book.misses - misses == len(streamed_now)     # only the others were copied


def test_sim_with_the_cost_model_deciding_as_for_mixtral_experts():
    """The real scheduler, asked as if the experts were Mixtral's (its splits and streams then happen), drives
    the layer on small tensors; the default scheduler is the cost model's, which needs a profile."""
    sched_mod = pytest.importorskip("fusebackend.passes.cost_schedule")
    profile = pytest.importorskip("fusebackend.passes.hardware_profile").reference_h200()
    seen = []

    def mixtral(p, experts, hidden, ffn, dtype, allow_split=True, link_busy_s=0.0):
        seen.append(sched_mod.schedule_experts(p, experts, 4096, 14336, dtype, allow_split, link_busy_s=link_busy_s))
        return seen[-1]
    experts = make_experts(8, 32, 128, torch.bfloat16)
    layer = sim_layer(experts, scheduler=mixtral, profile=profile, resident=[0, 1], trace=True)
    for T, seed in ((1, 3), (4, 4), (16, 5), (64, 6)):
        x = torch.randn(T, 32).to(torch.bfloat16)
        idx, w = make_routing(T, 8, 2, seed=seed)
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    assert any(d.split for d in seen) and any(d.streamed or d.cpu for d in seen)
    assert [t["predicted_s"] for t in layer.collect_trace()] == [d.predicted_s for d in seen]
    with pytest.raises(ValueError, match="profile"):
        sim_layer(experts)
    assert sim_layer(experts, profile=profile).scheduler is sched_mod.schedule_experts


def test_sim_shared_pool_popularity_swaps_and_gpu_bytes():
    experts = make_experts(6, 16, 32, torch.float32)
    a = sim_layer(experts, scheduler=Forced("streamed"), resident=[4, 5], max_swaps=1, decay=0.5, margin=0.0)
    b = sim_layer(experts, scheduler=Forced("cpu"), staging=a.pool, resident=[])
    per = 3 * 16 * 32 * 4
    assert a.gpu_bytes() == 2 * per + 2 * per and a.gpu_bytes(include_staging=False) == 2 * per
    assert b.gpu_bytes(include_staging=False) == 0 and b.pool is a.pool
    x = torch.randn(8, 16)
    idx, w = make_routing(8, 6, 2, force=[0, 1, 0, 1, 0, 1, 0, 1])
    for _ in range(3):
        assert_like_eager(a(x, idx, w), x, idx, w, experts)
        assert_like_eager(b(x, idx, w), x, idx, w, experts)
    assert a.score[0] > a.score[4] and a.propose_resident()[:1] in ([0], [1])
    load, evict = a.rebalance()
    assert len(load) == 1 and len(evict) == 1 and evict[0] in (4, 5)  # one swap per call, bounded
    assert len(a.gpu) == 2 and a.gpu_bytes(include_staging=False) == 2 * per and a.swaps == 1
    assert_like_eager(a(x, idx, w), x, idx, w, experts)             # the new resident is used correctly
    a.close()
    assert a.api.pinned_tensors == []


# ---------------------------------------------------------------- on the GPU
def gpu_layer(experts, **kw):
    return hm.HybridMoELayer(experts, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gpu_layer_matches_eager(mode, dtype, monkeypatch):
    kw, sched = MODES[mode]
    experts = make_experts(8, 256, 512, dtype)
    layer = gpu_layer(experts, scheduler=sched, **kw)
    dev = [tuple(t.cuda() for t in e) for e in experts]
    x = torch.randn(40, 256, device="cuda").to(dtype)
    idx, w = make_routing(40, 8, 2, force=[3, 4, 1, 2])
    idx, w = idx.cuda(), w.cuda()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("the layer synchronized the device"))
    for _ in range(3):
        assert_like_eager(layer(x, idx, w), x, idx, w, dev)
    layer.close()


@pytest.mark.gpu
def test_gpu_memory_stays_within_resident_plus_staging_and_pins_in_place():
    H, Fn, E, T = 1024, 2048, 8, 64
    experts = make_experts(E, H, Fn, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    layer = gpu_layer(experts, scheduler=Forced("streamed", cpu={6, 7}, split=(5, 0.5)), resident=[0, 1])
    per = 3 * H * Fn * 2
    assert torch.cuda.memory_allocated() - base == layer.gpu_bytes() == 4 * per      # 2 resident + 2 staging
    in_place = 0
    for w, hw in zip(experts, layer.host):
        for t, ht in zip(w, hw):         # pinned in place where its pages are its own, else one pinned copy
            assert ht.is_pinned() and torch.equal(ht, t)
            in_place += ht.data_ptr() == t.data_ptr()
    assert in_place >= 1
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    idx, w = make_routing(T, E, 2, force=[5, 6, 7, 2, 3])
    idx, w = idx.cuda(), w.cuda()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        layer(x, idx, w)
    torch.cuda.synchronize()
    activations = 64 * T * 2 * Fn * 4                               # generous: per-expert [T, 2F] temporaries
    assert torch.cuda.max_memory_allocated() - base <= 4 * per + activations
    layer.close()
    assert not experts[0][0].is_pinned()                            # unregistered again


# ---------------------------------------------------------------- learning, fast path, prefetch gating: the layer
class SlowWorker:
    """Runs the CPU job, then reports it `factor` times slower: the real concurrent run's CPU."""

    def __init__(self, factor):
        self.factor = factor

    def submit(self, fn, *args):
        from concurrent.futures import Future
        wait, compute, start = fn(*args)
        f = Future()
        f.set_result((wait, compute * self.factor + 0.02, start))
        return f


def test_sim_layer_learns_a_slow_cpu_and_stops_choosing_it():
    from fusebackend.passes.cost_schedule import schedule_experts
    from fusebackend.passes.hardware_profile import reference_h200
    seen = []

    def mixtral(p, experts, hidden, ffn, dtype, allow_split=True, link_busy_s=0.0):
        seen.append((p, schedule_experts(p, experts, 4096, 14336, dtype, allow_split, link_busy_s=link_busy_s)))
        return seen[-1][1]
    experts = make_experts(8, 32, 128, torch.bfloat16)
    corr = CostCorrection()
    layer = sim_layer(experts, scheduler=mixtral, profile=reference_h200(), resident=[0, 1], correction=corr,
                      worker=SlowWorker(20.0))
    x = torch.randn(1, 32).to(torch.bfloat16)
    idx, w = make_routing(1, 8, 2, seed=3, force=[5])
    for _ in range(12):
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    assert corr.factor["cpu"] > 3.0 and corr.observations["cpu"] >= 3
    first, last = seen[0], seen[-1]
    assert first[0].name == "reference-h200" and "corrected" in last[0].name
    rows = lambda d: len(d.cpu) + (d.split[1] if d.split else 0)         # noqa: E731
    assert rows(last[1]) < rows(first[1])


def test_sim_all_resident_fast_path_skips_the_scheduler_and_the_host_round_trip(monkeypatch):
    monkeypatch.setattr(hm, "grouped_layout_ok", lambda *a: False)      # a torch without grouped matmuls
    experts = make_experts(8, 32, 96, torch.bfloat16)
    sched = Forced("streamed")
    layer = hm.HybridMoELayer(experts, api=CountingApi(), scheduler=sched, resident=range(8), trace=True)
    x = torch.randn(32, 32).to(torch.bfloat16)
    idx, w = make_routing(32, 8, 2, seed=7)
    for _ in range(2):                                               # dense: no routing copy, no wait
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    assert layer.api.syncs == 0 and not layer._route and sched.seen == []
    x1 = x[:1]
    assert_like_eager(layer(x1, idx[:1], w[:1]), x1, idx[:1], w[:1], experts)   # batch 1: sorted, one wait
    assert layer.api.syncs == 1 and sched.seen == []
    assert [t["mode"] for t in layer.collect_trace()] == ["dense", "dense", "resident"]
    # a layer with non-resident experts, in a call that routes only to resident ones: no scheduler either
    part = sim_layer(experts, scheduler=sched, resident=[0, 1, 2])
    idx2 = torch.tensor([[0, 1], [2, 0]])
    w2 = torch.tensor([[0.6, 0.4], [0.5, 0.5]]).to(torch.bfloat16)
    assert_like_eager(part(x[:2], idx2, w2), x[:2], idx2, w2, experts)
    assert sched.seen == []
    idx3 = torch.tensor([[0, 5], [2, 0]])
    assert_like_eager(part(x[:2], idx3, w2), x[:2], idx3, w2, experts)
    assert len(sched.seen) == 1


@pytest.mark.gpu
def test_a_pinned_copy_follows_its_weight_and_keeps_its_address_taken():
    from fusebackend.runtime.cpu_worker import PINS
    buf = torch.randn(2048)                      # two weights in one page: the second cannot register in place
    a, b = buf[:1024].clone(), None
    a_pin = PINS.pin(a)
    b = torch.randn(16)                          # small: shares pages with other allocations, often refused
    b_pin = PINS.pin(b)
    assert torch.equal(a_pin, a) and torch.equal(b_pin, b)
    b.add_(1.0)                                  # the weight changes after it was pinned
    b_again = PINS.pin(b)
    assert torch.equal(b_again, b), "a pinned copy must be refreshed when its weight's version moved"
    ptr = b.untyped_storage().data_ptr()
    del b, b_pin, b_again                        # the registry still holds the storage: no other tensor gets it
    others = [torch.randn(16) for _ in range(64)]
    assert all(o.untyped_storage().data_ptr() != ptr for o in others)
    PINS.release(a)
