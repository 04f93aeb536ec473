"""The CUDA kernels that write their inputs in place (passes/inplace.py), run on the CPU emulator
(tests/cuda_emu.py: the generated CUDA source with pthreads as a block's threads, the runtime's real launch
planning and batch entries): optimizer steps and the aliasing cases of test_inplace_mutations.py against eager,
with the vector path (16-byte loads of a written input through fb::ldv_rw) and the scalar path both taken."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(__file__))

import cuda_emu  # noqa: E402
from test_inplace_mutations import CASES, _close, random_params, state_of  # noqa: E402

from fusebackend.capture import decompositions  # noqa: E402
from fusebackend.emit.cuda import emit_cuda  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import plan_groups  # noqa: E402
from fusebackend.runtime import build_program  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def compile_emulated(fn, specs):
    """fn compiled as the fuse backend compiles it for CUDA (mutations kept in the graph, every pass), the
    CUDA kernels run by the emulator on CPU tensors; every kernel source is appended to `specs`."""
    def compiler(gm, example_inputs):
        fg = lower(gm)
        groups, batches = plan_groups(fg, 200)
        kernels, by_source = {}, {}
        for g in groups:
            if g.is_kernel:
                spec = emit_cuda(fg, g)
                specs.append(spec)
                kernels[g.id] = (spec, by_source.setdefault(spec.source, cuda_emu.launcher(spec)))
        return build_program(fg, groups, kernels, FuseOptions(), batches)
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler,
                           decompositions=decompositions.table(), keep_inference_input_mutations=True)
    return torch.compile(fn, backend=backend)


def _shapes_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


# 16-byte chunks (inner sizes that are multiples of 4 floats) and the scalar path (odd sizes)
SHAPES = [(64, 32), (256,), (7, 13), (33,), (), (3, 1, 8)]


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_emulated_optimizer_steps_write_state_in_place(name):
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=True),
            "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)}[name]
    ref_ps, ps = _shapes_params(SHAPES), _shapes_params(SHAPES)
    ref, opt = make(ref_ps), make(ps)
    specs = []
    step = compile_emulated(opt.step, specs)
    for _ in range(3):
        ref.step()
        step()
    _close(state_of(opt, ps), state_of(ref, ref_ps), same_device=False)
    if name == "adamw":
        written = [s for s in specs if "ldv_rw" in s.source]
        assert written, "no kernel read a written input through 16-byte vectors"
        assert any(s.batch_name for s in written)


def test_emulated_random_params_adam():
    ref_ps, ps = random_params(12, seed=5), random_params(12, seed=5)
    ref = torch.optim.Adam(ref_ps, lr=1e-2, foreach=False)
    opt = torch.optim.Adam(ps, lr=1e-2, foreach=False)
    step = compile_emulated(opt.step, [])
    for _ in range(3):
        ref.step()
        step()
    _close(state_of(opt, ps), state_of(ref, ref_ps), same_device=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_mutated_inputs_match_eager(case):
    fn, make = CASES[case]
    torch.manual_seed(0)
    ea = make()
    torch.manual_seed(0)
    fa = make()
    ref = fn(*ea)
    with torch.no_grad():
        out = compile_emulated(fn, [])(*fa)
    rtol = 1e-3 if any(t.dtype == torch.float16 for t in ea) else 1e-5
    _close(fa, ea, rtol)
    _close(out, ref, rtol)
