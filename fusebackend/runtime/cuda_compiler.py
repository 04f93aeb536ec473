"""CUDA kernels: NVRTC (through CuPy) to a cubin cached on disk, loaded with the driver API, launched on
PyTorch's current stream.

The per-call path is short: everything that depends only on shapes (grid, block, dynamic shared memory, the
function handle, the int64 meta values) is computed on the first call and kept; a call writes the operand
pointers into a ctypes copy of the kernel's by-value argument struct (`fb::KArgs`, emit/include/fb_cuda.h)
and calls cuLaunchKernel. No device buffer is allocated or copied per call.

Cache key: the source, the GPU architecture, the NVRTC version, the compile options and the header library's
text. Entries are checked by SHA-256 (runtime/cache.py): a corrupt entry is rebuilt, never loaded.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
import threading
import weakref

import torch

from . import cache
from .steps import LayoutMismatch

INCLUDE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "emit", "include")
INSTALL_HINT = "pip install cupy-cuda13x"
BASE_OPTIONS = ("-std=c++17",)
STATIC_SMEM = 512               # bytes of static shared memory a block-per-row kernel may use (fb_scratch)
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# Pointwise grid cap in full waves of resident blocks; 0: one chunk per thread, no cap. Measured on one H100
# (pointwise_chain_f32_64M, floor 0.268 ms): 1 wave 0.327 ms, 4 waves 0.294 ms, uncapped 0.276 ms.
PW_WAVES = 0
MAX_GRID = 2 ** 31 - 1


class CupyMissing(RuntimeError):
    pass


class CompileFailed(RuntimeError):
    pass


stats = {"nvrtc": 0, "disk": 0, "memory": 0}   # where compiled images came from (tests read it)
_images: dict = {}
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
        headers = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(INCLUDE, "*.h"))))
        _ident["id"] = (tuple(nvrtc.getVersion()), archs, cache.digest(headers))
    return _ident["id"]


def _target(arch: int, archs: tuple):
    """NVRTC's --gpu-architecture and the image kind: a cubin where NVRTC knows the chip, else PTX."""
    if not archs or arch in archs:
        return "--gpu-architecture=sm_%d" % arch, "cubin"
    lower = [a for a in archs if a <= arch]
    return "--gpu-architecture=compute_%d" % (max(lower) if lower else min(archs)), "ptx"


def options(arch: int) -> list:
    target, _ = _target(arch, _identity()[1])
    return list(BASE_OPTIONS) + [target, "-I" + INCLUDE]


def compile_image(source: str, name: str, arch: int, cache_dir: str | None = None) -> bytes:
    """The cubin (or PTX) of `source` for compute capability `arch` (e.g. 90): memory, disk, or NVRTC."""
    _, nvrtc = _cupy()
    version, archs, headers = _identity()
    target, kind = _target(arch, archs)
    opts = list(BASE_OPTIONS) + [target, "-I" + INCLUDE]
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


# ---------------------------------------------------------------- launch shapes (pure: tested without a GPU)

class DeviceInfo:
    """What the launch shape depends on, read once per device."""

    def __init__(self, sm_count: int, max_threads_per_sm: int = 2048, smem_optin: int = 48 * 1024,
                 arch: int = 90):
        self.sm_count, self.max_threads_per_sm = sm_count, max_threads_per_sm
        self.smem_optin, self.arch = smem_optin, arch

    @classmethod
    def of(cls, index: int) -> "DeviceInfo":
        p = torch.cuda.get_device_properties(index)
        optin = getattr(p, "shared_memory_per_block_optin", 0) or 48 * 1024
        return cls(p.multi_processor_count, getattr(p, "max_threads_per_multi_processor", 2048), optin,
                   p.major * 10 + p.minor)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def plan_launch(spec, meta, dev: DeviceInfo, occupancy=None):
    """(grid, block, dynamic shared bytes) for one launch, or None when there is nothing to compute.

    `occupancy(threads, smem)` gives resident blocks per SM (the driver's answer); without it the thread
    limit alone is used. Raises LayoutMismatch when the kernel cannot run this size on this device (the
    program then runs the group as ATen calls).
    """
    hints = spec.launch
    rank = len(spec.domain)
    sizes = [int(s) for s in meta[:rank]]
    occ = occupancy or (lambda threads, smem: max(1, dev.max_threads_per_sm // threads))
    shape = hints["shape"]
    vec = max(1, int(hints.get("vec", 1)))
    tmax = int(hints.get("threads_max", 1024))
    if shape == "pointwise":
        n = math.prod(sizes)
        if n == 0:
            return None
        chunks = -(-n // vec)
        threads = max(32, min(int(hints.get("threads", 256)), tmax, _round_up(chunks, 32)))
        smem = 0
        need = -(-chunks // threads)
    else:
        rdims = set(spec.reduce_dims)
        O = math.prod(s for d, s in enumerate(sizes) if d not in rdims)
        R = math.prod(s for d, s in enumerate(sizes) if d in rdims)
        if O == 0:
            return None
        items = int(hints.get("items_per_thread", 0))
        smem = 0
        if shape == "row_warp":
            if items and R > 32 * items:
                raise LayoutMismatch("row of %d elements exceeds the %d the kernel holds per warp" % (R, 32 * items))
            threads = max(32, min(int(hints.get("threads", 128)), tmax, 32 * O))
            need = -(-O // (threads // 32))
        else:
            if items:
                threads = int(hints["threads"])
                if R > threads * items:
                    raise LayoutMismatch("row of %d elements exceeds the %d the kernel holds per block"
                                         % (R, threads * items))
            else:
                pref = 256 if O >= 2 * dev.sm_count else 1024
                threads = max(32, min(pref, tmax, _round_up(-(-R // vec), 32)))
            smem = R * int(hints.get("smem_per_elem", 0))
            if smem + STATIC_SMEM > dev.smem_optin:
                raise LayoutMismatch("a row needs %d bytes of shared memory; the device allows %d per block"
                                     % (smem, dev.smem_optin))
            need = O
    per_sm = occ(threads, smem)
    if per_sm <= 0:
        raise LayoutMismatch("kernel cannot be resident with %d threads and %d bytes of shared memory"
                             % (threads, smem))
    waves = PW_WAVES if shape == "pointwise" else 1
    grid = max(1, min(MAX_GRID, min(need, dev.sm_count * per_sm * waves) if waves > 0 else need))
    return grid, threads, smem


def arg_struct(spec):
    """A ctypes struct laid out as fb::KArgs<NP, NM> for this kernel."""
    np_ = spec.num_operands
    nm = max(1, len(spec.domain) + sum(spec.operand_ranks))

    class KArgs(ctypes.Structure):
        _fields_ = [("p", ctypes.c_void_p * np_), ("m", ctypes.c_int64 * nm)]
    return KArgs()


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

    def __init__(self, spec, image: bytes, driver=None):
        self.spec, self.image = spec, image
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

    def function(self, index: int) -> int:
        if index not in self.funcs:
            import cupy
            with cupy.cuda.Device(index):
                module = self.driver.moduleLoadData(self.image)
                self.funcs[index] = (module, self.driver.moduleGetFunction(module, self.spec.name))
        return self.funcs[index][1]

    def device_info(self, index: int) -> DeviceInfo:
        return _device(index)

    def prepare(self, p: Prepared, tensors) -> None:
        index = tensors[-1].get_device() if tensors else torch.cuda.current_device()
        for i, t in enumerate(tensors):
            if t.get_device() != index:
                raise LayoutMismatch("operand %d is on %s, the kernel runs on cuda:%d" % (i, t.device, index))
        func = self.function(index)
        drv = self.driver

        def occupancy(threads, smem):
            key = (index, threads, smem)
            if key not in self.occ:
                if smem > 48 * 1024:
                    attr = getattr(drv, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES",
                                   CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
                    drv.funcSetAttribute(func, attr, smem)
                self.occ[key] = drv.occupancyMaxActiveBlocksPerMultiprocessor(func, threads, smem)
            return self.occ[key]
        plan = plan_launch(self.spec, p.values, self.device_info(index), occupancy)
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


def launcher(spec, opts):
    """Compile `spec` (a KernelSource, target "cuda") now; return its launch(tensors, meta) callable
    (with `.pack(values)`, which KernelStep uses to keep one prepared launch per step)."""
    _cupy()
    if not torch.cuda.is_available():
        raise RuntimeError("fusebackend: a CUDA kernel was requested but torch sees no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    image = compile_image(spec.source, spec.name, major * 10 + minor, getattr(opts, "cache_dir", None))
    return CudaKernel(spec, image)


def clear_memory() -> None:
    """Forget compiled images held in memory (the disk cache stays): the next compile is a warm start."""
    with _lock:
        _images.clear()
