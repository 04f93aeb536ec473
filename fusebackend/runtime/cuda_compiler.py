"""CUDA kernels: NVRTC (through CuPy) to a cubin cached on disk, loaded with the driver API, launched on
PyTorch's current stream.

The per-call path is short: everything that depends only on shapes (grid, block, dynamic shared memory, the
function handle, the int64 meta values) is computed on the first call and kept; a call writes the operand
pointers into a ctypes copy of the kernel's by-value argument struct (`fb::KArgs`, emit/include/fb_cuda.h)
and calls cuLaunchKernel. No device buffer is allocated or copied per call. A horizontal batch launches the
kernel's batch entry (compiled on first use with -DFB_BATCH; planned in runtime/cuda_batch.py) the same way.

Cache key: the source, the GPU architecture, the NVRTC version, the compile options and the header library's
text. Entries are checked by SHA-256 (runtime/cache.py): a corrupt entry is rebuilt, never loaded.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
import weakref

import torch

from . import cache
from .cuda_launch import DeviceInfo, arg_struct, plan_launch
from .lru import BoundedCache
from .steps import LayoutMismatch

INCLUDE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "emit", "include")
INSTALL_HINT = "pip install cupy-cuda13x"
# --fmad=true, as eager's kernels are built: the device math library without contraction cost masked_softmax
# 16% on the H200 (0.2525 vs 0.2109 ms, bench/tune_rows.py, 2026-12-04). A graph's own multiplies round
# before a consumer's add all the same (fb::mul_rn, emit/include/fb_math.h says why).
BASE_OPTIONS = ("-std=c++17", "--fmad=true")
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CupyMissing(RuntimeError):
    pass


class CompileFailed(RuntimeError):
    pass


stats = {"nvrtc": 0, "disk": 0, "memory": 0}   # where compiled images came from (tests read it)
# Compiled images held in memory: at most MAX_IMAGES entries and MAX_IMAGE_BYTES in all (least recently used
# dropped; runtime/lru.py). Loaded modules live with the kernels that launch them (live_kernels).
MAX_IMAGES = int(os.environ.get("FUSEBACKEND_MAX_LOADED_KERNELS", "2048"))
MAX_IMAGE_BYTES = 256 << 20
_images = BoundedCache(MAX_IMAGES, MAX_IMAGE_BYTES)
live_kernels = weakref.WeakSet()                 # loaded kernels, for debugging and dumps
_lock = threading.Lock()
_ident: dict = {}


def _cupy():
    """(driver, nvrtc) from CuPy, or a clear error naming the package to install."""
    try:
        from cupy.cuda import driver
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:    # ImportError, or CuPy present but its NVRTC library missing
        raise CupyMissing("fusebackend: CUDA kernels are compiled with NVRTC through CuPy, which is not "
                          "usable here (%s: %s); install it with `%s` (cupy-cuda12x for CUDA 12)"
                          % (type(e).__name__, e, INSTALL_HINT)) from None
    return driver, nvrtc


def _identity() -> tuple:
    """(NVRTC version, supported architectures, digest of the header library), computed once."""
    if "id" not in _ident:
        _, nvrtc = _cupy()
        try:
            archs = tuple(sorted(int(a) for a in nvrtc.getSupportedArchs()))
        except Exception:
            archs = ()
        headers = "".join(_read(p) for p in sorted(glob.glob(os.path.join(INCLUDE, "*.h"))))
        _ident["id"] = (tuple(nvrtc.getVersion()), archs, cache.digest(headers))
    return _ident["id"]


def _read(path: str) -> str:
    with open(path) as f:         # closed now: a ResourceWarning per header surfaced in users' runs (HF generate)
        return f.read()


def _target(arch: int, archs: tuple):
    """NVRTC's --gpu-architecture and the image kind: a cubin where NVRTC knows the chip, else PTX."""
    if not archs or arch in archs:
        return "--gpu-architecture=sm_%d" % arch, "cubin"
    lower = [a for a in archs if a <= arch]
    return "--gpu-architecture=compute_%d" % (max(lower) if lower else min(archs)), "ptx"


def options(arch: int) -> list:
    target, _ = _target(arch, _identity()[1])
    return list(BASE_OPTIONS) + [target, "-I" + INCLUDE]


def compile_image(source: str, name: str, arch: int, cache_dir: str | None = None, defines=()) -> bytes:
    """The cubin (or PTX) of `source` for compute capability `arch` (e.g. 90): memory, disk, or NVRTC.
    `defines`: extra -D options (-DFB_BATCH compiles a kernel's batch entry)."""
    _, nvrtc = _cupy()
    version, archs, headers = _identity()
    target, kind = _target(arch, archs)
    opts = list(BASE_OPTIONS) + [target, "-I" + INCLUDE] + list(defines)
    key = cache.digest(source, arch, version, headers, opts)
    with _lock:
        if key in _images:
            stats["memory"] += 1
            return _images[key]
    root = os.path.join(cache.cache_dir(cache_dir), "cuda")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "%s_%s.%s" % (name, key, kind))
    with cache.locked(path):
        data = cache.load_verified(path)
        if data is None:
            data = _nvrtc(nvrtc, source, name, opts, kind)
            cache.store(path, data)
            stats["nvrtc"] += 1
        else:
            stats["disk"] += 1
    with _lock:
        _images[key] = data
    return data


def _nvrtc(nvrtc, source: str, name: str, opts: list, kind: str) -> bytes:
    prog = nvrtc.createProgram(source, name + ".cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as e:
            try:
                log = nvrtc.getProgramLog(prog)
            except Exception:
                log = ""
            raise CompileFailed("NVRTC failed on %s (%s):\n%s" % (name, e, log[-4000:])) from None
        if kind == "cubin":
            return bytes(nvrtc.getCUBIN(prog))
        ptx = nvrtc.getPTX(prog)
        return (ptx if isinstance(ptx, bytes) else ptx.encode()).rstrip(b"\0") + b"\0"
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------- loading and launching

_devices: dict = {}


def _device(index: int) -> DeviceInfo:
    if index not in _devices:
        _devices[index] = DeviceInfo.of(index)
    return _devices[index]


def _stream_getter():
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


class Prepared:
    """One call site's launch: its own argument struct (meta values filled once) and launch shape.

    KernelStep keeps what `pack` returns and passes it back on every call, so steps that share a kernel
    (identical sources) never share argument buffers or shapes. A plain list (DynamicKernelStep) is
    prepared again on each call."""
    __slots__ = ("values", "args", "ptrs", "params", "params_addr", "index", "func", "grid", "block", "smem")

    def __init__(self, spec, values):
        self.values = list(values)
        self.args = arg_struct(spec)
        self.ptrs = self.args.p
        m = self.args.m
        m[:] = self.values + [0] * (len(m) - len(self.values))
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self.params_addr = ctypes.addressof(self.params)
        self.func = None


class CudaKernel:
    """One compiled kernel, itself the launch(tensors, meta) callable that KernelStep calls each time."""

    def __init__(self, spec, image: bytes, driver=None, batch_image=None):
        self.spec, self.image = spec, image
        self.batch_image = batch_image  # () -> the image of the batch entry, compiled on first use
        self.driver = driver if driver is not None else _cupy()[0]
        self.funcs: dict = {}
        self.occ: dict = {}
        self.last = None            # the latest Prepared, for describe()
        self.stream = _stream_getter()
        live_kernels.add(self)

    def pack(self, values) -> Prepared:
        return Prepared(self.spec, values)

    def describe(self) -> dict:
        """Launch shape and resources of the latest prepared call (empty before the first call)."""
        p = self.last
        if p is None or p.func is None:
            return {}
        regs = self.driver.funcGetAttribute(4, p.func)       # CU_FUNC_ATTRIBUTE_NUM_REGS
        local = self.driver.funcGetAttribute(3, p.func)      # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        return {"name": self.spec.name, "grid": p.grid, "block": p.block, "smem": p.smem, "regs": regs,
                "local_bytes": local, "hints": dict(self.spec.launch)}

    def function(self, index: int, batch: bool = False) -> int:
        """The kernel's function handle on device `index` (its batch entry with batch=True)."""
        key = (index, batch)
        if key not in self.funcs:
            import cupy
            image = self.image
            if batch:
                if callable(self.batch_image):
                    self.batch_image = self.batch_image()
                image = self.batch_image
            with cupy.cuda.Device(index):
                module = self.driver.moduleLoadData(image)
                name = self.spec.batch_name if batch else self.spec.name
                self.funcs[key] = (module, self.driver.moduleGetFunction(module, name))
        return self.funcs[key][1]

    def device_info(self, index: int) -> DeviceInfo:
        return _device(index)

    def occupancy(self, func, index: int):
        """occupancy(threads, smem) -> resident blocks per SM of `func` (the driver's answer, kept)."""
        drv = self.driver

        def occupancy(threads, smem):
            key = (func, index, threads, smem)
            if key not in self.occ:
                if smem > 48 * 1024:
                    attr = getattr(drv, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES",
                                   CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
                    drv.funcSetAttribute(func, attr, smem)
                self.occ[key] = drv.occupancyMaxActiveBlocksPerMultiprocessor(func, threads, smem)
            return self.occ[key]
        return occupancy

    def prepare(self, p: Prepared, tensors) -> None:
        index = tensors[-1].get_device() if tensors else torch.cuda.current_device()
        for i, t in enumerate(tensors):
            if t.get_device() != index:
                raise LayoutMismatch("operand %d is on %s, the kernel runs on cuda:%d" % (i, t.device, index))
        func = self.function(index)
        plan = plan_launch(self.spec, p.values, self.device_info(index), self.occupancy(func, index))
        p.grid, p.block, p.smem = plan if plan is not None else (0, 0, 0)
        p.index, p.func = index, func
        self.last = p

    def __call__(self, tensors, meta):
        if type(meta) is not Prepared:
            meta = Prepared(self.spec, meta)
        if meta.func is None:
            self.prepare(meta, tensors)
        if meta.grid == 0:
            return
        meta.ptrs[:] = [t.data_ptr() for t in tensors]
        self.driver.launchKernel(meta.func, meta.grid, 1, 1, meta.block, 1, 1, meta.smem, self.stream(meta.index),
                                 meta.params_addr, 0)

    launch = __call__

    # horizontal batches (runtime/batch.py, planned and launched by runtime/cuda_batch.py)
    def upload(self, values, index: int) -> torch.Tensor:
        """int64 values in device memory (a batch's meta table), written once."""
        return torch.tensor(values, dtype=torch.int64, device=torch.device("cuda", index))


def launcher(spec, opts):
    """Compile `spec` (a KernelSource, target "cuda") now; return its launch(tensors, meta) callable
    (with `.pack(values)`, which KernelStep uses to keep one prepared launch per step)."""
    _cupy()
    if not torch.cuda.is_available():
        raise RuntimeError("fusebackend: a CUDA kernel was requested but torch sees no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    arch, cache_dir = major * 10 + minor, getattr(opts, "cache_dir", None)
    image = compile_image(spec.source, spec.name, arch, cache_dir)
    batch = None
    if spec.batch_name:
        batch = lambda: compile_image(spec.source, spec.batch_name, arch, cache_dir, ("-DFB_BATCH",))
    return CudaKernel(spec, image, batch_image=batch)


def clear_memory() -> None:
    """Forget compiled images held in memory (the disk cache stays): the next compile is a warm start."""
    with _lock:
        _images.clear()
