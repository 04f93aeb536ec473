"""A float softmax's division by its row sum is a product with the sum's reciprocal, taken once per row
(emit/rowdriver.py), in CUDA row kernels only; any other division by a per-row value stays a division (its
divisor may be a denormal, whose reciprocal is infinite). The CPU emulator of generated CUDA runs the kernels
against eager."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda import cuda_sources  # noqa: E402
from test_inplace_cuda_emu import compile_emulated  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _masked_softmax(s, m):
    return F.softmax(torch.where(m, s / 8.0, torch.finfo(s.dtype).min), dim=-1)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 5, 40)), (torch.bfloat16, (2, 4, 64)),
                                         (torch.float32, (4, 1030))])
def test_softmax_uses_the_reciprocal_and_matches_eager(dtype, shape):
    s = (torch.randn(shape, generator=_g()) * 4).to(dtype)
    m = torch.rand(shape[-2:], generator=_g(1)) > 0.3
    src = "".join(k.source for k in cuda_sources(_masked_softmax, (s, m)))
    assert "const float fb_rcp0 = 1.0f / " in src and "fb::Mul::exec(" in src
    specs = []
    with torch.no_grad():
        got = compile_emulated(_masked_softmax, specs)(s, m)
    want = _masked_softmax(s, m)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


def test_other_row_divisions_stay_divisions():
    def normalise(x):
        return x / x.abs().sum(-1, keepdim=True)
    x = torch.randn(4, 48, generator=_g(2))
    x[1] = 1e-42                     # a denormal row sum: its reciprocal would be inf
    src = "".join(k.source for k in cuda_sources(normalise, (x,)))
    assert "fb_rcp" not in src and "fb::Div::exec(" in src
    with torch.no_grad():
        got = compile_emulated(normalise, [])(x)
    torch.testing.assert_close(got, normalise(x), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(got).all()


def test_a_division_by_a_pointwise_row_value_emits_and_stays_a_division():
    """The divisor a per-row pointwise member (|mean| + 0.5), not a reduction: the kernel is emitted (the
    softmax check once asked any per-row divisor for its reduction op and failed) and divides."""
    def scaled(x):
        m = x.mean(-1, keepdim=True)
        return x / (m.abs() + 0.5), ((x - m) ** 2).sum(-1, keepdim=True)
    x = torch.randn(6, 33, generator=_g(3))
    src = "".join(k.source for k in cuda_sources(scaled, (x,)))
    assert "fb_rcp" not in src and "fb::Div::exec(" in src
    with torch.no_grad():
        got = compile_emulated(scaled, [])(x)
    for a, b in zip(got, scaled(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
