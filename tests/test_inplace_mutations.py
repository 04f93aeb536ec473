"""Inputs written in place by kernels (passes/inplace.py): AOT autograd keeps input mutations in the graph
(capture/backend.py), each trailing copy_(input, value) becomes a store, and the kernel that computes the value
writes the input's storage -- no ATen copy_ per mutated input per call.

Covered: an input mutated and also returned; mutated twice; read after the write; a view of an input mutated;
copy_ with a cast and a broadcast; a graph that reads copy_'s result; reads at another index (the store then
stays a copy kernel of its own, or an ATen call); SGD with momentum, Adam and AdamW (foreach on and off,
fused=False) over a few dozen random parameters against eager after 3 steps; the ATen copy_ count of a
compiled optimizer step (0, where AOT's copy-back made one per mutated tensor); on CUDA the same cases and
cudagraphs (which keeps AOT's copy-back).
"""
from __future__ import annotations

import collections
import shutil

import pytest
import torch

import fusebackend
from fusebackend.capture import backend as backend_mod
from fusebackend.capture import records

aten = torch.ops.aten
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def aten_calls(fn) -> collections.Counter:
    """The ATen ops one call of fn dispatches, by name, not counting those another ATen op calls inside it
    (the profiler; a TorchDispatchMode would make Dynamo run the function uncompiled)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    out = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            out[e.name] += 1
    return out


def _run_pair(fn, make, device):
    """fn eagerly and compiled on two copies of the same inputs: (eager inputs, eager out, compiled inputs,
    compiled out, compile reports)."""
    torch.manual_seed(0)
    ea = [t.to(device) if isinstance(t, torch.Tensor) else t for t in make()]
    torch.manual_seed(0)
    fa = [t.to(device) if isinstance(t, torch.Tensor) else t for t in make()]
    ref = fn(*ea)
    with records.collect() as reps:
        out = torch.compile(fn, backend="fuse")(*fa)
    return ea, ref, fa, out, reps


def _close(a, b, rtol=1e-5, same_device=True):
    """same_device=False for optimizer state: compiled on CUDA, Dynamo makes the optimizer capturable, so its step
    counters live on the GPU where eager keeps them on the CPU."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rtol, same_device)
        return
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert a.device == b.device or not same_device, (a.device, b.device)
    a = a.to(b.device)
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    err = (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale, "max error %.3g (scale %.3g)" % (err, scale)


def _no_aten_copy(reps):
    """No compiled graph runs a copy_ as an ATen call: every one is a store inside a kernel."""
    for r in reps:
        for g in r.groups:
            ops = [r.graph.node(n).op_name for n in g.nodes]
            if g.kind == "opaque":
                assert not any(op.startswith("copy_") for op in ops), g.describe(r.graph)


# ---------------------------------------------------------------- the aliasing cases the issue lists
def _mutated_and_returned(x):
    x.mul_(2).add_(1)
    return x


def _mutated_twice(x, y):
    x.mul_(y)
    x.add_(3)
    y.sub_(x)
    return x.sum(), y * 2


def _read_after_write(x, y):
    before = x * 1
    x.add_(y)
    return before, x * 2, x.exp()


def _view_mutated(x):
    x[:, 1].mul_(3)
    x.t()[2:].add_(1)
    return x.sum(0)


def _slice_assigned_from_itself(x):
    x[1:] = x[:-1] * 2          # the right side is read before any element is written
    return None


def _cast_and_broadcast(h, row):
    h.copy_(row * 2)            # float32 (1, 7) into float16 (5, 7)
    return h.float().sum()


CASES = {
    "mutated_and_returned": (_mutated_and_returned, lambda: [torch.randn(6, 5)]),
    "mutated_twice": (_mutated_twice, lambda: [torch.randn(4, 8), torch.rand(4, 8) + 0.5]),
    "read_after_write": (_read_after_write, lambda: [torch.randn(3, 9), torch.randn(3, 9)]),
    "view_mutated": (_view_mutated, lambda: [torch.randn(6, 6)]),
    "slice_assigned_from_itself": (_slice_assigned_from_itself, lambda: [torch.randn(7, 3)]),
    "cast_and_broadcast": (_cast_and_broadcast, lambda: [torch.randn(5, 7).half(), torch.randn(1, 7)]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_mutated_inputs_match_eager(case, device):
    fn, make = CASES[case]
    ea, ref, fa, out, reps = _run_pair(fn, make, device)
    rtol = 1e-3 if any(t.dtype == torch.float16 for t in ea) else 1e-5
    _close(fa, ea, rtol)                    # the inputs, as eager left them
    _close(out, ref, rtol)
    _no_aten_copy(reps)
    again = [t.clone() for t in fa], [t.clone() for t in ea]      # a second call on the mutated inputs
    _close(torch.compile(fn, backend="fuse")(*again[0]), fn(*again[1]), rtol)
    _close(again[0], again[1], rtol)


def test_mutated_and_returned_is_the_input_itself():
    x = torch.randn(6, 5)
    ref = x.clone().mul_(2).add_(1)
    out = torch.compile(_mutated_and_returned, backend="fuse")(x)
    assert out is x or out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, ref)


def test_update_is_written_by_the_kernel_that_computes_it():
    """mul and add of x and its copy_ are one kernel; no ATen call, nothing allocated for x's new value."""
    def f(x, y):
        x.mul_(2).add_(y)
        return None
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    rep = fusebackend.explain(f, x, y)
    assert rep.num_aten_calls == 0 and rep.num_kernels == 1, str(rep)
    (g,) = [g for r in rep.graph_reports for g in r.groups if g.is_kernel]
    assert g.stores and not g.outputs, g
    compiled = torch.compile(f, backend="fuse")
    compiled(x, y)
    calls = aten_calls(lambda: compiled(x, y))
    assert sum(calls.values()) == 0, calls     # not even an allocation


def test_read_at_another_index_keeps_its_own_copy():
    """x.copy_(x.t() + 1): the value reads x transposed, so the kernel computing it cannot write x (another
    thread may already have written the element it reads); the store stays a copy kernel of its own."""
    def f(x):
        x.copy_(x.t() + 1)
    x = torch.randn(33, 33)
    ref = x.t() + 1
    rep = fusebackend.explain(f, x.clone())
    stores = [g for r in rep.graph_reports for g in r.groups if g.stores]
    assert len(stores) == 1 and len(stores[0].nodes) == 1, str(rep)
    torch.compile(f, backend="fuse")(x)
    torch.testing.assert_close(x, ref)


def test_copy_result_read_in_the_graph():
    """A graph (not AOT's) that reads what copy_ returns: its readers read the written input, after the store."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from fusebackend.capture.backend import compile_graph
    from fusebackend.options import FuseOptions

    def f(x, y):
        old = x * 3
        z = x.copy_(y * 2)
        return z + 1, old, z
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    gm = make_fx(f)(x.clone(), y)
    assert any(n.target is aten.copy_.default and n.users for n in gm.graph.nodes)
    with records.collect() as reps:
        run = compile_graph(FuseOptions.from_dict(None), "inference", gm, [x.clone(), y])
    x1, x2 = x.clone(), x.clone()
    ref = f(x1, y)
    out = run([x2, y])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(x2, x1)
    assert out[2].data_ptr() == x2.data_ptr()
    _no_aten_copy(reps)


def test_mutation_under_cudagraphs_option_keeps_aot_copy_back(monkeypatch):
    """cudagraphs copies inputs whose storage changes into static buffers: mutations stay AOT's copy-back."""
    from fusebackend.options import FuseOptions
    assert backend_mod._mutation_kwargs(FuseOptions.from_dict({"cudagraphs": True})) == {}
    assert backend_mod._mutation_kwargs(FuseOptions.from_dict(None)) == {"keep_inference_input_mutations": True}


@pytest.mark.gpu
def test_cudagraphs_mutations_reach_the_callers_tensors():
    def f(x, y):
        x.mul_(2).add_(y)
        return x.sum()
    compiled = torch.compile(f, backend="fuse", options={"cudagraphs": True})
    for k in range(4):                           # fresh storage every call: copied into static buffers
        x, y = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
        ref_x = x * 2 + y
        compiled(x, y)
        torch.testing.assert_close(x, ref_x)


def test_strided_input_written_through_its_strides():
    def f(x, y):
        x.mul_(y).add_(1)
    base, y = torch.randn(12, 10), torch.randn(10, 12)
    x = base.t()                                   # (10, 12), not contiguous
    ref_base = base.clone()
    ref_base.t().mul_(y).add_(1)
    torch.compile(f, backend="fuse")(x, y)
    torch.testing.assert_close(base, ref_base)


def test_dynamic_sizes_write_in_place():
    def f(x, y):
        x.mul_(2).add_(y)
        return x.sum()
    compiled = torch.compile(f, backend="fuse", dynamic=True)
    for n in (5, 9, 17):
        x, y = torch.randn(n, 3), torch.randn(n, 3)
        xr = x.clone()
        out = compiled(x, y)
        ref = f(xr, y)
        torch.testing.assert_close(x, xr)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_keeps_running_stats_in_graph(device):
    """Batch norm in training with autograd: the forward graph's running-stat and counter updates are stores
    (AOT keeps mutations of inputs that need no grad in a training graph too); the backward is unchanged."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).to(device)
    mine = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).to(device)
    mine.load_state_dict(ref.state_dict())
    compiled = torch.compile(mine, backend="fuse")
    with records.collect() as reps:
        for _ in range(3):
            x = torch.randn(4, 3, 10, 10, device=device)
            ref(x).sum().backward()
            compiled(x).sum().backward()
    _close([mine[1].running_mean, mine[1].running_var, mine[1].num_batches_tracked],
           [ref[1].running_mean, ref[1].running_var, ref[1].num_batches_tracked])
    _close([p.grad for p in mine.parameters()], [p.grad for p in ref.parameters()], rtol=1e-4)
    forward = [r for r in reps if r.kind == "forward"]
    assert forward and all(any(g.stores for g in r.groups) for r in forward)
    _no_aten_copy(reps)


# ---------------------------------------------------------------- optimizers
def random_params(n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i in range(n):
        rank = int(torch.randint(0, 4, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 24, (rank,), generator=g))
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        ps.append(p)
    return ps


def state_of(opt, ps):
    out = [p.detach() for p in ps]
    for p in ps:
        st = opt.state[p]
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


OPTIMIZERS = {
    "sgd_momentum_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=True),
    "sgd_momentum_loop": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam_loop": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=True),
    "adamw_loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=False),
    "adamw_not_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, fused=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_steps_match_eager(name, device):
    n = 30
    ref_ps, ps = random_params(n, device), random_params(n, device)
    ref, opt = OPTIMIZERS[name](ref_ps), OPTIMIZERS[name](ps)
    step = torch.compile(opt.step, backend="fuse")
    with records.collect() as reps:
        for _ in range(3):
            ref.step()
            step()
    got, want = state_of(opt, ps), state_of(ref, ref_ps)
    assert len(got) == len(want) > n
    _close(got, want, rtol=1e-5, same_device=False)
    _no_aten_copy(reps)


def test_adamw_step_dispatches_no_copy():
    """Per compiled AdamW step over 24 tensors: no ATen copy_ (AOT's copy-back made one per parameter, moment
    and step counter: 4 x 24 = 96), and only the few ops of the batches' pooled allocations."""
    def counted():
        torch._dynamo.reset()
        ps = random_params(24)
        opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        step = torch.compile(opt.step, backend="fuse")
        step()
        step()
        return aten_calls(step)
    now = counted()
    assert now["aten::copy_"] == 0, now
    assert sum(now.values()) <= 30, now
    with pytest.MonkeyPatch.context() as mp:         # AOT's copy-back, as before: one copy_ per mutated tensor
        mp.setattr(backend_mod, "_mutation_kwargs", lambda opts: {})
        before = counted()
    assert before["aten::copy_"] == 4 * 24, before


def test_adamw_update_is_one_kernel_per_tensor_writing_its_state():
    ps = random_params(12)
    opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    rep = fusebackend.explain(opt.step)
    assert rep.num_aten_calls == 0, str(rep)
    chains = [g for r in rep.graph_reports for g in r.groups if g.domain and g.stores]
    # parameter, exp_avg and exp_avg_sq written by the kernel that computes them
    assert len([g for g in chains if len(g.stores) == 3]) == sum(1 for p in ps if p.dim() > 0), str(rep)
    counters = [g for r in rep.graph_reports for g in r.groups if not g.domain and g.stores]
    assert counters, str(rep)                          # the step counters, with their bias corrections
