"""Tiled CUDA pointwise kernels (emit/cuda_tiled.py): a transpose fused with pointwise work goes through
32 x 33 shared tiles, so loads run along the input's fastest dim and stores along the output's. nvcc (sm_90)
compiles the kernels; the CPU emulator of the generated CUDA (tests/cuda_emu.py) runs them against eager."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda_batch import compile_batched  # noqa: E402
from test_inplace_cuda_emu import compile_emulated  # noqa: E402

from fusebackend.emit import cuda_target as T  # noqa: E402
from fusebackend.runtime import cuda_compiler as CC  # noqa: E402
from fusebackend.runtime.batch import BatchKernelStep  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _bn_relu_to_nchw(x, rm, rv, w, b):
    """Batch norm (inference) + relu, spelled out so it is one kernel with per-channel operands (ATen's
    batch_norm stays an ATen call): the NHWC input through a tile, the [C] vectors read directly."""
    c = lambda v: v[:, None, None]
    return torch.relu((x - c(rm)) * torch.rsqrt(c(rv) + 1e-5) * c(w) + c(b)).contiguous()


def _two_outputs(x, y):
    u = x.t() * 2.0 + y            # an output and the producer of another: one kernel, two outputs
    return u, torch.sigmoid(u)


def _nhwc(shape, dtype=torch.float32):
    return torch.randn(shape, generator=_g()).to(dtype).contiguous(memory_format=torch.channels_last)


# name -> (fn, args, expected kernel kinds, exact)
CASES = {
    "transpose_70x45": (lambda x: x.t().contiguous(), lambda: (torch.randn(70, 45, generator=_g()),),
                        ["tiled"], True),
    "nchw_to_nhwc": (lambda x: x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format),
                     lambda: (torch.randn(2, 40, 9, 7, generator=_g()),), ["tiled"], True),
    "nhwc_to_nchw": (lambda x: x.permute(0, 3, 1, 2).contiguous(),
                     lambda: (torch.randn(2, 9, 7, 40, generator=_g()),), ["tiled"], True),
    "bn_relu_nhwc_to_nchw": (_bn_relu_to_nchw,
                             lambda: (_nhwc((2, 48, 6, 7)), torch.randn(48, generator=_g(1)),
                                      torch.rand(48, generator=_g(2)) + 0.5, torch.randn(48, generator=_g(3)),
                                      torch.randn(48, generator=_g(4))), ["tiled"], False),
    "bf16_transpose_mul": (lambda x, y: (x.t() * y + 1).contiguous(),
                           lambda: (torch.randn(96, 65, generator=_g()).bfloat16(),
                                    torch.randn(65, 96, generator=_g(1)).bfloat16()), ["tiled"], False),
    "bf16_nchw_to_nhwc": (lambda x: x.contiguous(memory_format=torch.channels_last),
                          lambda: (torch.randn(2, 64, 5, 8, generator=_g()).bfloat16(),), ["tiled"], True),
    "two_outputs": (_two_outputs, lambda: (torch.randn(70, 45, generator=_g()), torch.randn(45, 70, generator=_g(1))),
                    ["tiled"], False),
    "gpt2_k_transpose": (lambda k: k.view(2, 40, 4, 32).transpose(1, 2).transpose(-1, -2).contiguous(),
                         lambda: (torch.randn(2, 40, 128, generator=_g()),), ["tiled"], True),
    # a cat's part is read only where its branch is taken: never staged, so the plain kernel runs it
    "cat_part_plain": (lambda x, y: torch.cat([x.t(), y], 0) * 2.0,
                       lambda: (torch.randn(45, 70, generator=_g()), torch.randn(10, 45, generator=_g(1))),
                       ["pointwise"], True),
    "small_dims_plain": (lambda x: x.t().contiguous(), lambda: (torch.randn(16, 40, generator=_g()),),
                         ["pointwise"], True),
    "small_channels_plain": (lambda x: x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format),
                             lambda: (torch.randn(2, 3, 16, 16, generator=_g()),), ["pointwise"], True),
}


def _run(name):
    fn, make, kinds, exact = CASES[name]
    specs = []
    with torch.no_grad():
        got = compile_emulated(fn, specs)(*make())
        want = fn(*make())
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.stride() == w.stride() and g.dtype == w.dtype
        if exact:
            assert torch.equal(g, w)
        elif w.dtype == torch.bfloat16:
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-2, atol=1e-2)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert [s.kind for s in specs] == kinds, [s.kind for s in specs]
    return specs


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_matches_eager(name):
    _run(name)


def test_transpose_source_is_the_tiled_kernel():
    spec = _run("transpose_70x45")[0]
    assert spec.launch["shape"] == "tiled" and spec.launch["a_dims"] == [1] and spec.launch["b_dims"] == [0]
    src = spec.source
    fill = "fb_tile0[(TR0 + fb_k * %d) * %d + TC] = fb_r0[fb_k];" % (T.TILE_THREADS // 32, T.TILE + 1)
    assert "extern __shared__" in src and fill in src
    # phase 1 loads every row of the thread into registers before the first shared store
    assert src.index("fb_r0[fb_k] = ") < src.index(fill)
    assert "fb_tile0[fb_ta * %d + TR]" % (T.TILE + 1) in src and src.count("__syncthreads();") >= 2
    assert spec.launch["tile_a"] == T.TILE        # float32: a square tile


def test_two_byte_types_take_a_taller_tile():
    """bf16: the A side is 2 x TILE (twice the rows in flight per thread), stored in two lane passes."""
    spec = _run("bf16_nchw_to_nhwc")[0]
    assert spec.launch["tile_a"] == 2 * T.TILE and spec.launch["smem"] >= 2 * T.TILE * (T.TILE + 1) * 4
    assert "const int fb_ta = %d + TC;" % T.TILE in spec.source
    dev = CC.DeviceInfo(sm_count=132)
    grid, _, _ = CC.plan_launch(spec, [2, 64, 5, 8] + [0] * 8, dev, lambda t, s: 4)
    assert grid == 2 * 1 * 2          # N x ceil(C / 64) x ceil(H * W / 32) tiles (domain N, C, H, W)


def test_nchw_runs_span_h_and_w():
    """An NCHW input's H and W are contiguous: one side of the tile, so a 7x9 plane still fills it."""
    spec = _run("nhwc_to_nchw")[0]
    assert sorted(spec.launch["a_dims"]) == [2, 3] and spec.launch["b_dims"] == [1]


def test_plan_tiled_launch():
    spec = _run("nchw_to_nhwc")[0]          # domain (2, 9, 7, 40): A = C (40), B = W, H (63)
    dev = CC.DeviceInfo(sm_count=132)
    grid, block, smem = CC.plan_launch(spec, [2, 9, 7, 40] + [0] * 8, dev, lambda t, s: 4)
    assert (grid, block, smem) == (2 * 2 * 2, T.TILE_THREADS, spec.launch["smem"])
    assert CC.plan_launch(spec, [0, 9, 7, 40] + [0] * 8, dev, lambda t, s: 4) is None


def test_store_into_input_through_tiles():
    """An in-place update of a graph input (passes/inplace.py: the kernel writes the input) by a transpose."""
    def fn(x, y):
        x.add_(y.t() * 3.0)
    x, y = torch.randn(64, 48, generator=_g(1)), torch.randn(48, 64, generator=_g())
    want = x + y.t() * 3.0
    specs = []
    with torch.no_grad():
        compile_emulated(fn, specs)(x, y)
    assert torch.equal(x, want)
    assert "tiled" in [s.kind for s in specs]


def test_batch_of_tiled_kernels():
    """Horizontal batches: tiled kernels of their own sizes (one chain) and of two bodies (divergent)."""
    def fn(a, b, c):
        return a.t().contiguous(), b.t().contiguous(), (c.t() * 2.0).contiguous()
    make = lambda: (torch.randn(70, 45, generator=_g()), torch.randn(33, 100, generator=_g(1)),
                    torch.randn(40, 40, generator=_g(2)))
    programs = []
    compiled = compile_batched(fn, programs)
    with torch.no_grad():
        for _ in range(2):
            args = make()
            for g, w in zip(compiled(*args), fn(*args)):
                assert torch.equal(g, w)
    steps = [s for p in programs for s in p.steps]
    batch = [s for s in steps if isinstance(s, BatchKernelStep)]
    assert len(batch) == 1 and all(l[0] == "batch" for l in batch[0].launch.shapes)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if "plain" not in n])
def test_nvcc_compiles_tiled(name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    for spec in _run(name):
        src = tmp_path / ("%s.cu" % spec.name)
        src.write_text(spec.source)
        for defines in ([], ["-DFB_BATCH"]):
            res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-I", CC.INCLUDE, *defines, str(src),
                                  "-o", str(tmp_path / ("%s.o" % spec.name))], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-3000:] + "\n" + spec.source
