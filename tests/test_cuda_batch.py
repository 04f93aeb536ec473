"""Horizontal batches on CUDA: the batch entry of the generated kernels (nvcc compile checks, runs on the CPU
emulator), the runtime's batch planning and output carving, and — on a GPU — numerics and one launch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(__file__))

import cuda_emu  # noqa: E402
import numerics  # noqa: E402
from test_cuda import CASES, INCLUDE, cuda_sources  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.capture import decompositions  # noqa: E402
from fusebackend.emit import cuda_target  # noqa: E402
from fusebackend.emit.cuda import emit_cuda  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import batch_horizontal, fuse_vertical  # noqa: E402
from fusebackend.runtime import build_program  # noqa: E402
from fusebackend.runtime.batch import ALIGN, BatchKernelStep, Outputs  # noqa: E402


def horizontal(*xs):
    return [(x * 2.0 + 1.0).relu() for x in xs]


def softmaxes(*xs):
    return [torch.softmax(x * 0.5, -1) for x in xs]


def _misaligned(*s):
    n = 1
    for v in s:
        n *= v
    return torch.randn(n + 1)[1:].view(*s)


# ---------------------------------------------------------------- the batch entry compiles (no GPU)

@pytest.mark.parametrize("name", ["pointwise_chain", "broadcast_bias", "transposed", "sliced_1d", "softmax",
                                  "softmax_short", "layernorm_gelu_bf16", "sum_dim0", "var_mean", "scalar_out"])
def test_nvcc_compiles_batch_entry(name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    fn, make = CASES[name]
    for spec in cuda_sources(fn, make("cpu")):
        assert spec.batch_name == spec.name + "_batch" and spec.launch["batch_max"] >= 1
        src = tmp_path / ("%s.cu" % spec.name)
        src.write_text(spec.source)
        res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-DFB_BATCH", "-I", INCLUDE, str(src),
                              "-Xptxas", "-v", "-o", str(tmp_path / ("%s.o" % spec.name))],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:] + "\n" + spec.source
        assert spec.batch_name in res.stderr, res.stderr          # -DFB_BATCH compiles the batch entry
        assert "0 bytes stack frame" in res.stderr, res.stderr     # the pointer table stays in parameter space


# ---------------------------------------------------------------- emulated runs on the CPU

def compile_batched(fn, programs):
    """fn compiled as the fuse backend would (vertical + horizontal fusion), CUDA kernels on the emulator."""
    def compiler(gm, example_inputs):
        fg = lower(gm)
        groups, batches = batch_horizontal(fg, fuse_vertical(fg))
        kernels, by_source = {}, {}
        for g in groups:
            if g.is_kernel:
                spec = emit_cuda(fg, g)
                launch = by_source.setdefault(spec.source, cuda_emu.launcher(spec))
                kernels[g.id] = (spec, launch)
        program = build_program(fg, groups, kernels, FuseOptions(), batches)
        programs.append(program)
        return program
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler,
                           decompositions=decompositions.table())
    return torch.compile(fn, backend=backend)


def _run_batched(fn, make, calls=2):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    programs = []
    compiled = compile_batched(fn, programs)
    with torch.no_grad():
        for _ in range(calls):
            numerics.assert_matches(fn, compiled, make())
    steps = [s for p in programs for s in p.steps]
    batch = [s for s in steps if isinstance(s, BatchKernelStep)]
    assert len(batch) == 1 and len(steps) == 1, [type(s).__name__ for s in steps]
    return batch[0]


def test_emulated_pointwise_batch_is_one_launch():
    """Sizes of their own, a misaligned input (scalar path for that problem only) and an empty problem."""
    def make():
        xs = [torch.randn(8 + 4 * (i % 5), 32) for i in range(9)]
        xs[0] = torch.randn(100, 64)        # several blocks; other trailing dims: outputs carved flat
        xs[3] = _misaligned(12, 32)
        xs[6] = torch.randn(0, 32)
        return tuple(xs)
    step = _run_batched(horizontal, make)
    launches = step.launch.shapes
    assert len(launches) == 2 and all(l[0] == "batch" for l in launches), launches
    assert step.plan.launches[0].sel is not None          # the empty problem is left out of the table
    # graph outputs: storages of their own, as eager returns them (intermediates are carved from one buffer)
    assert step.outputs.mode == "each" and step.plan.launches[0].grid > 8


def row_sums(*xs):
    return [x.sum(-1) * 2 for x in xs]


@pytest.mark.parametrize("fn", [softmaxes, row_sums])
def test_emulated_rows_batch(fn):
    """Row reductions of several sizes (row and per-row outputs): one block size for all."""
    step = _run_batched(fn, lambda: tuple(torch.randn(3 + 5 * i, 256) for i in range(4)))
    assert [l[0] for l in step.launch.shapes] == ["batch", "batch"]


def test_emulated_block_rows_batch():
    step = _run_batched(softmaxes, lambda: tuple(torch.randn(2 + i, 3000) for i in range(3)), calls=1)
    assert step.launch.spec.launch["shape"] == "row_block"


def test_emulated_batch_in_chunks(monkeypatch):
    """More problems than one argument struct holds: one launch, the problem table in device memory (argument
    mode in launches of 5 under a CUDA graph capture: tests/test_horizontal_divergent.py)."""
    monkeypatch.setattr(cuda_target, "MAX_PARAM_BYTES", 8 * 2 * 5 + 4 * 5 + 24)     # 5 problems per launch
    step = _run_batched(horizontal, lambda: tuple(torch.randn(4 + i, 16) for i in range(12)), calls=1)
    assert step.launch.spec.launch["batch_max"] == 5
    assert step.plan.mode == "table" and len(step.plan.launches) == 1 and len(step.launch.shapes) == 1


# ---------------------------------------------------------------- outputs from one allocation (no GPU)

def test_outputs_rows_split_and_aligned_offsets():
    f32 = torch.float32
    rows = Outputs([((4, 8), (8, 1), f32), ((12, 8), (8, 1), f32)], torch.device("cpu"))
    assert rows.mode == "rows"
    outs, addrs = rows()
    assert [tuple(t.shape) for t in outs] == [(4, 8), (12, 8)] and [t.data_ptr() for t in outs] == addrs
    flat = Outputs([((3, 5), (5, 1), f32), ((7,), (1,), f32), ((), (), f32), ((2, 2), (2, 1), f32)],
                   torch.device("cpu"))
    assert flat.mode == "flat"
    outs, addrs = flat()
    assert [tuple(t.shape) for t in outs] == [(3, 5), (7,), (), (2, 2)]
    assert [t.data_ptr() for t in outs] == addrs
    assert all((a - addrs[0]) % ALIGN == 0 for a in addrs) and all(t.is_contiguous() for t in outs)
    mixed = Outputs([((3,), (1,), f32), ((3,), (1,), torch.bfloat16)], torch.device("cpu"))
    assert mixed.mode == "each"
    outs, addrs = mixed()
    assert [t.dtype for t in outs] == [f32, torch.bfloat16]


# ---------------------------------------------------------------- on the GPU

HORIZONTAL_100 = [(64 + 32 * (i % 8), 256) for i in range(100)]


@pytest.mark.gpu
@pytest.mark.parametrize("cudagraphs", [False, True])
def test_gpu_horizontal_100_is_one_launch(cudagraphs):
    make = lambda: tuple(torch.randn(*s, device="cuda") for s in HORIZONTAL_100)
    rep = fusebackend.explain(horizontal, *make(), options={"fallback": "error"})
    assert rep.num_kernels == 1 and not rep.fallbacks, str(rep)
    torch._dynamo.reset()
    compiled = torch.compile(horizontal, backend="fuse", options={"fallback": "error", "cudagraphs": cudagraphs})
    with torch.no_grad():
        for _ in range(4):
            numerics.assert_matches(horizontal, compiled, make())


@pytest.mark.gpu
def test_gpu_batches_of_rows_and_odd_sizes():
    for fn, make in [(softmaxes, lambda: tuple(torch.randn(3 + 50 * i, 1000, device="cuda") for i in range(6))),
                     (horizontal, lambda: tuple(torch.randn(7 + i, 13, device="cuda") for i in range(30)))]:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="fuse", options={"fallback": "error"})
        with torch.no_grad():
            for _ in range(2):
                numerics.assert_matches(fn, compiled, make())
