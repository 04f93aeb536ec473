"""Graphs with torch.distributed functional collectives: the collectives stay ATen calls, the rest fuses.

A tensor-parallel MLP (column-parallel up projection, row-parallel down projection, all-reduce) on two
processes must match the same MLP run unsharded in eager. CPU + gloo here; the same test runs on two GPUs
with NCCL when FUSEBACKEND_TEST_NCCL=1 and two GPUs are present.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_mlp(x, w_up, w_down, ln_w, group_name):
    import torch.distributed._functional_collectives as fc
    h = F.gelu(F.layer_norm(x, (x.shape[-1],), ln_w) @ w_up.t())
    partial = h @ w_down.t()
    out = fc.all_reduce(partial, "sum", group_name)
    return torch.relu(out * 0.5 + x)


def _worker(rank, world, port, backend, result_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    d, h = 64, 128
    x = torch.randn(16, d)
    w_up, w_down, ln_w = torch.randn(h, d) / 8, torch.randn(d, h) / 8, torch.randn(d)
    ref = torch.relu((F.gelu(F.layer_norm(x, (d,), ln_w) @ w_up.t()) @ w_down.t()) * 0.5 + x)
    shard = h // world
    args = [t.to(device) for t in (x, w_up[rank * shard:(rank + 1) * shard],
                                   w_down[:, rank * shard:(rank + 1) * shard], ln_w)]
    import fusebackend
    group_name = dist.group.WORLD.group_name
    with torch.no_grad():
        compiled = torch.compile(_tp_mlp, backend="fuse")
        out = compiled(*args, group_name)
        rep = fusebackend.explain(_tp_mlp, *args, group_name)
    err = ((out.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    collectives = [g for g in rep.groups if any("all_reduce" in op for op in g["ops"])]
    result_q.put((rank, err, rep.num_kernels, len(collectives), [c["kind"] for c in collectives]))
    dist.destroy_process_group()


def _run(world, backend):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_tensor_parallel_mlp_gloo_matches_eager():
    for rank, err, kernels, ncoll, kinds in _run(2, "gloo"):
        assert err < 1e-5, (rank, err)
        assert ncoll == 1 and kinds == ["opaque"], kinds     # the all-reduce is an ATen call
        assert kernels >= 2                                   # layer norm + gelu row kernel, epilogue


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or os.environ.get("FUSEBACKEND_TEST_NCCL") != "1",
                    reason="needs 2 GPUs and FUSEBACKEND_TEST_NCCL=1")
def test_tensor_parallel_mlp_nccl_matches_eager():
    for rank, err, kernels, ncoll, kinds in _run(2, "nccl"):
        assert err < 1e-4, (rank, err)
        assert ncoll == 1
