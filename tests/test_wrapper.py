"""The generated per-program function (runtime/wrapper.py) against the interpreted step loop
(FUSEBACKEND_INTERPRET=1): the same outputs bit for bit on graphs with every step kind, values dropped at
their last reader, boxed inputs cleared, and a step that switches to ATen mid-call finishing the call."""
from __future__ import annotations

import os
import threading
import warnings
import weakref

import pytest
import torch

import numerics
from fusebackend.capture import kernels, records
from fusebackend.capture.backend import fuse
from fusebackend.emit import EmitError
from fusebackend.runtime.batch import BatchKernelStep
from fusebackend.runtime.meta_check import CheckedAtenStep
from fusebackend.runtime.steps import DynamicKernelStep, KernelStep, LayoutMismatch
from fusebackend.runtime.views import ViewStep


def fuse_interpreted(gm, example_inputs, **kwargs):
    """fuse with FUSEBACKEND_INTERPRET=1 while its Programs are built (a backend of its own for Dynamo)."""
    old = os.environ.get("FUSEBACKEND_INTERPRET")
    os.environ["FUSEBACKEND_INTERPRET"] = "1"
    try:
        return fuse(gm, example_inputs, **kwargs)
    finally:
        os.environ.pop("FUSEBACKEND_INTERPRET")
        if old is not None:
            os.environ["FUSEBACKEND_INTERPRET"] = old


def _both(fn, args, dynamic=None):
    """fn compiled generated and interpreted; each one's programs (collected on its first call)."""
    torch._dynamo.reset()
    out = {}
    for name, backend in (("gen", fuse), ("interp", fuse_interpreted)):
        compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
        with records.collect() as reps:
            compiled(*args)
        out[name] = (compiled, [r.program for r in reps if r.program is not None])
    return out


def _assert_same(fn, both, make_args, calls=3):
    (gen, gprogs), (interp, iprogs) = both["gen"], both["interp"]
    assert gprogs and iprogs
    for _ in range(calls):
        args = make_args()
        a, b = gen(*args), interp(*args)
        a, b = (a, b) if isinstance(a, (list, tuple)) else ([a], [b])
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y)
        numerics.assert_matches(fn, gen, args)
    assert all(p.source is not None and p.interpret is False for p in gprogs)
    assert all(p.source is None and p.interpret is True for p in iprogs)
    return [s for p in gprogs for s in p.steps]


def kernels_views_aten(x, w):
    s = x[:, :4]                                          # a view only a kernel reads: passed as an address
    h = torch.mm(x * s.sum(), w)                          # ATen after that kernel (it reads its result); a kernel
                                                          # reads h: checked
    q = (h.view(2, 4, 6) * 3).permute(0, 2, 1).reshape(2, 24)   # a view chain of a kernel's output
    return torch.relu(h) * 3, q.t()[1:], x.t()            # outputs: a kernel's, views


def test_kernels_views_and_checked_aten_match_interpreted():
    make = lambda: (torch.randn(8, 6), torch.randn(6, 6))
    steps = _assert_same(kernels_views_aten, _both(kernels_views_aten, make()), make)
    kinds = {type(s) for s in steps}
    assert {KernelStep, ViewStep, CheckedAtenStep} <= kinds, kinds


def test_views_only_kernels_read_are_addresses():
    both = _both(kernels_views_aten, (torch.randn(8, 6), torch.randn(6, 6)))
    (prog,) = both["gen"][1]
    sliced = [s for s in prog.steps if isinstance(s, ViewStep) and s.chain[0].target.__name__.startswith("slice")]
    assert sliced and "_a_%s = " % sliced[0].name in prog.source, prog.source


def test_dynamic_kernels_match_interpreted():
    def f(x, y):
        return torch.softmax(x * 2, -1) + y.sum(0)
    make = lambda n=[3]: (n.__setitem__(0, n[0] + 1), (torch.randn(n[0], 16), torch.randn(n[0], 16)))[1]
    steps = _assert_same(f, _both(f, make(), dynamic=True), make, calls=4)
    assert any(type(s) is DynamicKernelStep for s in steps)


def test_horizontal_batches_match_interpreted():
    def f(*xs):
        return [x * 2 + 1 for x in xs]
    make = lambda: tuple(torch.randn(8 + i, 16) for i in range(4))
    steps = _assert_same(f, _both(f, make()), make)
    assert any(type(s) is BatchKernelStep for s in steps)


def test_fallback_groups_match_interpreted(monkeypatch):
    real = kernels.emit_kernel

    def emit(fg, group):
        if any(fg.node(n).op_name.startswith("exp") for n in group.nodes):
            raise EmitError("test: no kernel for exp")
        return real(fg, group)
    monkeypatch.setattr(kernels, "emit_kernel", emit)
    f = lambda x: (torch.exp(x * 2) + 1, torch.tanh(x).sum(-1))
    make = lambda: (torch.randn(5, 7),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = _assert_same(f, _both(f, make()), make)
    assert any(getattr(s, "kind", None) == "fallback" for s in steps)


class _Allocations:
    """Records every tensor the program allocates through torch.empty_strided, and at each allocation how
    many of the earlier ones (and which watched tensors) are still alive."""

    def __init__(self, monkeypatch, watch=()):
        self.refs, self.live, self.watched = [], [], []
        self.watch = [weakref.ref(t) for t in watch]
        real = torch.empty_strided

        def alloc(*a, **k):
            self.live.append(sum(r() is not None for r in self.refs))
            self.watched.append([r() is not None for r in self.watch])
            t = real(*a, **k)
            self.refs.append(weakref.ref(t))
            return t
        monkeypatch.setattr(torch, "empty_strided", alloc)


def chain(x):
    for _ in range(6):
        x = x - x.mean(0, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1)
    return x


def _program(compiled, args):
    with records.collect() as reps:
        compiled(*args)
    (rep,) = reps
    return rep.program


def test_dead_values_are_deleted_at_their_last_reader(monkeypatch):
    torch._dynamo.reset()
    prog = _program(torch.compile(chain, backend="fuse"), (torch.randn(16, 32),))
    assert prog.source is not None and "del " in prog.source
    peaks = {}
    for mode in (False, True):
        prog.interpret = mode
        prog([torch.randn(16, 32)])                  # generated again after the interpreted call
        rec = _Allocations(monkeypatch)
        out = prog([torch.randn(16, 32)])
        monkeypatch.undo()
        assert len(rec.refs) >= 12 and out[0] is rec.refs[-1]()       # a kernel per reduction at least
        peaks[mode] = max(rec.live)
    # a chain: a kernel's outputs are dead once the next kernel has run, as eager's would be (kept to the end,
    # 11 or more would be alive at the last allocation)
    assert peaks[False] <= 3 and peaks[False] <= peaks[True], peaks


def test_boxed_inputs_are_cleared_and_released_early(monkeypatch):
    torch._dynamo.reset()
    prog = _program(torch.compile(chain, backend="fuse"), (torch.randn(16, 32),))
    assert prog.source is not None
    args = [torch.randn(16, 32)]
    rec = _Allocations(monkeypatch, watch=args)
    ref = chain(args[0])
    out = prog(args)
    monkeypatch.undo()
    assert args == []
    assert rec.watched[0] == [True] and rec.watched[-1] == [False]   # the input went after its last reader
    torch.testing.assert_close(out[0], ref)


def test_a_layout_switch_mid_call_finishes_the_call(monkeypatch):
    """A kernel step raising LayoutMismatch inside the generated function: that group runs as ATen from this
    call on, the call's outputs are right, and the function is generated again without it."""
    def f(x, y):
        return torch.softmax(x * 2, -1) + y.sum(0)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="fuse", dynamic=True)
    prog = _program(compiled, (torch.randn(5, 16), torch.randn(5, 16)))
    compiled(torch.randn(6, 16), torch.randn(6, 16))
    assert prog.source is not None
    step = next(s for s in prog.steps if type(s) is DynamicKernelStep)

    def refuse(*a, **k):
        raise LayoutMismatch("test: refused")
    monkeypatch.setattr(step, "build_meta", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numerics.assert_matches(f, compiled, (torch.randn(7, 16), torch.randn(7, 16)))
    assert any("layout: test: refused" in str(c.message) for c in caught)
    assert step not in prog.steps and prog._run is None
    numerics.assert_matches(f, compiled, (torch.randn(4, 16), torch.randn(4, 16)))
    assert prog.source is not None and "fallback" in prog.source


def test_a_metadata_switch_mid_call_makes_the_views_it_skipped():
    """A checked ATen output with other sizes than promised: the rest runs as ATen, and a view the generated
    code passed to a kernel as an address (no tensor) is made for it."""
    torch._dynamo.reset()
    compiled = torch.compile(kernels_views_aten, backend="fuse")
    prog = _program(compiled, (torch.randn(8, 6), torch.randn(6, 6)))
    compiled(torch.randn(8, 6), torch.randn(6, 6))
    checked = next(s for s in prog.steps if isinstance(s, CheckedAtenStep))
    pos = prog.steps.index(checked)
    early = [s for s in prog.steps[:pos] if isinstance(s, ViewStep) and "_a_%s = " % s.name in prog.source]
    assert early, "the test needs a view passed as an address before the checked step"
    item, meta, _ = checked.checked[0]
    checked.checked[0] = (item, meta, (99, 99))       # pretend the fake kernel promised other sizes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numerics.assert_matches(kernels_views_aten, compiled, (torch.randn(8, 6), torch.randn(6, 6)))
    assert any("metadata:" in str(c.message) for c in caught)


def test_calls_from_two_threads_at_once():
    torch._dynamo.reset()
    compiled = torch.compile(chain, backend="fuse")
    compiled(torch.randn(16, 32))
    errors = []

    def work():
        try:
            for _ in range(50):
                x = torch.randn(16, 32)
                torch.testing.assert_close(compiled(x), chain(x))
        except Exception as e:       # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


_POINTERS = r"""
#include <stdint.h>
extern "C" void fb_test_pointers(void** P, const int64_t* M) {
  int64_t* out = (int64_t*)P[0];
  for (int64_t i = 0; i < M[0]; ++i) out[i] = (int64_t)P[i + 1];
}
"""


def test_the_launch_extension_reads_every_kind_of_operand():
    """launch_ext's one C call hands the kernel the data pointer of a plain tensor, a Parameter, an offset view
    and an address given as an int, and the meta array it was given; a non-tensor raises."""
    import ctypes
    from fusebackend.runtime import cpu_compiler, launch_ext
    ext = launch_ext.load()
    if ext is None:
        pytest.skip("the launch extension cannot be built here (no Python headers)")
    fn = cpu_compiler.build(_POINTERS, "fb_test_pointers")["fb_test_pointers"]
    meta = (ctypes.c_int64 * 1)(5)
    out = torch.zeros(5, dtype=torch.int64)
    x, p, v = torch.randn(4), torch.nn.Parameter(torch.randn(3)), torch.randn(6, 4)[1:, 2:]
    ext.launch(ctypes.cast(fn, ctypes.c_void_p).value, ctypes.addressof(meta), out, x, p, v, 4096, out)
    assert out.tolist() == [x.data_ptr(), p.data_ptr(), v.data_ptr(), 4096, out.data_ptr()]
    with pytest.raises(AttributeError):
        ext.launch(ctypes.cast(fn, ctypes.c_void_p).value, ctypes.addressof(meta), out, "x", p, v, 1, out)


def test_ctypes_and_extension_launches_match(monkeypatch):
    f = lambda x, w: (torch.tanh(x) * 3 @ w).softmax(-1) + x.sum()
    make = lambda: (torch.randn(6, 8), torch.randn(8, 8))
    outs, sources = [], []
    for ctypes_only in ("1", "0"):
        monkeypatch.setenv("FUSEBACKEND_CTYPES_LAUNCH", ctypes_only)
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="fuse")
        prog = _program(compiled, make())
        sources.append(prog.source)
        torch.manual_seed(0)
        outs.append(compiled(*make()))
    from fusebackend.runtime import launch_ext
    assert "_launch" not in sources[0] and "data_ptr()" in sources[0]
    assert launch_ext.load() is None or "_launch" in sources[1]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
def test_cuda_kernels_match_interpreted(monkeypatch):
    monkeypatch.delenv("FUSEBACKEND_GENERATED_CUDA", raising=False)     # CUDA programs run generated by default
    make = lambda: (torch.randn(8, 6, device="cuda"), torch.randn(6, 6, device="cuda"))
    steps = _assert_same(kernels_views_aten, _both(kernels_views_aten, make()), make)
    assert any(type(s) is KernelStep for s in steps)
