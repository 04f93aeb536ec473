"""Common-subexpression elimination of reductions (passes/cse.py): a reduction spelled twice is computed
once -- SDPA's math path takes a row's max twice -- while values that only look alike, random draws and graph
outputs stay apart."""
from __future__ import annotations

import torch

import numerics
import fusebackend
from fusebackend.graph import lower
from fusebackend.passes import eliminate_common


def _ops(rep):
    return [op for g in rep.groups for op in g["ops"]]


def test_safe_softmax_takes_the_row_max_once():
    fn = lambda x, m: torch.ops.aten._safe_softmax(x + m, -1)
    g = torch.Generator().manual_seed(0)
    rep = fusebackend.explain(fn, torch.randn(4, 8, 16, generator=g), torch.randn(16, generator=g))
    assert rep.num_kernels == 1 and sum(op.startswith("amax") for op in _ops(rep)) == 1, str(rep)
    x, m = torch.randn(3, 5, 33, generator=g), torch.randn(33, generator=g)
    x[0, 1] = float("-inf")                             # an all -inf row gives 0s, as in eager
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), (x, m))


def _graph(fn, *args):
    gms = []

    def capture(gm, example_inputs):
        gms.append(gm)
        return gm.forward
    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    torch.compile(fn, backend=aot_autograd(fw_compiler=capture))(*args)
    return lower(gms[0])


def test_lookalike_constants_stay_apart():
    """0.0 and -0.0, True and 1, 2 and 2.0 compare equal in Python but not in results."""
    fn = lambda x: ((x + 0.0) * (x + -0.0)).sum() + (x * True).sum() + (x * 1).sum() + (x * 2).sum() + (x * 2.0).sum()
    fg = _graph(fn, torch.randn(5))
    before = sorted(n.op_name for n in fg.nodes())
    after = sorted(n.op_name for n in eliminate_common(fg).nodes())
    assert before == after
    x = torch.tensor([-0.0, 1.5, -2.0, 0.0, 3.0])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend="fuse")(x), fn(x))


def test_reductions_of_copies_merge_and_pointwise_copies_stay():
    """sum(x * y) spelled twice over two copies of x * y is one sum; the copies of x * y that other kernels
    read stay (sharing one would write it for the other kernel to read back)."""
    fn = lambda x, y: (x * y).exp() + (x * y).sin() + (x * y).sum(-1, keepdim=True) + (x * y).sum(-1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(6, 7, generator=g), torch.randn(7, generator=g))
    fg = _graph(fn, *args)
    muls = [n.op_name for n in fg.nodes()].count("mul.Tensor")
    names = [n.op_name for n in eliminate_common(fg).nodes()]
    assert names.count("sum.dim_IntList") == 1, names
    assert names.count("mul.Tensor") == muls - 1, names     # the merged sum's own copy of x * y is dead
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), args)


def test_random_draws_and_outputs_stay_distinct():
    def fn(x):
        return torch.rand_like(x) + x, torch.rand_like(x) + x, x * 2, x * 2
    x = torch.randn(64)
    torch._dynamo.reset()
    a, b, c, d = torch.compile(fn, backend="fuse")(x)
    assert not torch.equal(a, b)                        # two draws, as in eager
    assert torch.equal(c, x * 2) and torch.equal(d, x * 2)
    c.add_(1)                                           # outputs are distinct tensors, as in eager
    assert torch.equal(d, x * 2)
