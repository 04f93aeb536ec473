"""DDP with backend="fuse" on two gloo processes: the tiny transformer (tests/dist_harness.py) wrapped in DDP
then compiled (Dynamo's DDPOptimizer splits the graph at bucket boundaries: one forward and one backward graph
per bucket), and compiled then wrapped. Losses, every gradient and the parameters after 3 SGD steps match the
same wrapping run eagerly; no graph falls back to ATen. The third step has a new sequence length, so the bucket
graphs are recompiled with symbolic sizes.

DDP's all-reduces run in its reducer's autograd hooks, outside the graphs: the graphs hold no collectives.
Buckets are made small (24 KiB) so a model this size has several.
"""
import copy

import pytest
import torch

import dist_harness as H

# float32, relative (norm): H.tolerance() -- 1e-5 on the CPU, where eager against itself is bitwise and fuse
# is ~5e-7 off


def _ddp_worker(rank, world, order):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fusebackend.capture import records
    dist._DEFAULT_FIRST_BUCKET_BYTES = 24 * 1024       # DDPOptimizer wants the first bucket <= the others
    cap = 24 / 1024
    dev = H.device()
    torch.manual_seed(0)
    base = H.Tiny().to(dev)
    data = [(x[:, :s], y[:, :s]) for (x, y), s in zip(H.batches(rank, dev=dev), (8, 8, 6))]
    m0, m1 = copy.deepcopy(base), copy.deepcopy(base)
    ref = H.train(DDP(m0, bucket_cap_mb=cap), data, named=dict(m0.named_parameters()))
    with records.collect() as reps:
        if order == "wrap_then_compile":
            model = torch.compile(DDP(m1, bucket_cap_mb=cap), backend="fuse")
        else:
            model = DDP(torch.compile(m1, backend="fuse"), bucket_cap_mb=cap)
        got = H.train(model, data, named=dict(m1.named_parameters()))
    return H.compare(got, ref), H.graph_summary(reps), H.tolerance()


def _check(order, backend):
    for rank, (err, graphs, tol) in enumerate(H.spawn(_ddp_worker, 2, order, backend=backend)):
        print("rank %d %s: %s\n%s" % (rank, order, err, H.format_summary(graphs)))
        assert max(err.values()) < tol, (rank, err)
        H.check_graphs(graphs, expect_collectives=False)
        static = [g for g in graphs if not g["dynamic"]]
        fw = [g for g in static if g["kind"] == "forward"]
        assert len(fw) >= 3 and len([g for g in static if g["kind"] == "backward"]) == len(fw), graphs
        assert any(g["dynamic"] for g in graphs), "the new sequence length did not give symbolic graphs"
        assert all(g["kernels"] >= 1 for g in graphs), graphs


@pytest.mark.parametrize("backend", H.nccl_param())
def test_ddp_wrapped_then_compiled_matches_eager(backend):
    _check("wrap_then_compile", backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", H.nccl_param())
def test_ddp_compiled_then_wrapped_matches_eager(backend):
    _check("compile_then_wrap", backend)
