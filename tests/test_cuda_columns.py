"""CUDA column reductions (emit/cuda_rows.py, shape row_column): rows whose elements are strided in memory while
consecutive rows are adjacent -- a mean over H and W of an NHWC tensor, a softmax over dim 0 -- run a lane per
row, 32 rows a block, the warps splitting each row: coalesced reads. Run by the CPU emulator of generated CUDA
against eager, compiled by nvcc for sm_90 where it is installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda import cuda_sources  # noqa: E402
from test_inplace_cuda_emu import compile_emulated  # noqa: E402
from fusebackend.runtime.cuda_compiler import INCLUDE  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def nhwc_mean(x):
    return torch.relu(x * 1.5 - 0.25).mean((2, 3))


def col_softmax(x):
    return F.softmax(x, dim=0)


def col_var(x):
    return x.var(0), x.amax(0)


def _check(fn, args, rtol=1e-5, atol=1e-6, shape="row_column"):
    specs = cuda_sources(fn, args)
    shapes = [s.launch["shape"] for s in specs if s.kind == "reduction"]
    assert shapes and set(shapes) == {shape}, [s.launch for s in specs]
    with torch.no_grad():
        got = compile_emulated(fn, [])(*args)
        want = fn(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
    return specs


@pytest.mark.parametrize("shape", [(3, 40, 5, 7), (1, 64, 9, 2)])
def test_nhwc_mean_is_a_column_kernel_and_matches_eager(shape):
    x = torch.randn(shape, generator=_g(1)).contiguous(memory_format=torch.channels_last)
    _check(nhwc_mean, (x,))


def test_bf16_nhwc_mean_within_eager_error():
    x = torch.randn(2, 48, 6, 6, generator=_g(2)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    _check(nhwc_mean, (x,), rtol=1e-2, atol=1e-2)


def test_the_same_mean_of_an_nchw_tensor_stays_a_row_kernel():
    x = torch.randn(3, 40, 5, 7, generator=_g(3))
    specs = cuda_sources(nhwc_mean, (x,))
    assert [s.launch["shape"] for s in specs if s.kind == "reduction"] == ["row_warp"]


def test_a_two_phase_softmax_over_dim_0_writes_its_rows_from_the_columns():
    x = torch.randn(37, 70, generator=_g(4)) * 3
    _check(col_softmax, (x,))


def test_variance_and_max_over_dim_0():
    x = torch.randn(29, 33, generator=_g(5))
    _check(col_var, (x,))


def test_column_kernels_compile_with_nvcc_for_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    x = torch.randn(3, 40, 5, 7).contiguous(memory_format=torch.channels_last)
    for fn, args in ((nhwc_mean, (x,)), (col_softmax, (torch.randn(37, 70),))):
        for spec in cuda_sources(fn, args):
            src = tmp_path / ("%s.cu" % spec.name)
            src.write_text(spec.source)
            res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-I", INCLUDE, str(src),
                                  "-o", str(tmp_path / ("%s.o" % spec.name))], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-3000:] + "\n" + spec.source
