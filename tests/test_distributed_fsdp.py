"""FSDP2 (`fully_shard` per block and at the root) with backend="fuse" on two gloo processes, and the storage
ops an FSDP-style graph holds.

In torch 2.13 FSDP2's hooks are dynamo-disabled: the all-gathers and reduce-scatters run eagerly around the
compiled block graphs, which see the unsharded parameters. Losses, every gradient and the parameters after 3
SGD steps match the same wrapping run eagerly. The graph of an FSDP-style parameter all-gather (what AOT keeps
when it traces one: resize_storage_bytes_, an all-gather into a preallocated buffer, its wait, fsdp.copy_
into the parameter, compute, the buffer freed) runs through fuse in the graph's order: without the order edges
of graph/effects.py the program reads the parameter before fsdp.copy_ writes it.
"""
import copy

import pytest
import torch

import dist_harness as H

def _fsdp_worker(rank, world):
    from torch.distributed.fsdp import fully_shard
    from fusebackend.capture import records
    dev = H.device()
    torch.manual_seed(0)
    base = H.Tiny().to(dev)
    data = [(x[:, :s], y[:, :s]) for (x, y), s in zip(H.batches(rank, dev=dev), (8, 8, 6))]

    def sharded():
        m = copy.deepcopy(base)
        for b in m.blocks:
            fully_shard(b)
        return fully_shard(m)
    m0, m1 = sharded(), sharded()
    ref = H.train(m0, data)
    with records.collect() as reps:
        for b in m1.blocks:
            b.compile(backend="fuse")
        got = H.train(m1, data)
    return H.compare(got, ref), H.graph_summary(reps), H.tolerance()


@pytest.mark.parametrize("backend", H.nccl_param())
def test_fsdp2_per_block_compiled_matches_eager(backend):
    for rank, (err, graphs, tol) in enumerate(H.spawn(_fsdp_worker, 2, backend=backend)):
        print("rank %d fsdp2: %s\n%s" % (rank, err, H.format_summary(graphs)))
        assert max(err.values()) < tol, (rank, err)
        H.check_graphs(graphs)
        kinds = [g["kind"] for g in graphs if not g["dynamic"]]
        assert kinds.count("forward") == kinds.count("backward") >= 1, graphs
        assert any(g["dynamic"] for g in graphs)


def _storage_step(world, group_name):
    def step(shard, full, param, x):
        torch.ops.inductor.resize_storage_bytes_(full, full.numel() * full.element_size())
        torch.ops.inductor.resize_storage_bytes_(param, param.numel() * param.element_size())
        ag = torch.ops._c10d_functional.all_gather_into_tensor_out(shard, world, group_name, out=full)
        ag = torch.ops._c10d_functional.wait_tensor(ag)
        torch.ops.fsdp.copy_(param, ag)
        y = torch.relu(x @ param.t()) * 2 + 1
        s = (param * 3).sum(-1)
        torch.ops.inductor.resize_storage_bytes_(ag, 0)
        return y, s
    return step


def _storage_worker(rank, world):
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401  (registers fsdp.copy_)
    from torch.fx.experimental.proxy_tensor import make_fx
    from fusebackend.capture import records
    from fusebackend.capture.backend import compile_graph
    from fusebackend.options import FuseOptions
    step = _storage_step(world, dist.group.WORLD.group_name)
    g = torch.Generator().manual_seed(rank)
    shard, x = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)

    def fresh():
        full, param = torch.empty(world * 4, 8), torch.empty(world * 4, 8)
        full.untyped_storage().resize_(0)
        param.untyped_storage().resize_(0)
        return [shard, full, param, x]
    gm = make_fx(step)(*fresh())
    ref = step(*fresh())
    with records.collect() as reps:
        run = compile_graph(FuseOptions.from_dict(None), "inference", gm, fresh())
    args = fresh()
    full = args[1]
    out = run(args)
    errs = [((o - r).norm() / r.norm()).item() for o, r in zip(out, ref)]
    return errs, full.untyped_storage().nbytes(), H.graph_summary(reps), run.program.steps[-1].kind


def test_fsdp_storage_ops_run_in_graph_order():
    for rank, (errs, freed_bytes, graphs, last) in enumerate(H.spawn(_storage_worker, 2)):
        assert max(errs) < 1e-6, (rank, errs)
        assert freed_bytes == 0                        # the gather buffer was freed, after its readers
        H.check_graphs(graphs, expect_collectives=True)
        order = [c.split(".")[1] for c in graphs[0]["collectives"]]
        assert order == ["resize_storage_bytes_"] * 2 + ["all_gather_into_tensor_out", "wait_tensor", "copy_",
                                                         "resize_storage_bytes_"], order
        assert graphs[0]["kernels"] >= 1        # y's and s's kernels (both after the copy_) may share a launch


def test_write_after_read_keeps_its_place():
    """A copy_ into an input the graph read earlier, behind a deeper chain of matmuls: the horizontal
    pass's depth order would run the copy_ first (it only depends on a depth-0 kernel)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from fusebackend.capture.backend import compile_graph
    from fusebackend.options import FuseOptions

    def f(x, w):
        y = ((w @ w) @ w) @ x
        x.copy_(x * 2 + 1)
        return y
    w, x = torch.randn(8, 8), torch.randn(8, 8)
    gm = make_fx(f)(x.clone(), w)
    run = compile_graph(FuseOptions.from_dict(None), "inference", gm, [x, w])
    x1, x2 = x.clone(), x.clone()
    ref = f(x1, w)
    out = run([x2, w])
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2, x1)
    # the step that writes x (the kernel computing x * 2 + 1, which stores into x: passes/inplace.py) runs after
    # the last matmul that reads x
    step_of = {n: i for i, s in enumerate(run.program.steps)
               for n in ([m.name for m in getattr(s, "group_nodes", ())] or [getattr(s, "name", None)])}
    assert step_of["copy_"] > step_of["mm_2"], step_of
