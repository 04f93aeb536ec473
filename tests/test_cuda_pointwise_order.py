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
