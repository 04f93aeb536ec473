"""Outputs keep eager's layout and aliasing as far as Dynamo guards on them: outputs of a horizontal batch
have storages of their own (offset 0), as eager's do; intermediates still share one allocation. A decode loop
with a growing KV cache makes no more graphs under fuse than under a backend running eager's kernels."""
import pytest
import torch

import hf_generate as G
from fusebackend.capture import records
from fusebackend.runtime.batch import BatchKernelStep, Outputs
from numerics import assert_matches


def scaled(*xs):
    return [x * 2 + 1 for x in xs]


def scaled_then_summed(*xs):
    ys = [x * 2 + 1 for x in xs]                  # a batch of intermediates
    return torch.cat([y.sum(-1, keepdim=True).exp() for y in ys], -1)


def _batches(fn, args):
    compiled = torch.compile(fn, backend="fuse")
    with records.collect() as reps:
        assert_matches(fn, compiled, args)
    return compiled, [s for r in reps for s in r.program.steps if isinstance(s, BatchKernelStep)]


def test_batched_graph_outputs_have_storages_of_their_own():
    args = tuple(torch.randn(8 + i, 16) for i in range(4))
    compiled, batches = _batches(scaled, args)
    assert batches, "the test needs a horizontal batch"
    outs, ref = compiled(*args), scaled(*args)
    ptrs = {o.untyped_storage().data_ptr() for o in outs}
    assert len(ptrs) == len(outs)                                        # separate, as eager's
    assert [o.storage_offset() for o in outs] == [r.storage_offset() for r in ref] == [0] * len(outs)
    assert [o.stride() for o in outs] == [r.stride() for r in ref]


def test_batched_intermediates_still_share_one_allocation():
    args = tuple(torch.randn(8, 16 + 4 * i) for i in range(4))
    _, batches = _batches(scaled_then_summed, args)
    assert batches and all(b.outputs.mode in ("rows", "flat") for b in batches), [b.outputs.mode for b in batches]


def test_outputs_mix_own_and_shared_allocations():
    f32, cpu = torch.float32, torch.device("cpu")
    allocs = [((4, 8), (8, 1), f32), ((12, 8), (8, 1), f32), ((2, 8), (8, 1), f32), ((4, 8), (8, 1), f32)]
    out = Outputs(allocs, cpu, own=[1, 3])
    assert out.mode == "mixed"
    ts, addrs = out()
    assert [tuple(t.shape) for t in ts] == [(4, 8), (12, 8), (2, 8), (4, 8)] and [t.data_ptr() for t in ts] == addrs
    assert ts[0].untyped_storage().data_ptr() == ts[2].untyped_storage().data_ptr()      # shared
    assert ts[1].storage_offset() == ts[3].storage_offset() == 0
    assert len({t.untyped_storage().data_ptr() for t in (ts[0], ts[1], ts[3])}) == 3
    assert Outputs(allocs[:2], cpu, own=[0]).mode == "each"             # one shared output is no pool


def test_gpt2_decode_with_a_growing_cache_makes_no_more_graphs_than_eager_kernels():
    """aot_eager runs the same AOT graphs with eager's kernels, so its outputs have eager's layout: the graph
    count Dynamo reaches when nothing but the backend differs (Inductor: the same 3, measured, but minutes
    to compile here)."""
    m = G.model("gpt2")
    ids, mask = G.prompt(seed=2)
    ref, ref_graphs, _ = G.generate(m, ids, mask, new_tokens=6, backend="aot_eager")
    out, graphs, warned = G.generate(m, ids, mask, new_tokens=6, backend="fuse")
    assert torch.equal(out, ref) and warned == []
    assert graphs <= ref_graphs, (graphs, ref_graphs)
