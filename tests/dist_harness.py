"""Shared pieces of the distributed tests (tests/test_distributed_*.py) and bench/distributed.py.

`spawn(fn, world, *args)` runs `fn(rank, world, *args)` in `world` fresh processes over gloo (CPU) or NCCL
(one GPU each) and returns each rank's result, re-raising a worker's exception with its traceback. The tiny
transformer `Block`, `train` (3 optimizer steps: losses, every gradient, the parameters after), `compare`
(relative errors against eager) and `graph_summary` (each compiled graph's kernel and ATen counts, fallbacks
with their reasons, and the collectives in program order) are what every wrapping test checks.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "c10d_functional", "fsdp", "_dtensor")


def nccl_param(**marks):
    """pytest params for the process-group backend: gloo always; nccl with 2 GPUs and FUSEBACKEND_TEST_NCCL=1."""
    import pytest
    run = torch.cuda.device_count() >= 2 and os.environ.get("FUSEBACKEND_TEST_NCCL") == "1"
    return ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not run, reason="needs 2 GPUs and FUSEBACKEND_TEST_NCCL=1")])]


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tolerance() -> float:
    """float32, relative (norm): 1e-5 on the CPU; 1e-4 on GPUs (cuBLAS and fuse's kernels sum in other orders)."""
    return 1e-4 if device().type == "cuda" else 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, fn, args, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), NCCL_NVLS_ENABLE="0")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)             # two ranks on a 2-core box: one core each
        dist.init_process_group(backend, rank=rank, world_size=world)
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world=2, *args, backend="gloo", timeout=240):
    """fn(rank, world, *args) on each rank (fn must be importable: a module-level function)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, status, value = q.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError("rank %d failed:\n%s" % (rank, value))
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=b) for b in (True, False, True, True))

    def forward(self, x):
        b, s, _ = x.shape
        # -1 for the head count: under tensor parallelism the local projections hold heads / world heads
        q, k, v = (p(x).view(b, s, -1, x.shape[-1] // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(.))."""

    def __init__(self, d=32, heads=2, hidden=64):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attention(d, heads), MLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Tiny(nn.Module):
    """`layers` blocks and a linear head (enough for DDP buckets and per-block FSDP2 units)."""

    def __init__(self, layers=2, d=32, heads=2, hidden=64):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def batches(rank, steps=3, b=2, s=8, d=32, same_on_all_ranks=False, dev="cpu"):
    """Per-step (input, target); DDP and FSDP2 give each rank its own data, TP the same on all ranks."""
    g = torch.Generator().manual_seed(100 + (0 if same_on_all_ranks else rank))
    return [(torch.randn(b, s, d, generator=g).to(dev), torch.randn(b, s, d, generator=g).to(dev))
            for _ in range(steps)]


def _local(t):
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def train(model, data, lr=0.05, named=None):
    """3 (len(data)) SGD steps with momentum: per step the loss and every parameter's gradient, then the
    parameters. Not Adam: its first step moves every element by lr * sign(grad), so a gradient element near
    zero (1e-8, within float32 rounding of eager's own) turns a 1e-7 difference into lr-sized ones."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=False)
    named = named if named is not None else dict(model.named_parameters())
    losses, grads = [], []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(_local(loss))
        grads.append({k: _local(p.grad) for k, p in named.items() if p.grad is not None})
        opt.step()
    return {"losses": losses, "grads": grads, "params": {k: _local(p) for k, p in named.items()}}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(got, ref) -> dict:
    """Largest relative (norm) error of the losses, of each step's gradients and of the final parameters."""
    out = {"loss": max(_rel(a, b) for a, b in zip(got["losses"], ref["losses"]))}
    assert all(g.keys() == r.keys() and g for g, r in zip(got["grads"], ref["grads"])), "gradient sets differ"
    out["grad"] = max(_rel(g[k], r[k]) for g, r in zip(got["grads"], ref["grads"]) for k in r)
    assert got["params"].keys() == ref["params"].keys()
    out["param"] = max(_rel(got["params"][k], ref["params"][k]) for k in ref["params"])
    return out


def _is_collective(target) -> bool:
    ns = getattr(target, "namespace", None) or getattr(getattr(target, "_schema", None), "name", "").split("::")[0]
    return ns in COLLECTIVE_NAMESPACES or "resize_storage" in str(target) or str(target).startswith("aten.set_")


def graph_summary(reports) -> list:
    """One dict per compiled graph: kind, kernels, ATen calls, fallbacks (where, reason), the collective
    (and storage) ops in program step order and in the graph's own order, and the kinds of their groups."""
    out = []
    for r in reports:
        fg = r.graph
        nodes = list(fg.nodes()) if len(fg) else []
        graph_order = [n.name for n in nodes if _is_collective(n.target)]
        step_order, kinds = [], []
        for s in getattr(r.program, "steps", None) or []:
            names = [getattr(s, "name", None)] + [n.name for n in getattr(s, "group_nodes", [])]
            step_order += [n for n in names if n in graph_order and n not in step_order]
        for g in r.groups:
            kinds += [g.kind for n in g.nodes if n in graph_order]
        ops = {n.name: str(n.target) for n in nodes}
        out.append({"kind": r.kind, "dynamic": bool(fg.symbols) if len(fg) else False, "kernels": r.num_kernels, "aten": r.num_aten_calls, "views": r.num_views,
                    "fallbacks": [(w, reason.splitlines()[0] if reason else "") for w, reason in r.fallbacks],
                    "collectives": [ops[n] for n in graph_order], "graph_order": graph_order,
                    "step_order": step_order, "collective_kinds": kinds})
    return out


def check_graphs(summaries, expect_collectives=None):
    """Fallback-free, every collective an opaque ATen call, run in the graph's order."""
    assert summaries, "nothing was compiled with fuse"
    for s in summaries:
        assert not s["fallbacks"], s
        assert set(s["collective_kinds"]) <= {"opaque"}, s
        if s["step_order"] or s["graph_order"]:
            assert s["step_order"] == s["graph_order"], s
    if expect_collectives is not None:
        assert any(s["collectives"] for s in summaries) == expect_collectives, summaries


def format_summary(summaries) -> str:
    lines = []
    for i, s in enumerate(summaries):
        coll = ", ".join(c.split(".")[1] if "." in c else c for c in s["collectives"])
        lines.append("  graph %d %-9s%s %3d kernels %3d ATen calls %3d views%s%s" % (
            i, s["kind"], " dyn" if s["dynamic"] else "    ", s["kernels"], s["aten"], s["views"], ("  collectives: " + coll) if coll else "",
            ("  fallbacks: %s" % s["fallbacks"]) if s["fallbacks"] else ""))
    return "\n".join(lines)
