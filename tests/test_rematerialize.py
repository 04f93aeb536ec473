"""Rematerialisation (passes/remat.py): a value computed from indices and constants alone is
recomputed in every kernel that reads it instead of being written by a kernel of its own."""
from __future__ import annotations

import torch

import numerics
import fusebackend
from cuda_cases import _causal_layers
from fusebackend.graph import lower
from fusebackend.passes import rematerialize


def _kernels(fn, *args):
    rep = fusebackend.explain(fn, *args)
    return [g for g in rep.groups if g["kind"] in ("pointwise", "reduction")]


def _args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g).to(dtype), torch.randn(32, 32, generator=g).to(dtype)


def test_causal_mask_is_computed_inside_both_softmax_kernels():
    kernels = _kernels(_causal_layers, *_args())
    assert len(kernels) == 2, kernels
    assert all(g["kind"] == "reduction" and "arange.start_step" in g["ops"] for g in kernels), kernels
    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        numerics.assert_matches(_causal_layers, torch.compile(_causal_layers, backend="fuse"), _args(dtype))


def test_one_bool_mask_made_float_per_layer_is_computed_in_each_layer():
    """HF's SDPA path: one bool mask, turned into a float mask by a where in each layer."""
    def fn(x, w):
        i = torch.arange(x.shape[-1])
        keep = (i[None, :] <= i[:, None]).expand(2, 1, 32, 32)
        for _ in range(3):
            x = torch.softmax(x + torch.where(keep, 0.0, float("-inf")), -1) @ w
        return x
    kernels = _kernels(fn, *_args())
    assert len(kernels) == 3 and all(g["kind"] == "reduction" for g in kernels), kernels
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), _args())


def test_mask_read_by_an_aten_call_or_returned_is_written_once():
    def fn(x, w):
        i = torch.arange(x.shape[-1])
        mask = torch.where(i[None, :] <= i[:, None], 0.0, -1e4)
        return torch.softmax(x + mask, -1) @ (mask + w), torch.softmax(x * 2 + mask, -1), mask
    kernels = _kernels(fn, *_args())
    assert sum("arange.start_step" in g["ops"] for g in kernels) == 1, kernels
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), _args())


def _graph(fn, *args):
    got = []

    def keep(gm, example_inputs):
        got.append(gm)
        return gm
    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=aot_autograd(fw_compiler=keep, inference_compiler=keep))(*args)
    return lower(got[0])


def test_copies_keep_a_topological_order_and_respect_the_cone_limit():
    fg = _graph(_causal_layers, *_args())
    n = len(fg)
    fg = rematerialize(fg)
    assert len(fg) > n
    for node in fg.nodes():
        assert all(fg.node(p).index < node.index for p in fg.producers(node.name)), node.name
    small = rematerialize(_graph(_causal_layers, *_args()), max_cone=2)
    assert len(small) == n
