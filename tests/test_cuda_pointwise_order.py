"""CUDA pointwise kernels walk a permuted output in its memory order (emit/cuda_pointwise.iteration_order): a
channels-last value's channels fastest, so a warp's threads touch consecutive addresses. Run on the CPU
emulator of the generated CUDA (tests/cuda_emu.py); numerics and strides against eager."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_inplace_cuda_emu import compile_emulated  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _epilogue(x, y):
    return torch.relu(x * 2.0 + y) - 0.5


@pytest.mark.parametrize("shape", [(2, 8, 5, 3), (1, 16, 4, 4), (3, 1, 2, 7)])
def test_channels_last_epilogue_walks_channels_fastest_and_matches_eager(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    specs = []
    got = compile_emulated(_epilogue, specs)(x, y)
    want = _epilogue(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.stride() == want.stride()
    src = "\n".join(s.source for s in specs)
    if shape[1] > 1:
        # channels are the innermost index of the walk (32-bit divisions where the indices fit, 64-bit else)
        assert "i1 = r32_li % (uint32_t)d1;" in src and "i1 = rem_li % d1;" in src


def test_contiguous_epilogue_keeps_its_vectorised_walk():
    x, y = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    specs = []
    torch.testing.assert_close(compile_emulated(_epilogue, specs)(x, y), _epilogue(x, y), rtol=1e-5, atol=1e-6)
    assert "rem_li % d1;" not in "\n".join(s.source for s in specs)


def _pool_epilogue(x, scale):
    h = torch.relu(x * scale + 0.25)
    return torch.maximum(h[:, :, ::2], h[:, :, 1::2])


@pytest.mark.parametrize("dtype,channels,want_vec", [(torch.bfloat16, 16, 8), (torch.float32, 8, 4),
                                                     (torch.bfloat16, 6, 2), (torch.float32, 3, 1)])
def test_channels_last_walk_vectorises_along_the_channels(dtype, channels, want_vec):
    """The walk's innermost dim is the channels: 16-byte vectors along them (as many lanes as divide C), read
    through a strided pool's slices and written NHWC; a C that no vector divides stays scalar."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, 6, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    scale = (torch.rand(1, channels, 1, 1, generator=g) + 0.5).to(dtype)
    specs = []
    got = compile_emulated(_pool_epilogue, specs)(x, scale)
    want = _pool_epilogue(x, scale)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    (spec,) = [s for s in specs if s.kind == "pointwise"]
    assert spec.launch["vec"] == want_vec, spec.launch
    if want_vec > 1:
        assert "i1b = r32_cb % (uint32_t)d1;" in spec.source and "fb::ldv<%d>(" % want_vec in spec.source
