"""Run generated CUDA kernels on the CPU, for tests on machines without a GPU.

The kernel source is compiled by g++ with a small prelude that plays the CUDA execution model: every thread of
a block is a POSIX thread (blocks run one after another), __syncthreads is a block barrier, a warp shuffle is
an exchange through memory between two warp barriers, __shared__ arrays are per-block statics. The real
fb_cuda.h (argument struct, vector loads, warp/block all-reduce) and the real launch planning of
runtime/cuda_compiler.py are used, so these runs check the emitted indexing, vector paths, phase plans,
reductions and launch shapes; they say nothing about speed.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import types

import torch

from fusebackend.runtime import cuda_compiler as cc

INCLUDE = cc.INCLUDE
_DIR = os.path.join(tempfile.gettempdir(), "fusebackend-cuda-emu")

PRELUDE = r"""
#define __CUDACC__ 1
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx;
static emu_dim3 blockIdx, blockDim, gridDim;
static pthread_barrier_t emu_block_bar;
static pthread_barrier_t emu_warp_bar[32];
static uint64_t emu_slot[32][32];
static unsigned char* emu_smem;
static inline void __syncthreads() { pthread_barrier_wait(&emu_block_bar); }
template <class T> static T emu_shfl_xor(T v, int m) {
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  uint64_t b = 0; memcpy(&b, &v, sizeof(T));
  emu_slot[w][lane] = b;
  pthread_barrier_wait(&emu_warp_bar[w]);
  uint64_t o = emu_slot[w][lane ^ m];
  pthread_barrier_wait(&emu_warp_bar[w]);
  T r; memcpy(&r, &o, sizeof(T)); return r;
}
#define __shfl_xor_sync(mask, v, m) emu_shfl_xor((v), (m))
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
"""

HARNESS = r"""
struct emu_arg { unsigned tid; const void* args; };
static void* emu_thread(void* p) {
  emu_arg* a = (emu_arg*)p;
  threadIdx.x = a->tid; threadIdx.y = 0; threadIdx.z = 0;
  %(call)s;
  return 0;
}
extern "C" int emu_launch(const void* args, unsigned grid, unsigned block, unsigned smem) {
  if (block %% 32 || block > 1024) return 1;
  emu_smem = (unsigned char*)aligned_alloc(64, smem + 64);
  gridDim.x = grid; gridDim.y = gridDim.z = 1;
  blockDim.x = block; blockDim.y = blockDim.z = 1;
  pthread_barrier_init(&emu_block_bar, 0, block);
  for (unsigned w = 0; w < block / 32; ++w) pthread_barrier_init(&emu_warp_bar[w], 0, 32);
  pthread_attr_t attr; pthread_attr_init(&attr); pthread_attr_setstacksize(&attr, 1 << 20);
  pthread_t th[1024]; emu_arg ar[1024];
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b; blockIdx.y = blockIdx.z = 0;
    for (unsigned t = 0; t < block; ++t) { ar[t].tid = t; ar[t].args = args; pthread_create(&th[t], &attr, emu_thread, &ar[t]); }
    for (unsigned t = 0; t < block; ++t) pthread_join(th[t], 0);
  }
  pthread_barrier_destroy(&emu_block_bar);
  for (unsigned w = 0; w < block / 32; ++w) pthread_barrier_destroy(&emu_warp_bar[w]);
  free(emu_smem);
  return 0;
}
"""


def build(spec, batch=False):
    """Compile one KernelSource (target cuda) for the emulator; returns the ctypes entry emu_launch (running
    the kernel's batch entry, compiled with FB_BATCH, with batch=True)."""
    src = ("#define FB_BATCH 1\n" if batch else "") + spec.source
    src = src.replace("extern __shared__ __align__(16) unsigned char fb_smem[];",
                      "unsigned char* fb_smem = emu_smem;")
    src = re.sub(r"\b__shared__\s", "static ", src)
    nm = spec.num_meta
    if batch:
        call = "%s(*(const fb::BArgs<%d, %d>*)a->args)" % (spec.batch_name, spec.num_operands,
                                                           spec.launch["batch_max"])
    else:
        call = "%s(*(const fb::KArgs<%d, %d>*)a->args)" % (spec.name, spec.num_operands, nm)
    text = PRELUDE + src + HARNESS % {"call": call}
    os.makedirs(_DIR, exist_ok=True)
    key = hashlib.sha256((text + open(os.path.join(INCLUDE, "fb_cuda.h")).read()).encode()).hexdigest()[:20]
    so = os.path.join(_DIR, "emu_%s.so" % key)
    if not os.path.exists(so):
        cpp = os.path.join(_DIR, "emu_%s.cpp" % key)
        with open(cpp, "w") as f:
            f.write(text)
        tmp = so + ".%d.tmp" % os.getpid()
        res = subprocess.run(["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-I", INCLUDE,
                              cpp, "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("emulator build failed:\n" + res.stderr[-4000:])
        os.replace(tmp, so)
    fn = ctypes.CDLL(so).emu_launch
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class _EmuDriver:
    """The few driver calls CudaKernel makes, served by the emulator."""

    def __init__(self, fn, dev, batch_fn=None):
        self.fns, self.dev = {1: fn, 2: batch_fn}, dev     # function handles: 1 the kernel, 2 its batch entry
        self.launches = []

    def launchKernel(self, func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        assert gy == gz == by == bz == 1 and extra == 0
        args = ctypes.c_void_p.from_address(params).value      # kernelParams[0]: the argument struct
        self.launches.append((gx, bx, smem) if func == 1 else ("batch", gx, bx, smem))
        fn = self.fns[func]
        if callable(fn) and not isinstance(fn, ctypes._CFuncPtr):
            fn = self.fns[func] = fn()
        if fn(args, gx, bx, smem) != 0:
            raise RuntimeError("emulator refused block size %d" % bx)

    def occupancyMaxActiveBlocksPerMultiprocessor(self, func, threads, smem):
        return max(1, self.dev.max_threads_per_sm // threads)

    def funcSetAttribute(self, func, attr, value):
        pass

    def funcGetAttribute(self, attr, func):
        return 0


class EmuKernel(cc.CudaKernel):
    """The runtime's CudaKernel (argument packing, launch planning, per-step preparation) on the emulator."""

    def __init__(self, spec, dev=None):
        self.dev = dev or cc.DeviceInfo(sm_count=2, max_threads_per_sm=2048, smem_optin=227 * 1024)
        super().__init__(spec, b"", driver=_EmuDriver(build(spec), self.dev, lambda: build(spec, batch=True)))
        self.stream = lambda index: 0

    def function(self, index, batch=False):
        return 2 if batch else 1

    def upload(self, values, index):
        return torch.tensor(values, dtype=torch.int64)

    def batch_function(self, source, name, nptr, k, table, index):
        """A batch entry of `source` (runtime/cuda_batch.entry_function: a divergent kernel, or table mode
        with table=True), built for the emulator; its handle (3, 4, ...) for the driver."""
        entries = self.__dict__.setdefault("entries", {})
        if (name, table) not in entries:
            args = (2, 1) if table else (nptr, k)
            spec = types.SimpleNamespace(source=("#define FB_TABLE 1\n" if table else "") + source,
                                         batch_name=name + ("_t" if table else ""),
                                         num_operands=args[0], num_meta=1,
                                         launch={"batch_max": args[1]})
            handle = entries[name, table] = 3 + len(entries)
            self.driver.fns[handle] = build(spec, batch=True)
        return entries[name, table]

    def device_info(self, index):
        return self.dev

    @property
    def shapes(self):
        return self.driver.launches


def launcher(spec, device=None):
    """A launch(tensors, meta) callable, as runtime/cuda_compiler.launcher returns, running on the emulator."""
    return EmuKernel(spec, device)
