"""Inference batch norm as pointwise ops (capture/decompositions.py) and max pooling as strided slices +
maximum (graph/pools.py): conv -> BatchNorm -> ReLU -> max-pool needs one kernel after the convolution, not
three ATen passes; a pool whose indices are read (training), or one with padding, stays the ATen op."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numerics import assert_matches  # noqa: E402

import fusebackend  # noqa: E402

F = torch.nn.functional


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _ops(report):
    return [op for g in report.groups for op in g["ops"]]


def _aten(report):
    return [op for g in report.groups if g["kind"] == "opaque" for op in g["ops"]]


class Block(nn.Module):
    def __init__(self, c=8, **pool):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pool = pool or dict(kernel_size=2)
        with torch.no_grad():
            self.bn.running_mean.normal_(0.0, 0.3, generator=_g(5))
            self.bn.running_var.uniform_(0.5, 1.5, generator=_g(6))
            self.bn.weight.normal_(1.0, 0.2, generator=_g(7))
            self.bn.bias.normal_(0.0, 0.2, generator=_g(8))

    def forward(self, x):
        return F.max_pool2d(torch.relu(self.bn(x)), **self.pool)


def _check(model, x, **kw):
    model.eval()
    with torch.no_grad():
        report = fusebackend.explain(model, x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fuse")
        assert_matches(model, compiled, (x,), **kw)
    return report


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (3, 8, 15, 17)])
def test_bn_relu_pool_is_one_kernel(shape):
    report = _check(Block(), torch.randn(shape, generator=_g()))
    assert report.num_kernels == 1 and report.num_aten_calls == 0, str(report)
    assert "maximum" in " ".join(_ops(report))


@pytest.mark.parametrize("pool", [dict(kernel_size=3, stride=2), dict(kernel_size=2, stride=1),
                                  dict(kernel_size=(2, 3), stride=(2, 1)), dict(kernel_size=2, dilation=2),
                                  dict(kernel_size=3, stride=2, ceil_mode=True)])
def test_windows_without_padding_are_slices(pool):
    x = torch.randn(2, 8, 13, 15, generator=_g(1))     # ceil mode adds no window at 13 and 15
    report = _check(Block(**pool), x)
    assert not any("max_pool" in op for op in _ops(report)), str(report)


def test_ceil_mode_that_adds_a_window_and_padding_stay_aten():
    x = torch.randn(2, 8, 13, 13, generator=_g(2))
    for pool in (dict(kernel_size=2, ceil_mode=True), dict(kernel_size=3, stride=2, padding=1)):
        report = _check(Block(**pool), x)
        assert any("max_pool2d_with_indices" in op for op in _aten(report)), str(report)


def test_nan_propagates_as_in_eager():
    x = torch.randn(2, 8, 8, 8, generator=_g(3))
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 5, 4] = float("nan")
    pool = lambda x: F.max_pool2d(x * 2.0, 2)
    torch._dynamo.reset()
    got = torch.compile(pool, backend="fuse")(x)
    want = pool(x)
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 2
    torch.testing.assert_close(got, want, equal_nan=True)


def test_bf16_batch_norm_within_eager_error():
    def fn(x, rm, rv, w, b):      # every tensor an argument: the float64 reference converts them all
        return F.max_pool2d(torch.relu(F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)), 2)
    c = lambda seed, lo=None: (torch.rand(16, generator=_g(seed)) + lo if lo else
                               torch.randn(16, generator=_g(seed))).bfloat16()
    args = (torch.randn(2, 16, 10, 12, generator=_g(4)).bfloat16(), c(16), c(17, 0.5), c(18), c(19))
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(fn, torch.compile(fn, backend="fuse"), args)


def test_training_keeps_the_pool_with_indices_and_gradients_match():
    model = Block()
    model.train()
    x = torch.randn(2, 8, 12, 12, generator=_g(9), requires_grad=True)
    ref = Block()
    ref.load_state_dict(model.state_dict())
    ref.train()
    xr = x.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="fuse")(x)
    want = ref(xr)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape, generator=_g(10))
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)


def test_eval_mode_batch_norm_without_affine_and_other_ranks():
    for bn, x in ((nn.BatchNorm2d(6, affine=False), torch.randn(2, 6, 5, 5, generator=_g(11))),
                  (nn.BatchNorm1d(6), torch.randn(4, 6, generator=_g(12))),
                  (nn.BatchNorm1d(6), torch.randn(4, 6, 9, generator=_g(13)))):
        with torch.no_grad():
            bn.running_mean.normal_(0.0, 0.3, generator=_g(14))
            bn.running_var.uniform_(0.5, 1.5, generator=_g(15))
        model = nn.Sequential(bn, nn.ReLU())
        report = _check(model, x)
        assert report.num_aten_calls == 0, str(report)


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="g++ not installed")
def test_cuda_kernel_of_bn_relu_pool_emulated():
    """The CUDA kernel of the fused block (run by the CPU emulator of generated CUDA): one kernel."""
    assert _emulated_kinds(Block().eval(), torch.randn(2, 8, 10, 12, generator=_g(20))) == ["pointwise"]


def _emulated_kinds(model, x):
    """The model compiled for CUDA and run by the CPU emulator, against eager: the kinds of its kernels."""
    from test_inplace_cuda_emu import compile_emulated
    specs = []
    with torch.no_grad():
        got = compile_emulated(model, specs)(x)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return [s.kind for s in specs]


def test_channels_last_input_and_a_one_d_pool():
    x = torch.randn(2, 8, 12, 10, generator=_g(21)).contiguous(memory_format=torch.channels_last)
    report = _check(Block(), x)
    assert report.num_aten_calls == 0, str(report)
    pool1d = lambda t: F.max_pool1d(torch.relu(t), 3, 2)
    t = torch.randn(3, 5, 17, generator=_g(22))
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(pool1d, torch.compile(pool1d, backend="fuse"), (t,))


class PoolMean(nn.Module):
    """A network's last block: BN + ReLU, max pool, global average pool."""

    def __init__(self, c=8, **pool):
        super().__init__()
        self.block = Block(c, **pool)

    def forward(self, x):
        return self.block(x).mean((2, 3))


@pytest.mark.parametrize("shape,pool", [((2, 8, 16, 16), dict(kernel_size=2)),
                                        ((3, 8, 13, 11), dict(kernel_size=3, stride=2))])
def test_bn_relu_pool_mean_is_one_reduction_kernel(shape, pool):
    """BN + ReLU computed where the pool's slices read it, inside the mean's kernel: nothing written between."""
    report = _check(PoolMean(**pool), torch.randn(shape, generator=_g(22)))
    assert report.num_kernels == 1 and report.num_aten_calls == 0, str(report)
    (kernel,) = [g for g in report.groups if g["kind"] != "view"]
    assert kernel["kind"] == "reduction" and {"relu", "maximum", "mean"} <= {o.split(".")[0] for o in kernel["ops"]}


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cuda_row_kernel_of_bn_relu_pool_mean_emulated(memory_format):
    """The CUDA row kernel with that prologue read through strided slices (the CPU emulator of generated CUDA)."""
    x = torch.randn(2, 8, 11, 14, generator=_g(23)).contiguous(memory_format=memory_format)
    assert _emulated_kinds(PoolMean(kernel_size=3, stride=2).eval(), x) == ["reduction"]
