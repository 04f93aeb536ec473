"""Tensor parallel with DTensor (`torch.distributed.tensor.parallel`) and backend="fuse" on two gloo processes:
the tiny transformer block with its attention (q, k, v column-parallel, o row-parallel) and its MLP (up
column-parallel, down row-parallel). AOT autograd lowers the DTensor redistributions to functional
collectives: an all-reduce and its wait after each row-parallel projection in the forward graph, one per
column-parallel input gradient in the backward graph. They stay opaque ATen calls in the graph's order (without
graph/effects.py the backward's depth order issues three all-reduces before their waits); the losses, every
gradient and the parameters after 3 SGD steps match the same TP model run eagerly.

Not covered: a new sequence length under TP. Dynamo then traces with symbolic sizes and AOT autograd's DTensor
tracing recurses without end in torch 2.13 -- with backend="aot_eager" and "inductor" alike, before any backend
sees a graph -- so the TP graphs here are static.
"""
import copy

import pytest
import torch

import dist_harness as H

def _tp_plan(prefix=""):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan = {"mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(), "attn.o": RowwiseParallel()}
    plan.update({"attn." + p: ColwiseParallel() for p in "qkv"})
    return {prefix + k: v for k, v in plan.items()}


def _tp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from fusebackend.capture import records
    dev = H.device()
    mesh = init_device_mesh(dev.type, (world,))
    torch.manual_seed(0)
    base = H.Block().to(dev)
    data = H.batches(rank, same_on_all_ranks=True, dev=dev)
    m0 = parallelize_module(copy.deepcopy(base), mesh, _tp_plan())
    m1 = parallelize_module(copy.deepcopy(base), mesh, _tp_plan())
    ref = H.train(m0, data)
    with records.collect() as reps:
        got = H.train(torch.compile(m1, backend="fuse"), data, named=dict(m1.named_parameters()))
    return H.compare(got, ref), H.graph_summary(reps), H.tolerance()


@pytest.mark.parametrize("backend", H.nccl_param())
def test_tensor_parallel_block_matches_eager(backend):
    for rank, (err, graphs, tol) in enumerate(H.spawn(_tp_worker, 2, backend=backend)):
        print("rank %d tp: %s\n%s" % (rank, err, H.format_summary(graphs)))
        assert max(err.values()) < tol, (rank, err)
        H.check_graphs(graphs, expect_collectives=True)
        by_kind = {g["kind"]: [c.split(".")[1] for c in g["collectives"]] for g in graphs}
        assert by_kind["forward"] == ["all_reduce", "wait_tensor"] * 2, by_kind
        assert by_kind["backward"] == ["all_reduce", "wait_tensor"] * (len(by_kind["backward"]) // 2) \
            and len(by_kind["backward"]) >= 4, by_kind
        assert all(g["kernels"] >= 3 for g in graphs), graphs
