"""The CUDA path: emitted source (nvcc / NVRTC compile checks and an emulated run on the CPU), the launch
planning, the NVRTC disk cache, and — on a GPU (`pytest -m gpu`) — numerics against eager, CUDA graphs and
warm starts."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(__file__))

import cuda_emu  # noqa: E402
from cuda_cases import CASES, ROW_CASES  # noqa: E402
import numerics  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.capture import decompositions  # noqa: E402
from fusebackend.emit import cuda_target as E  # noqa: E402
from fusebackend.emit.cuda import emit_cuda  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import fuse_vertical, rematerialize  # noqa: E402
from fusebackend.runtime import build_program  # noqa: E402
from fusebackend.runtime import cuda_compiler as CC  # noqa: E402
from fusebackend.runtime.steps import LayoutMismatch  # noqa: E402

F = torch.nn.functional
INCLUDE = CC.INCLUDE


# ---------------------------------------------------------------- the graphs: tests/cuda_cases.py



def capture(fn, args):
    """(FusionGraph, groups) of fn's ATen graph, as the fuse backend would build them."""
    got = []

    def comp(gm, example_inputs):
        got.append(gm)
        return gm
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=comp, inference_compiler=comp, decompositions=decompositions.table())
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*args)
    fg = rematerialize(lower(got[0]))
    return fg, fuse_vertical(fg)


def cuda_sources(fn, args):
    fg, groups = capture(fn, args)
    return [emit_cuda(fg, g) for g in groups if g.is_kernel]


# ---------------------------------------------------------------- compile checks (no GPU)

@pytest.mark.parametrize("name", sorted(CASES))
def test_nvcc_compiles(name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    fn, make = CASES[name]
    specs = cuda_sources(fn, make("cpu"))
    if name == "empty":
        return
    assert specs, "no kernel group"
    for spec in specs:
        assert spec.target == "cuda" and "#include <" not in spec.source
        src = tmp_path / ("%s.cu" % spec.name)
        src.write_text(spec.source)
        res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-I", INCLUDE, str(src),
                              "-o", str(tmp_path / ("%s.o" % spec.name))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:] + "\n" + spec.source


def _nvrtc_usable():
    try:
        CC._cupy()
        return True
    except CC.CupyMissing:
        return False


@pytest.mark.skipif(not _nvrtc_usable(), reason="CuPy with NVRTC not installed")
@pytest.mark.parametrize("name", ["softmax", "layernorm_gelu_bf16", "pointwise_chain", "int64_sum", "bool_ops"])
def test_nvrtc_compiles_and_caches(name, tmp_path):
    fn, make = CASES[name]
    for spec in cuda_sources(fn, make("cpu")):
        CC.clear_memory()
        before = dict(CC.stats)
        image = CC.compile_image(spec.source, spec.name, 90, str(tmp_path))
        assert image and CC.stats["nvrtc"] == before["nvrtc"] + 1
        CC.clear_memory()
        assert CC.compile_image(spec.source, spec.name, 90, str(tmp_path)) == image
        assert CC.stats["disk"] == before["disk"] + 1
        entry = next(p for p in (tmp_path / "cuda").iterdir() if p.name.endswith(".cubin"))
        entry.write_bytes(b"corrupt")            # a corrupt entry is rebuilt, not loaded
        CC.clear_memory()
        assert CC.compile_image(spec.source, spec.name, 90, str(tmp_path)) == image
        assert CC.stats["nvrtc"] == before["nvrtc"] + 2
        for p in (tmp_path / "cuda").iterdir():
            p.unlink()


def test_missing_cupy_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    monkeypatch.setitem(sys.modules, "cupy_backends", None)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda", None)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", None)
    spec = cuda_sources(*_case_args("pointwise_tail"))[0]
    with pytest.raises(CC.CupyMissing, match="pip install cupy-cuda13x"):
        CC.launcher(spec, FuseOptions())


def _case_args(name):
    fn, make = CASES[name]
    return fn, make("cpu")


# ---------------------------------------------------------------- launch planning (no GPU)

def test_plan_pointwise_grid(monkeypatch):
    spec = cuda_sources(*_case_args("pointwise_chain"))[0]
    dev = CC.DeviceInfo(sm_count=132)
    meta = [1 << 26, 1] + [1, 0] * 3
    monkeypatch.setattr("fusebackend.runtime.cuda_launch.PW_WAVES", 0)      # uncapped: one chunk per thread
    grid, block, smem = CC.plan_launch(spec, meta, dev, lambda t, s: 4)
    assert block == 256 and grid == (1 << 26) // spec.launch["vec"] // 256 and smem == 0
    monkeypatch.setattr("fusebackend.runtime.cuda_launch.PW_WAVES", 8)      # the default: 8 waves of 4 blocks/SM
    grid, block, smem = CC.plan_launch(spec, meta, dev, lambda t, s: 4)
    assert block == 256 and grid == 132 * 4 * 8 and smem == 0
    monkeypatch.setattr("fusebackend.runtime.cuda_launch.PW_WAVES", 1)
    grid, block, smem = CC.plan_launch(spec, meta, dev, lambda t, s: 4)
    assert block == 256 and grid == 132 * 4 and smem == 0
    grid, block, _ = CC.plan_launch(spec, [10, 3] + [3, 1] * 3, dev)
    assert grid == 1 and block == 32
    assert CC.plan_launch(spec, [0, 3] + [3, 1] * 3, dev) is None


def test_plan_rows_that_do_not_fit_fall_back():
    spec = cuda_sources(*_case_args("softmax"))[0]
    assert spec.launch["cache"] == "reg"
    dev = CC.DeviceInfo(sm_count=4)
    meta = [64, 4096] + [4096, 1] * 3
    grid, block, smem = CC.plan_launch(spec, meta, dev)
    assert block == spec.launch["threads"] and block * spec.launch["items_per_thread"] >= 4096
    with pytest.raises(LayoutMismatch):
        CC.plan_launch(spec, [64, 1 << 20] + [1 << 20, 1] * 3, dev)
    with pytest.raises(LayoutMismatch):
        CC.plan_launch(spec, meta, dev, lambda t, s: 0)


def test_plan_shared_memory_limit(monkeypatch):
    monkeypatch.setattr(E, "REG_BUDGET", 0)
    monkeypatch.setattr(E, "WARP_ROW_MAX", 0)
    spec = cuda_sources(*_case_args("softmax"))[0]
    assert spec.launch["cache"] == "smem"
    meta = [64, 4096] + [4096, 1] * 3
    _, _, smem = CC.plan_launch(spec, meta, CC.DeviceInfo(4, smem_optin=227 * 1024))
    assert smem == 4096 * spec.launch["smem_per_elem"]
    with pytest.raises(LayoutMismatch):
        CC.plan_launch(spec, meta, CC.DeviceInfo(4, smem_optin=16 * 1024))


def test_source_has_no_launch_shape():
    """Threads and grid come from the runtime; the source holds only the compile-time bound."""
    spec = cuda_sources(*_case_args("pointwise_chain"))[0]
    assert "blockDim.x" in spec.source and "gridDim.x" in spec.source
    assert spec.launch["threads"] <= spec.launch["bound"]


# ---------------------------------------------------------------- emulated runs on the CPU

def compile_emulated(fn, used):
    def compiler(gm, example_inputs):
        fg = rematerialize(lower(gm))
        groups = fuse_vertical(fg)
        kernels = {}
        for g in groups:
            if g.is_kernel:
                spec = emit_cuda(fg, g)
                launch = cuda_emu.launcher(spec)
                kernels[g.id] = (spec, launch)
                used.append((spec, launch))
        return build_program(fg, groups, kernels, FuseOptions())
    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler,
                           decompositions=decompositions.table())
    return torch.compile(fn, backend=backend)


def _emulated_check(name):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    fn, make = CASES[name]
    used = []
    compiled = compile_emulated(fn, used)
    with torch.no_grad():
        numerics.assert_matches(fn, compiled, make("cpu"))
    if name != "empty":
        assert used and all(launch.shapes for _, launch in used), "no CUDA kernel ran"
    return used


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_matches_eager(name):
    _emulated_check(name)


@pytest.mark.parametrize("name", ROW_CASES)
@pytest.mark.parametrize("tier", ["smem", "recompute"])
def test_emulated_row_cache_tiers(name, tier, monkeypatch):
    """The row held in shared memory, or recomputed, instead of registers."""
    monkeypatch.setattr(E, "REG_BUDGET", 0)
    monkeypatch.setattr(E, "WARP_ROW_MAX", 0)
    if tier == "recompute":
        monkeypatch.setattr(E, "SMEM_CACHE_MAX", 0)
    # column kernels (rows strided in memory, emit/cuda_rows.py) always recompute: no tier to choose
    used = [(spec, x) for spec, x in _emulated_check(name) if spec.launch.get("shape") != "row_column"]
    assert any(spec.launch.get("cache") == tier for spec, _ in used) or \
        all(spec.launch.get("cache") in ("none", tier) for spec, _ in used)


# ---------------------------------------------------------------- on the GPU

def _fuse(fn, **options):
    torch._dynamo.reset()
    return torch.compile(fn, backend="fuse", options=options or None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_matches_eager(name):
    fn, make = CASES[name]
    args = make("cuda")
    rep = fusebackend.explain(fn, *args, options={"fallback": "error"})
    if name != "empty":
        assert rep.num_kernels >= 1 and not rep.fallbacks, str(rep)
    compiled = _fuse(fn, fallback="error")
    with torch.no_grad():
        for _ in range(2):
            args = make("cuda")
            numerics.assert_matches(fn, compiled, args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ROW_CASES)
@pytest.mark.parametrize("tier", ["smem", "recompute"])
def test_gpu_row_cache_tiers(name, tier, monkeypatch):
    monkeypatch.setattr(E, "REG_BUDGET", 0)
    monkeypatch.setattr(E, "WARP_ROW_MAX", 0)
    if tier == "recompute":
        monkeypatch.setattr(E, "SMEM_CACHE_MAX", 0)
    fn, make = CASES[name]
    compiled = _fuse(fn, fallback="error")
    with torch.no_grad():
        numerics.assert_matches(fn, compiled, make("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["softmax", "layernorm_gelu_bf16", "broadcast_bias", "transposed",
                                  "pointwise_misaligned", "var_mean"])
def test_gpu_cudagraphs(name):
    fn, make = CASES[name]
    compiled = _fuse(fn, cudagraphs=True, fallback="error")
    fixed = make("cuda")
    with torch.no_grad():
        for i in range(4):                 # warm-up, capture, replays with new inputs
            args = make("cuda")
            numerics.assert_matches(fn, compiled, args)
        for i in range(2):                 # the same tensors again: no copy, still right
            numerics.assert_matches(fn, compiled, fixed)
            fixed[0].normal_()
            numerics.assert_matches(fn, compiled, fixed)


@pytest.mark.gpu
def test_gpu_cudagraphs_shape_change_recaptures():
    fn = lambda x: torch.softmax(x * 2, -1)
    compiled = _fuse(fn, cudagraphs=True, fallback="error")
    with torch.no_grad():
        for shape in [(64, 512), (64, 512), (64, 512), (32, 256), (32, 256), (32, 256), (64, 512)]:
            numerics.assert_matches(fn, compiled, (torch.randn(*shape, device="cuda"),))


@pytest.mark.gpu
def test_gpu_warm_start_hits_disk_cache():
    fn, make = CASES["softmax"]
    args = make("cuda")
    _fuse(fn)(*args)
    fusebackend.reset()
    before = dict(CC.stats)
    with torch.no_grad():
        numerics.assert_matches(fn, _fuse(fn), args)
    assert CC.stats["nvrtc"] == before["nvrtc"]
    assert CC.stats["disk"] > before["disk"]


@pytest.mark.gpu
def test_gpu_noncontiguous_and_broadcast_inputs():
    fn = lambda x, b, m: torch.softmax(x * 0.5 + b, -1) * m
    compiled = _fuse(fn, fallback="error")
    x = torch.randn(512, 300, device="cuda").t()          # non-contiguous
    b = torch.randn(512, device="cuda")                    # broadcast along rows
    m = torch.randn(300, 1, device="cuda").expand(300, 512)  # stride-0 broadcast
    with torch.no_grad():
        numerics.assert_matches(fn, compiled, (x, b, m))


@pytest.mark.gpu
def test_gpu_cudagraphs_inputs_captured_in_place():
    """A tensor passed again (a parameter) is read in place, in-place updates show; new storage recaptures."""
    fn = lambda x, w: F.layer_norm(x, (256,), w) * 2
    compiled = _fuse(fn, cudagraphs=True, fallback="error")
    w = torch.randn(256, device="cuda")
    with torch.no_grad():
        for i in range(4):
            numerics.assert_matches(fn, compiled, (torch.randn(64, 256, device="cuda"), w))
            w.mul_(1.5)                        # an optimizer step, in place
        w2 = torch.randn(256, device="cuda")   # other storage: copied from now on
        for i in range(3):
            numerics.assert_matches(fn, compiled, (torch.randn(64, 256, device="cuda"), w2))
            w2.add_(1.0)


def test_a_product_rounds_before_its_consumer_unless_it_is_exact():
    """--fmad=true lets NVRTC fuse a*b+c; a graph's multiply is fb::Mul (rounded first: fb::mul_rn) unless a
    power-of-two constant makes the product exact (fb::MulExact, free to contract)."""
    x, m = torch.randn(8, 64), torch.randn(8, 64)
    exact = "".join(s.source for s in cuda_sources(lambda x, m: torch.softmax(x * 0.125 + m, -1), (x, m)))
    inexact = "".join(s.source for s in cuda_sources(lambda x, m: torch.softmax(x * 0.1 + m, -1), (x, m)))
    graph_mul = re.compile(r"fb::Mul::exec\((?![^)]*fb_rcp)")      # not the softmax's per-row reciprocal
    assert "fb::MulExact::exec" in exact and not graph_mul.search(exact)
    assert graph_mul.search(inexact) and "fb::MulExact::exec" not in inexact
    assert "--fmad=true" in CC.BASE_OPTIONS
