"""`_foreach_*` ops lowered to per-tensor pointwise chains (graph/foreach.py) and batched horizontally: compiled
optimizer steps leave parameters and state equal to eager's; foreach variants (list, scalar, scalar list,
tensor, in place) match eager; every tensor's update is one chain and all chains share few launches; the CUDA
batch entry of the AdamW kernel compiles for sm_90."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_cuda import INCLUDE, capture  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.emit.cuda import emit_cuda  # noqa: E402
from fusebackend.graph import foreach  # noqa: E402

SHAPES = [(256, 256), (1024,), (256, 1024), (256,), (64, 256)]
RTOL = 1e-5

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def make_params(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(SHAPES[i % 5], generator=g).to(dtype)) for i in range(n)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def state_of(opt, ps):
    out = list(ps)
    for p in ps:
        st = opt.state[p]
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def assert_close_all(got, ref, rtol=RTOL):
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, k
        scale = b.detach().abs().max().item() if b.numel() else 1.0
        err = (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0
        assert err <= rtol * max(scale, 1e-30), "tensor %d: max err %.3e, scale %.3e" % (k, err, scale)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam_amsgrad_wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True),
    "adamw_maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-2, maximize=True, foreach=True),
    "adamw_capturable": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, capturable=True,
                                                     foreach=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                               foreach=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_after_steps_equals_eager(name):
    ref_ps, ps = make_params(7), make_params(7)
    # eager refuses capturable=True on the CPU; its result is the plain formula's
    ref = OPTIMIZERS["adamw" if name == "adamw_capturable" else name](ref_ps)
    opt = OPTIMIZERS[name](ps)
    step = torch.compile(opt.step, backend="fuse")
    for _ in range(5):
        ref.step()
        step()
    assert_close_all(state_of(opt, ps), state_of(ref, ref_ps))


def test_adamw_step_is_few_launches_and_no_foreach_call():
    """Each tensor's update is one kernel; the 2-D and 1-D updates share one divergent launch, the 0-dim step
    counters (written after the updates read them) another."""
    ps = make_params(10)
    opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    rep = fusebackend.explain(opt.step)
    assert rep.num_aten_calls == 0, str(rep)
    assert rep.num_kernels == 2, str(rep)
    chains = [g for g in rep.groups if g["domain"] and len(g["ops"]) >= 10]
    assert len(chains) == 10, str(rep)      # one fused group per parameter: moments, decay, step, full_like
    assert all(any(op.startswith("full_like") for op in g["ops"]) for g in chains), chains


def _variants(xs, ys, zs, t):
    a = torch._foreach_add(xs, ys, alpha=-0.5)
    b = torch._foreach_mul(a, [0.5 + i for i in range(len(xs))])
    c = torch._foreach_addcdiv(b, ys, torch._foreach_add(zs, 3.0), value=0.25)
    d = torch._foreach_addcmul(c, xs, ys, [0.1 * i for i in range(len(xs))])
    e = torch._foreach_lerp(d, zs, 0.3)
    f = torch._foreach_pow(2.0, torch._foreach_clamp_max(e, 3.0))
    g = torch._foreach_maximum(torch._foreach_sqrt(torch._foreach_abs(f)), ys)
    h = torch._foreach_mul(g, t)
    k = torch._foreach_div(torch._foreach_sub(h, [1.0] * len(xs)), torch._foreach_exp(zs))
    return torch._foreach_lerp(k, xs, list(torch._foreach_sigmoid(ys)))


def _lists(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return mk(), mk(), mk(), torch.tensor(1.5, dtype=dtype)


@pytest.mark.parametrize("shapes", [[(5, 7), (33,), (2, 3, 4), (), (0, 4), (64,)], [(17,)]],
                         ids=["mixed_sizes_ranks_empty", "one_problem"])
def test_foreach_variants_match_eager(shapes):
    args = _lists(shapes)
    rep = fusebackend.explain(_variants, *args)
    assert rep.num_aten_calls == 0, str(rep)
    got = torch.compile(_variants, backend="fuse")(*args)
    assert_close_all(got, _variants(*args), rtol=1e-5)


def test_foreach_mixed_dtypes():
    def fn(xs, hs):
        return torch._foreach_mul(torch._foreach_add(xs, 1.0), 2.0), torch._foreach_add(hs, hs)
    xs = [torch.randn(10), torch.randn(4, 4)]
    hs = [torch.randn(10).to(torch.bfloat16), torch.randn(3).to(torch.float16)]
    got = torch.compile(fn, backend="fuse")(xs, hs)
    ref = fn(xs, hs)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-2), (a, b)


def test_inplace_foreach_updates_inputs():
    def fn(xs, ys):
        torch._foreach_mul_(xs, 0.5)
        torch._foreach_addcmul_(xs, ys, ys, value=2.0)
        torch._foreach_zero_(ys)
    xs, ys, _, _ = _lists([(8, 8), (3,), (100,)])
    rx, ry = [x.clone() for x in xs], [y.clone() for y in ys]
    torch.compile(fn, backend="fuse")(xs, ys)
    fn(rx, ry)
    assert_close_all(xs + ys, rx + ry)


def test_unlowerable_foreach_stays_one_call():
    """A norm (a reduction per tensor) is not lowered here: it stays one opaque call, its readers still fuse."""
    def fn(xs, ys):
        return torch._foreach_mul(torch._foreach_norm(xs), 2.0), torch._foreach_add(ys, 1.0)
    xs, ys, _, _ = _lists([(4,), (2, 3)])
    rep = fusebackend.explain(fn, xs, ys)
    assert rep.num_aten_calls == 1, str(rep)
    got, ref = torch.compile(fn, backend="fuse")(xs, ys), fn(xs, ys)
    assert_close_all(got[0] + got[1], ref[0] + ref[1])


def test_items_are_named_per_tensor():
    ps = make_params(3)
    fg, _ = capture(torch.optim.AdamW(ps, lr=1e-3, foreach=True).step, ())
    assert not any(foreach.is_foreach(n.target) for n in fg.nodes())
    assert any(foreach.SEP in n.name for n in fg.nodes())


def test_nvcc_compiles_batched_adamw(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    ps = make_params(5)
    opt = torch.optim.AdamW(ps, lr=1e-3, capturable=True, foreach=True)   # the form Dynamo traces on CUDA
    fg, groups = capture(opt.step, ())
    chains = [g for g in groups if g.is_kernel and len(g.nodes) >= 10]
    assert len(chains) == 5
    spec = emit_cuda(fg, chains[0])
    assert spec.batch_name == spec.name + "_batch"
    src = tmp_path / ("%s.cu" % spec.name)
    src.write_text(spec.source)
    res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-DFB_BATCH", "-I", INCLUDE, str(src),
                          "-Xptxas", "-v", "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:] + "\n" + spec.source
    assert spec.batch_name in res.stderr, res.stderr
