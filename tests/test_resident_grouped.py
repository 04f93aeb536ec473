"""The all-resident MoE layer's grouped path (runtime/resident_moe.py): the experts stacked in one buffer, the
routing sorted on the device, two grouped matmuls -- no routing copy to the host, eager's numerics."""
import warnings

import pytest
import torch

from fusebackend.runtime import hybrid_moe as hm
from fusebackend.runtime import resident_moe as rm
from hybrid_sim import assert_like_eager, CountingApi, Forced, make_experts, make_routing, SimApi  # noqa: E402

pytestmark = pytest.mark.skipif(rm.grouped_mm_fn() is None, reason="this torch has no grouped matmul")


def layer_of(experts, **kw):
    return hm.HybridMoELayer(experts, api=CountingApi(), scheduler=Forced("streamed"), resident=range(len(experts)),
                             trace=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_grouped_matches_eager_without_a_host_round_trip(tokens, dtype):
    experts = make_experts(8, 32, 48, dtype, seed=tokens)
    layer = layer_of(experts)
    x = torch.randn(tokens, 32).to(dtype)
    idx, w = make_routing(tokens, 8, 2, seed=tokens + 1)
    for _ in range(2):
        assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    assert layer.api.syncs == 0 and not layer._route and layer.scheduler.seen == []
    assert [t["mode"] for t in layer.collect_trace()] == ["grouped", "grouped"]
    assert all(t["predicted_s"] is None for t in layer.trace)            # no profile: no prediction


def test_the_stack_holds_the_experts_and_unrouted_ones_are_skipped():
    experts = make_experts(6, 16, 32, torch.bfloat16, seed=3)
    layer = layer_of(experts)
    assert layer._stack.shape == (6, 3 * 32 * 16)
    for e, (g, u, d) in enumerate(experts):                             # each expert's row, expert_layout's order
        assert layer.gpu[e].data_ptr() == layer._stack[e].data_ptr()
        assert torch.equal(layer._stack[e], torch.cat([g.reshape(-1), u.reshape(-1), d.reshape(-1)]))
    x = torch.randn(4, 16).to(torch.bfloat16)
    idx = torch.tensor([[5, 0], [0, 5], [5, 2], [2, 0]])                 # experts 1, 3, 4 get nothing
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]).to(torch.bfloat16)
    assert_like_eager(layer(x, idx, w), x, idx, w, experts)


def test_forced_sorted_and_dense_still_run_and_a_partial_layer_has_no_stack():
    experts = make_experts(8, 32, 48, torch.bfloat16, seed=5)
    x = torch.randn(2, 32).to(torch.bfloat16)
    idx, w = make_routing(2, 8, 2, seed=6)
    srt, dns = layer_of(experts, fast_path="sorted"), layer_of(experts, fast_path="dense")
    assert_like_eager(srt(x, idx, w), x, idx, w, experts)
    assert_like_eager(dns(x, idx, w), x, idx, w, experts)
    assert srt.api.syncs == 1 and dns.api.syncs == 0 and srt._stack is None and dns._stack is None
    assert [t["mode"] for t in srt.collect_trace() + dns.collect_trace()] == ["resident", "dense"]
    part = hm.HybridMoELayer(experts, api=SimApi(), scheduler=Forced("cpu"), resident=[0, 1])
    assert part._stack is None
    with pytest.raises(ValueError, match="fast_path"):
        layer_of(experts, fast_path="fastest")


def test_a_refused_grouped_matmul_falls_back_once_with_one_warning(monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("grouped gemm is not supported for this dtype")
    experts = make_experts(8, 32, 48, torch.bfloat16, seed=7)
    layer = layer_of(experts)
    monkeypatch.setattr(rm, "grouped_mm_fn", lambda: refuse)
    x = torch.randn(3, 32).to(torch.bfloat16)
    idx, w = make_routing(3, 8, 2, seed=8)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            assert_like_eager(layer(x, idx, w), x, idx, w, experts)
    msgs = [str(g.message) for g in got if "grouped matmul" in str(g.message)]
    assert len(msgs) == 1 and "not supported for this dtype" in msgs[0]
    assert layer._stack is None and layer.api.syncs == 3                 # the sorted path: one copy per call


@pytest.mark.gpu
def test_grouped_on_the_gpu_matches_eager_and_never_syncs():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    experts = [tuple(t.cuda() for t in e) for e in make_experts(8, 256, 512, torch.bfloat16, seed=9)]
    layer = hm.HybridMoELayer(experts, scheduler=Forced("streamed"), resident=range(8), staging_slots=0)
    for tokens in (1, 4, 64, 300):
        x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
        idx, w = (t.cuda() for t in make_routing(tokens, 8, 2, seed=tokens))
        out = layer(x, idx, w)
        torch.cuda.synchronize()
        assert layer._stack is not None, "the grouped matmul was refused on this GPU"
        assert_like_eager(out, x, idx, w, experts)
        torch.cuda.set_sync_debug_mode("error")              # any device->host sync in the call raises
        try:
            layer(x, idx, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not layer._route
    x = torch.randn(3, 256, device="cuda").to(torch.bfloat16)             # padding ids count for nothing
    idx = torch.tensor([[2, -1], [8, 5], [5, 2]], device="cuda")
    w = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]], device="cuda").to(torch.bfloat16)
    keep = torch.tensor([[0.6, 0.0], [0.0, 0.7], [0.5, 0.5]], device="cuda").to(torch.bfloat16)
    assert_like_eager(layer(x, idx, w), x, torch.where((idx >= 0) & (idx < 8), idx, 0), keep, experts)


def test_padding_ids_contribute_nothing_as_in_the_sorted_path():
    """Routing ids outside [0, E) (padding) count for no expert on every path: the grouped one computes no
    group for them and masks their rows, whatever the grouped matmul left there."""
    experts = make_experts(8, 32, 48, torch.float32, seed=11)
    x = torch.randn(3, 32)
    idx = torch.tensor([[2, -1], [8, 5], [5, 2]])
    w = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    outs = {}
    for fp in ("grouped", "sorted", "dense"):
        layer = layer_of(experts, fast_path=fp)
        outs[fp] = layer(x, idx, w)
    keep = torch.tensor([[0.6, 0.0], [0.0, 0.7], [0.5, 0.5]])
    safe = torch.where((idx >= 0) & (idx < 8), idx, 0)
    assert_like_eager(outs["grouped"], x, safe, keep, experts)
    torch.testing.assert_close(outs["grouped"], outs["sorted"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["grouped"], outs["dense"], rtol=1e-5, atol=1e-6)
