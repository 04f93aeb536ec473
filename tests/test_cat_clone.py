"""cat, clone, split/chunk/unbind and integer arange inside fused kernels: each case runs as kernels with
no ATen call (explain) and matches eager, layout (strides) included."""
import pytest
import torch

import fusebackend
from numerics import assert_matches

BF = torch.bfloat16


def _t(*s, dtype=torch.float32):
    if dtype == torch.int64:
        return torch.randint(-50, 50, s)
    return torch.randn(*s).to(dtype)


def _rotary(x, c, s):
    h = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * s


CASES = {
    # name -> (fn, make_args)
    "cat_rotary": (_rotary, lambda: (_t(2, 4, 16, 16), _t(16, 16), _t(16, 16))),
    "cat_dim0": (lambda a, b: torch.cat([a * 2, b + 1], 0), lambda: (_t(3, 5), _t(4, 5))),
    "cat_dim1_three": (lambda a, b, c: torch.cat([a, b.exp(), c], dim=1).relu(),
                       lambda: (_t(2, 3, 6), _t(2, 1, 6), _t(2, 4, 6))),
    "cat_negative_dim": (lambda a, b: torch.cat([a, b], dim=-2) * 3 - 1, lambda: (_t(2, 5, 7), _t(2, 2, 7))),
    "cat_empty_input": (lambda a, e, b: torch.cat([a, e, b], 1).sigmoid(),
                        lambda: (_t(2, 3, 5), _t(2, 0, 5), _t(2, 4, 5))),
    "cat_legacy_empty_1d": (lambda a, e: torch.cat([a * 2, e], 0), lambda: (_t(3, 4), _t(0))),
    "cat_broadcast_producers": (lambda x, bias, y, m, w: torch.cat([x + bias, y * m], -1).relu() * w,
                                lambda: (_t(6, 8), _t(8), _t(6, 4), _t(6, 1), _t(12))),
    "cat_of_cat": (lambda a, b, c: torch.cat([torch.cat([a, b], 1) * 2, c], 0) + 1,
                   lambda: (_t(2, 3), _t(2, 5), _t(4, 8))),
    "cat_bf16": (lambda a, b: torch.cat([a * b, b], -1) + 1, lambda: (_t(4, 8, dtype=BF), _t(4, 8, dtype=BF))),
    "cat_int64": (lambda a, b: torch.cat([a * 3, b - 1], 0) // 2,
                  lambda: (_t(3, 5, dtype=torch.int64), _t(2, 5, dtype=torch.int64))),
    "cat_self_twice": (lambda a: torch.cat([a, a * -1], 0).cos(), lambda: (_t(5, 3),)),
    "clone_permuted": (lambda x: (x * 2).permute(2, 0, 1).clone() + 0, lambda: (_t(3, 4, 5),)),
    "clone_permuted_out": (lambda x: x.permute(2, 0, 1).clone(), lambda: (_t(3, 4, 5),)),
    "contiguous_of_transpose": (lambda x: (x + 1).transpose(0, 1).contiguous(), lambda: (_t(6, 10),)),
    "clone_channels_last": (lambda x: (x * 2).clone(memory_format=torch.channels_last),
                            lambda: (_t(2, 3, 4, 5),)),
    "split_pointwise": (lambda x: [p * (i + 1) for i, p in enumerate(x.split([3, 5, 8], -1))],
                        lambda: (_t(4, 16),)),
    "split_equal_sum": (lambda x: sum(x.split(4, 0)) * 2, lambda: (_t(12, 6),)),
    "chunk_gate": (lambda x: (lambda a, b: a * torch.sigmoid(b))(*x.chunk(2, dim=-1)), lambda: (_t(5, 12),)),
    "unbind_sub": (lambda x: (lambda a, b, c: a - b * c)(*x.unbind(1)), lambda: (_t(4, 3, 7),)),
    "arange_add": (lambda x: x + torch.arange(3, 3 + 2 * x.shape[-1], 2), lambda: (_t(4, 6, dtype=torch.int64),)),
}
# the op each case must not leave to ATen
OPS = {"cat": "cat", "clone": "clone", "contiguous": "clone", "split": "split", "chunk": "split", "unbind": "unbind",
       "arange": "arange"}


def _compile(fn):
    return torch.compile(fn, backend="fuse", options={"fallback": "error"})


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_and_matches_eager(name):
    fn, make = CASES[name]
    args = make()
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args, options={"fallback": "error"})
    assert rep.num_kernels >= 1 and not rep.fallbacks
    op = OPS[name.split("_")[0]]
    aten = [o for g in rep.groups if g["kind"] == "opaque" for o in g["ops"]]
    assert rep.num_aten_calls == 0, aten
    assert all(op not in o for g in rep.groups if g["kind"] in ("opaque", "view") for o in g["ops"]), rep
    torch._dynamo.reset()
    compiled = _compile(fn)
    args = make()                         # fresh random inputs
    with torch.no_grad():
        assert_matches(fn, compiled, args)
        outs, refs = compiled(*args), fn(*args)
    outs, refs = (outs, refs) if isinstance(outs, (list, tuple)) else ((outs,), (refs,))
    for o, r in zip(outs, refs):
        assert o.stride() == r.stride(), (o.stride(), r.stride())


def test_rotary_is_one_kernel():
    """q * cos + cat(-q2, q1) * sin, q read through a permute: one kernel, the cat inside."""
    def fn(x, c, s):
        q = x.view(2, 16, 4, 16).permute(0, 2, 1, 3)
        return _rotary(q, c, s)
    args = (_t(2, 16, 64), _t(16, 16), _t(16, 16))
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args)
    kernels = [g for g in rep.groups if g["kind"] in ("pointwise", "reduction")]
    assert len(kernels) == 1 and any(o.startswith("cat") for o in kernels[0]["ops"]), rep
    assert rep.num_aten_calls == 0


def test_cat_read_through_slices_is_one_kernel():
    """cat -> two slices of it -> sub (the mask of HF models): the slices' reader joins the cat's kernel."""
    def fn(a, b):
        c = torch.cat([a - 1, b], -1)
        return (c[:, 1:] - c[:, :-1]) != 1
    args = (_t(2, 1, dtype=torch.int64), _t(2, 16, dtype=torch.int64))
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args)
        assert rep.num_kernels == 1 and rep.num_aten_calls == 0, rep
        torch._dynamo.reset()
        assert_matches(fn, _compile(fn), (_t(2, 1, dtype=torch.int64), _t(2, 16, dtype=torch.int64)))


def test_cat_of_many_inputs_stays_aten():
    """More inputs than graph/indexing.MAX_CAT_INPUTS: one ATen call, still right."""
    fn = lambda *xs: torch.cat([x * 2 for x in xs], 0)
    args = [_t(2, 3) for _ in range(20)]
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(fn, _compile(fn), args)


def test_cat_dynamic_sizes_match_eager():
    """Sizes along the cat dim that are symbols: the cat stays an ATen call; results still match."""
    fn = lambda a, b: torch.cat([a * 2, b], 0) + 1
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse", dynamic=True)
    with torch.no_grad():
        for n in (3, 5, 8):
            assert_matches(fn, compiled, (_t(n, 4), _t(n + 1, 4)))
