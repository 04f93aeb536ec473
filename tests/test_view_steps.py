"""Views at run time (runtime/views.py): a view chain whose intermediates nobody else reads runs as one
as_strided of its base after the first call; results alias their base as eager's do, and a base with
another layout, a reshape that copies or a dtype view take the ATen ops."""
from __future__ import annotations

import torch

import numerics
import fusebackend
from fusebackend.runtime.views import ViewStep


def _view_steps(fn, *args):
    rep = fusebackend.explain(fn, *args)
    return [s for r in rep.graph_reports for s in r.program.steps if isinstance(s, ViewStep)], rep


def attention_reshapes(x, w):
    q = (x.view(2, 8, 4, 8) @ w).permute(0, 2, 1, 3).reshape(2, 4, 64)
    return q.transpose(1, 2)[:, 3:40].expand(3, 2, 37, 4), q.sum()


def test_chains_fold_and_match_eager():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 8, 32, generator=g), torch.randn(8, 8, generator=g))
    steps, rep = _view_steps(attention_reshapes, *args)
    assert steps and any(len(s.chain) >= 2 for s in steps), str(rep)
    torch._dynamo.reset()
    compiled = torch.compile(attention_reshapes, backend="fuse")
    for seed in (1, 2, 3):                       # the first call plans, later ones take as_strided
        g = torch.Generator().manual_seed(seed)
        numerics.assert_matches(attention_reshapes, compiled,
                                (torch.randn(2, 8, 32, generator=g), torch.randn(8, 8, generator=g)))


def test_outputs_alias_their_base_like_eager():
    fn = lambda x: (x * 2).view(4, 6).t()[1:, ::2]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse")
    for _ in range(3):
        x = torch.randn(24)
        out, ref = compiled(x), fn(x)
        assert out.shape == ref.shape and out.stride() == ref.stride() and torch.equal(out, ref)
        assert out.storage_offset() == ref.storage_offset()


def test_views_of_inputs_keep_aliasing_the_input():
    fn = lambda x, y: (x.view(3, 8).permute(1, 0)[2:], y + 1)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse")
    for _ in range(3):
        x, y = torch.randn(24), torch.randn(3)
        out, _ = compiled(x, y)
        assert torch.equal(out, fn(x, y)[0])


def test_plan_is_not_used_for_another_layout():
    """A step planned on one base layout meets a base of other strides: it runs the ops."""
    fn = lambda x: (x.permute(1, 0)[1:, :3].unsqueeze(0), x.sum())
    x = torch.randn(4, 3)
    steps, _ = _view_steps(fn, x)
    step = next(s for s in steps if len(s.chain) >= 2)
    env = {step.base_name: torch.randn(4, 3)}
    step(env)                                    # plans
    assert step.plan is not None
    for base in (torch.randn(4, 3), torch.randn(3, 4).t(), torch.randn(4, 6)[:, ::2]):
        env = {step.base_name: base}
        step(env)
        ref = base.permute(1, 0)[1:, :3].unsqueeze(0)
        got = env[step.name]
        assert torch.equal(got, ref) and got.stride() == ref.stride() and got.data_ptr() == ref.data_ptr()
        assert set(env) == {step.base_name, step.name}       # chain intermediates are not left behind


def test_copying_reshape_and_dtype_views_take_the_ops():
    from fusebackend.runtime.views import _plan
    base = torch.randn(4, 6)
    assert _plan(base, base.t().reshape(24)) is None          # a copy: not in the base's storage
    assert _plan(base, base.view(torch.int32)) is None        # another dtype
    p = _plan(base, base[1:, 2:].t())
    assert p[2:] == ((4, 3), (1, 6), 8)
