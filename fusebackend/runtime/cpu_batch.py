"""Horizontal batches on the CPU: every problem of a batch, whatever kernel it runs, in one parallel region.

A problem is (its kernel's function, its operand pointers, its meta array): its chain is simply the function
it calls, so problems of different kernels (a divergent batch) mix freely. The problems are dealt to the
threads by bytes, not by count -- largest first to the least loaded thread (LPT), each thread's list kept in
problem order -- so a thread with one 1 MB problem gets no more work than one with a hundred 10 KB ones. Each
problem's own parallel loop, nested inside the region, runs on its thread alone. The cost rule
(passes/horizontal_cost.py) keeps a problem bigger than its fair share out of the batch: alone it runs its
own loop on every thread.

The driver is fixed C (no source is generated here), built once like a kernel. Everything static is settled
once per batch step (`CpuBatch`); a call only writes the operand pointers into the pointer table
(batch_ext.Pointers, in C) and runs the region, with the GIL released.
"""
from __future__ import annotations

import ctypes
import heapq
import threading

import torch

from . import cpu_compiler
from .batch_ext import Pointers, load as load_ext

DRIVER = r"""
#include <stdint.h>
typedef void (*fb_kernel)(void**, const int64_t*);
struct fb_problem { fb_kernel fn; void** P; const int64_t* M; };
// thread t runs problems [part[t], part[t + 1]) of the (dealt) list in order; one region for them all
extern "C" void fb_batch_run(const fb_problem* probs, const int64_t* part, int64_t nparts) {
  if (nparts <= 1) {        // one problem, or one thread: its own loop may use every thread
    for (int64_t i = part[0]; i < part[nparts]; ++i) probs[i].fn(probs[i].P, probs[i].M);
    return;
  }
  #pragma omp parallel for schedule(static, 1) num_threads((int)nparts)
  for (int64_t t = 0; t < nparts; ++t)
    for (int64_t i = part[t]; i < part[t + 1]; ++i) probs[i].fn(probs[i].P, probs[i].M);
}
"""

_lock = threading.Lock()
_driver: dict = {}


def driver(cache_dir=None) -> int:
    """The address of fb_batch_run (built on first use)."""
    with _lock:
        if "fn" not in _driver:
            lib = cpu_compiler.build(DRIVER, "fb_batch_run", cache_dir)
            _driver["lib"] = lib
            _driver["fn"] = ctypes.cast(lib.fb_batch_run, ctypes.c_void_p).value
        return _driver["fn"]


def deal(sizes: list, threads: int) -> tuple:
    """(order, part): the problems dealt to at most `threads` lists by their sizes, largest first to the least
    loaded; list t is order[part[t]:part[t + 1]], in problem order."""
    live = list(range(len(sizes)))
    t = max(1, min(threads, len(live)))
    heap = [(0, i) for i in range(t)]
    lists = [[] for _ in range(t)]
    for q in sorted(live, key=lambda q: -sizes[q]):
        load, i = heapq.heappop(heap)
        lists[i].append(q)
        heapq.heappush(heap, (load + sizes[q], i))
    order, part = [], [0]
    for lst in lists:
        order += sorted(lst)
        part.append(len(order))
    return order, part


class CpuBatch:
    """The static part of a CPU batch: problem q runs launches[q]'s kernel with metas[q] (its meta values) over the operands tensors[q] (inputs, then outputs; nins[q] inputs); threads:
    how many to deal to (default torch's)."""

    def __init__(self, launches: list, metas: list, tensors: list, nins: list, threads: int = 0,
                 cache_dir=None):
        n = len(launches)
        self.run_fn = driver(cache_dir)
        self.metas = [launches[q].pack(metas[q]) for q in range(n)]
        counts = [len(ts) for ts in tensors]
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
        self.table = (ctypes.c_uint64 * max(1, offs[-1]))()
        base = ctypes.addressof(self.table)
        fns, self.checks = [], []
        for q in range(n):
            kind, _, fn, _, flag, check = launches[q].fast_call(self.metas[q], counts[q])
            fns.append(fn if kind == "ext" else ctypes.cast(fn, ctypes.c_void_p).value)
            if flag is not None and check not in self.checks:
                self.checks.append(check)
        sizes = [_bytes(ts) for ts in tensors]     # an empty problem's kernel returns at once
        self.sizes = sizes
        self.order, part = deal(sizes, threads or torch.get_num_threads())
        self.nparts = len(part) - 1
        self.probs = (ctypes.c_uint64 * max(1, 3 * len(self.order)))()
        for i, q in enumerate(self.order):
            self.probs[3 * i:3 * i + 3] = [fns[q], base + 8 * offs[q], ctypes.addressof(self.metas[q])]
        self.part = (ctypes.c_int64 * len(part))(*part)
        self.probs_addr, self.part_addr = ctypes.addressof(self.probs), ctypes.addressof(self.part)
        where = [base + 8 * (offs[q] + j) for q in range(n) for j in range(nins[q])]
        where += [base + 8 * (offs[q] + j) for q in range(n) for j in range(nins[q], counts[q])]
        self.pointers = Pointers(where, load_ext(cache_dir))
        self.writes = 0          # calls whose pointers differed from the call before (tests read it)
        self.lock = threading.Lock()     # one table: calls from two threads take turns

    def describe(self) -> str:
        parts = [self.order[self.part[t]:self.part[t + 1]] for t in range(self.nparts)]
        loads = ", ".join(_human(sum(self.sizes[q] for q in lst)) for lst in parts)
        return "one parallel region, problems dealt to %d threads by bytes (%s)" % (self.nparts, loads)

    def __call__(self, ins, out_addrs) -> None:
        with self.lock:
            if self.pointers.update_run(self.run_fn, self.probs_addr, self.part_addr, self.nparts, ins, out_addrs):
                self.writes += 1
        for check in self.checks:
            check()


def _bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _human(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return "%.1f %s" % (n / scale, unit)
    return "%d B" % n
