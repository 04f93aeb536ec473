"""Large half-type products with sizes off a multiple of 8 are padded for cuBLAS (decomp_pad_mm.py).

On CPU machines the padding is switched on for CPU tensors with a low size threshold, which checks the
graph and the numerics; the `gpu` case runs it on CUDA tensors at the real threshold's scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import numerics
import fusebackend
from fusebackend.capture import decomp_pad_mm


@pytest.fixture
def pad_on_cpu(monkeypatch):
    monkeypatch.setattr(decomp_pad_mm, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(decomp_pad_mm, "MIN_WORK", 1)


def lm_head(h, w):
    return F.linear(h, w) * 0.5


def _ops(rep):
    return [n.op_name for g in rep.graph_reports for n in g.graph.nodes()]


@pytest.mark.parametrize("k,n", [(64, 101), (60, 96), (61, 99)])
def test_padded_product_matches_eager_and_keeps_the_padded_pitch(pad_on_cpu, k, n):
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 5, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16())
    rep = fusebackend.explain(lm_head, *args)
    assert any("constant_pad_nd" in o for o in _ops(rep)), _ops(rep)
    torch._dynamo.reset()
    out = torch.compile(lm_head, backend="fuse")(*args)
    assert out.shape == (2, 5, n)
    torch._dynamo.reset()
    bare = torch.compile(F.linear, backend="fuse")(*args)       # the product itself is returned strided,
    pitch = n + -n % 8                                           # as Inductor returns it
    assert bare.stride() == ((5 * pitch, pitch, 1) if n % 8 else (5 * n, n, 1))
    torch.testing.assert_close(bare, F.linear(*args), rtol=0, atol=0)
    torch._dynamo.reset()
    numerics.assert_matches(lm_head, torch.compile(lm_head, backend="fuse"), args)


@pytest.mark.parametrize("tail", [lambda y: y.view(-1) * 2, lambda y: y.view(10, -1).sum(-1),
                                  lambda y: y.exp().view(-1)])
def test_views_of_the_strided_product_in_the_graph(pad_on_cpu, tail):
    """A view these strides cannot serve (flattening across the padded rows) reads a contiguous copy."""
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 5, 64, generator=g).bfloat16(), torch.randn(99, 64, generator=g).bfloat16())
    fn = lambda h, w: tail(lm_head(h, w))
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), args)


def test_view_strides_agree_with_aten():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, 10, generator=g)
    for x in (base[:, :5], base[:, ::2], base.transpose(0, 2), base[1:4, :, :7], base[:, :1]):
        for shape in ([-1], [x.shape[0], -1], [x.shape[0] * x.shape[1], -1], [1, x.numel()]):
            size = list(shape)
            if -1 in size:
                size[size.index(-1)] = x.numel() // -torch.tensor(shape).prod().item()
            try:
                want = list(x.view(size).stride())
            except RuntimeError:
                want = None
            assert decomp_pad_mm._view_strides(list(x.shape), list(x.stride()), size) == want, (x.shape, size)


def test_transposed_weight_is_padded_in_its_own_layout(pad_on_cpu):
    """x @ W.t() pads W (a contiguous copy) and multiplies by its transposed view; x @ W pads W as it is."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 64, generator=g).bfloat16()
    for fn, w in [(lm_head, torch.randn(99, 64, generator=g).bfloat16()),
                  (lambda h, w: (h @ w) * 0.5, torch.randn(64, 99, generator=g).bfloat16())]:
        rep = fusebackend.explain(fn, h, w)
        pads = [n for gr in rep.graph_reports for n in gr.graph.nodes() if "constant_pad_nd" in n.op_name]
        assert len(pads) == 1 and pads[0].meta.shape == ((104, 64) if fn is lm_head else (64, 104))
        torch._dynamo.reset()
        numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), (h, w))


def test_aligned_small_or_float32_products_are_not_padded(pad_on_cpu, monkeypatch):
    g = torch.Generator().manual_seed(1)
    for args, opts in [((torch.randn(4, 64, generator=g).bfloat16(), torch.randn(96, 64, generator=g).bfloat16()), None),
                       ((torch.randn(4, 64, generator=g), torch.randn(99, 64, generator=g)), None),
                       ((torch.randn(4, 64, generator=g).bfloat16(), torch.randn(99, 64, generator=g).bfloat16()),
                        {"pad_matmul": False})]:
        rep = fusebackend.explain(lm_head, *args, options=opts)
        assert not any("constant_pad_nd" in o for o in _ops(rep)), _ops(rep)


@pytest.mark.gpu
def test_gpt2_sized_lm_head_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(2)
    args = (torch.randn(512, 768, device="cuda", generator=g).bfloat16(),
            torch.randn(50257, 768, device="cuda", generator=g).bfloat16() * 0.05)
    rep = fusebackend.explain(lm_head, *args)
    assert any("constant_pad_nd" in o for o in _ops(rep)), _ops(rep)
    torch._dynamo.reset()
    numerics.assert_matches(lm_head, torch.compile(lm_head, backend="fuse"), args)


def test_option_is_validated():
    with pytest.raises(fusebackend.OptionError, match="pad_matmul"):
        torch.compile(lambda x: x + 1, backend="fuse", options={"pad_matmul": 1})(torch.randn(3))
