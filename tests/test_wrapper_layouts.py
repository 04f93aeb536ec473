"""What the generated function (runtime/wrapper.py) knows about layouts, and where it still checks.

A view of a value whose sizes and strides the function itself fixed (a kernel's or a batch's fresh output, or
a view it made past its check) is written without a layout check; a base it did not make (a graph input, an
ATen result) is checked once, and a base of another layout there still gives eager's result (the call
finishes interpreted). A kernel over symbolic sizes settles its meta array once per distinct sizes, strides
and scalars (DynamicKernelStep.memo); an input of a new layout is checked again."""
from __future__ import annotations

import pytest
import torch

import numerics
from fusebackend.capture import records
from fusebackend.runtime.steps import DynamicKernelStep
from fusebackend.runtime.views import ViewStep


def _program(fn, args, dynamic=None):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse", dynamic=dynamic)
    with records.collect() as reps:
        compiled(*args)
    (rep,) = reps
    compiled(*args)                      # the second call runs the generated function
    assert rep.program.source is not None
    return compiled, rep.program


def views_of_a_view(x, y, w):
    p = x.t()                            # a view of an input: checked once
    k = (y * 3).reshape(-1)[2:].view(2, 7)       # views of a kernel's output: unchecked
    return torch.mm(p[1:], p[:, 1:]), torch.mm(k, w)     # views of p: unchecked


def test_views_of_known_layouts_are_unchecked_and_an_input_is_checked():
    make = lambda: (torch.randn(4, 4), torch.randn(4, 4), torch.randn(7, 3))
    compiled, prog = _program(views_of_a_view, make())
    numerics.assert_matches(views_of_a_view, compiled, make())
    views = [s for s in prog.steps if type(s) is ViewStep]
    checks = prog.source.count(".stride() ==")
    assert len(views) >= 4 and checks == 1, prog.source       # x.t(), once; none below it
    # x in another layout (a caller Dynamo does not guard): the check catches it and the call finishes
    # interpreted, so the unchecked views below it are not used for it (static kernels read their inputs
    # with the strides of the first call, so only ATen reads x's views here)
    x, y, w = make()
    x = x.t().contiguous().t()
    outs = prog([x, y, w])
    for got, want in zip(outs, views_of_a_view(x, y, w)):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_dynamic_kernels_settle_once_per_sizes_and_recheck_a_new_layout():
    def f(x):
        return torch.softmax(x * 2, -1)
    compiled, prog = _program(f, (torch.randn(5, 16),), dynamic=True)
    step = next(s for s in prog.steps if type(s) is DynamicKernelStep)
    for n in (5, 6, 5, 6, 7):
        numerics.assert_matches(f, compiled, (torch.randn(n, 16),))
    assert len(step.memo) == 3
    # the same sizes in a layout the kernel does not take (last dim strided): not the memo's entry
    odd = torch.randn(16, 6).t()
    kinds = [prog.fg.node(n).kind for n in prog.input_names]
    assert kinds == ["symbol", "symbol", "placeholder"], kinds      # x's sizes, then x
    with pytest.warns(UserWarning, match="layout: operand 0"):
        (got,) = prog([6, 16, odd])
    assert torch.allclose(got, f(odd), atol=1e-6)
