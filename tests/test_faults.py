"""Faults: an out-of-memory inside a compiled call raises torch's OOM error and leaves the program usable; an
NVRTC compile failure falls back per group with one warning, as a g++ failure does on the CPU; an interrupted
cache write leaves no half-written entry."""
import os
import shutil
import warnings

import pytest
import torch

import fusebackend
from fusebackend.capture import kernels, records
from fusebackend.runtime import cache, cpu_compiler
from fusebackend.runtime import cuda_compiler as cc
from numerics import assert_matches


def _fuse_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("fusebackend")]


def two_groups(x, w):
    h = torch.tanh(x) * 3 @ w                   # a kernel, an ATen matmul, then a second kernel
    return (torch.exp(h) * 2,) + tuple(t * 2 + 1 for t in (x, x.t().contiguous().t() + 1))


class _OOMOnce:
    """torch.empty_strided / torch.empty raising torch.OutOfMemoryError on the n-th call while armed."""

    def __init__(self, monkeypatch, n):
        self.n, self.count = n, 0
        for name in ("empty_strided", "empty"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(real))

    def _wrap(self, real):
        def alloc(*a, **k):
            self.count += 1
            if self.count == self.n:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 2.00 MiB")
            return real(*a, **k)
        return alloc


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_out_of_memory_inside_a_call_raises_it_and_the_program_stays_usable(monkeypatch, nth):
    x, w = torch.randn(6, 8), torch.randn(8, 5)
    compiled = torch.compile(two_groups, backend="fuse")
    with records.collect() as reps:
        assert_matches(two_groups, compiled, (x, w))
    steps = [type(s).__name__ for r in reps for s in r.program.steps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        oom = _OOMOnce(monkeypatch, nth)
        with pytest.raises(torch.OutOfMemoryError):
            compiled(x, w)
        assert oom.count >= nth
        monkeypatch.undo()                                   # memory is free again
        for _ in range(2):
            assert_matches(two_groups, compiled, (torch.randn(6, 8), w))
    assert _fuse_warnings(caught) == []                      # no fallback: the same steps run
    assert [type(s).__name__ for r in reps for s in r.program.steps] == steps


class _FakeNVRTC:
    """NVRTC as CuPy exposes it: compiles every program except those containing `bad` (NVRTC's error)."""

    def __init__(self, bad):
        self.bad, self.compiled = bad, []

    def getVersion(self):
        return (12, 4)

    def getSupportedArchs(self):
        return [80, 90]

    def createProgram(self, source, name, headers, includes):
        return {"source": source, "name": name}

    def compileProgram(self, prog, opts):
        if self.bad in prog["source"]:
            raise RuntimeError("NVRTC_ERROR_COMPILATION (6)")
        self.compiled.append(prog["name"])

    def getProgramLog(self, prog):
        return "%s(12): error: identifier \"__fake_intrinsic\" is undefined" % prog["name"]

    def getCUBIN(self, prog):
        return b"\x7fELF-fake-cubin"

    def destroyProgram(self, prog):
        pass


def test_nvrtc_failure_falls_back_per_group_with_one_warning(monkeypatch, tmp_path):
    """The CUDA path of a compile (emit_cuda, the real compile_image with its NVRTC error handling) on the CPU
    emulator: the group NVRTC rejects runs as ATen, the other kernels still run, one warning names it."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    import cuda_emu
    from fusebackend.emit.cuda import emit_cuda
    nvrtc = _FakeNVRTC(bad="fb::Exp::")
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cc, "_cupy", lambda: (None, nvrtc))
    monkeypatch.setattr(cc, "_ident", {})
    monkeypatch.setattr(cc, "_images", {})
    launched = []

    def compile_cuda(spec, opts):
        cc.compile_image(spec.source, spec.name, 90, opts.cache_dir)      # raises CompileFailed for the bad one
        launch = cuda_emu.launcher(spec)
        launched.append(launch)
        return launch
    monkeypatch.setattr(kernels, "emit_kernel", emit_cuda)
    monkeypatch.setattr(kernels, "compile_kernel", compile_cuda)
    with warnings.catch_warnings(record=True) as caught, records.collect() as reps:
        warnings.simplefilter("always")
        assert_matches(two_groups, torch.compile(two_groups, backend="fuse"), (torch.randn(6, 8), torch.randn(8, 5)))
    msgs = _fuse_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "NVRTC failed" in msgs[0] and "exp" in msgs[0] and "test_faults.py" in msgs[0], msgs[0]
    assert len([f for r in reps for f in r.fallbacks]) == 1
    # the other kernels ran as kernels (one by one, or as one horizontal batch: then the batch entry, not each
    # kernel's own launcher, ran them)
    assert nvrtc.compiled and launched and sum(r.num_kernels for r in reps) >= 1
    names = os.listdir(os.path.join(tmp_path, "cuda"))
    assert not any(n.startswith(".tmp-") for n in names)                     # nothing half-written


@pytest.mark.parametrize("at", ["entry", "checksum"])
def test_interrupted_cache_write_leaves_no_half_written_entry(monkeypatch, tmp_path, at):
    """A KeyboardInterrupt while the compiled library is written (the entry, or its checksum after it): no
    temporary file stays, no entry is trusted, and the next compile rebuilds and loads it."""
    monkeypatch.setenv("FUSEBACKEND_CACHE_DIR", str(tmp_path))
    fusebackend.reset()
    real_fsync, writes = os.fsync, []

    def interrupt(fd):
        writes.append(fd)
        if len(writes) == (1 if at == "entry" else 2):
            raise KeyboardInterrupt
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", interrupt)
    f = lambda x: torch.sigmoid(x) * 3
    with pytest.raises(KeyboardInterrupt):
        torch.compile(f, backend="fuse")(torch.randn(4, 4))
    monkeypatch.setattr(os, "fsync", real_fsync)
    root = os.path.join(tmp_path, "cpu")
    names = os.listdir(root)
    assert not any(n.startswith(".tmp-") for n in names), names
    for so in (n for n in names if n.endswith(".so")):
        assert cache.load_verified(os.path.join(root, so)) is None       # present without a checksum: not trusted
    torch._dynamo.reset()
    fusebackend.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(f, torch.compile(f, backend="fuse"), (torch.randn(4, 4),))
    assert _fuse_warnings(caught) == []
    assert all(cache.load_verified(os.path.join(root, n)) is not None for n in os.listdir(root) if n.endswith(".so"))
    assert len(cpu_compiler._loaded) >= 1
