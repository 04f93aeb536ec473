"""Horizontal batches of CUDA kernels: many problems, of one kernel or of several (a divergent batch), in one
launch (emit/cuda_batch.py writes the entries).

Everything static is settled once per batch step (`plan_batch`): each problem's launch shape (plan_launch,
with its own kernel's hints), one block size for all (the largest a problem asks for), each problem's range
of blocks, and the meta table -- each problem's sizes and strides, and its chain id in a divergent batch --
uploaded to the device. The problem table's pointers are the only part that changes between calls:

* argument mode, up to K problems (as many as the 4 KiB of kernel parameters hold): the pointers are written
  into the by-value argument struct (`fb::BArgs`) and travel with the launch; a CUDA graph captures them.
* table mode, more problems than that: one launch whatever their number, the pointers in device memory. A
  call gathers the pointers into a host stage (batch_ext: in C, ~4 ns an operand) and uploads the stage
  (pinned, asynchronous, on the launch's stream, into a fresh buffer so launches in flight keep theirs) only
  when a pointer changed: a steady optimizer step re-uses the table and launches at once. While a CUDA graph
  is being captured nothing is uploaded: the call launches in argument mode (several launches, pointers
  captured by value).

A kernel that cannot be built in table mode (no such entry) takes argument mode in launches of K problems.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from ..emit import cuda_target
from ..emit.cuda_batch import TABLE_ARGS, divergent_kernel
from .batch_ext import Pointers, load as load_ext
from .cuda_launch import MAX_GRID, plan_launch
from .steps import LayoutMismatch

GRID_SPREAD = ("pointwise", "row_warp")   # shapes whose blocks share a grid-stride loop over the problem
# Grid-stride steps per thread in a batch of GRID_SPREAD problems (a problem's grid divided by it): a batch
# block first finds its problem (a binary search over the block starts, then its meta row and pointers: a
# chain of dependent loads), which a one-chunk block pays for every 16 bytes per operand. Measured on the H200
# (2026-12-03, bench/tune_batch.py, AdamW over the 200 anchor tensors, GPU ms per step): 1: 0.133, 2: 0.110,
# 4: 0.105, 8: 0.108 (floor 0.092).
BATCH_CHUNKS = 4
_modules: dict = {}                       # (entry name, table mode, device) -> (module, function)


class BatchLaunch:
    """One launch of a batch entry: `fb::BArgs<np_, k>` by value, its grid, the problems it runs (sel, in
    problem order)."""
    __slots__ = ("args", "params", "params_addr", "grid", "sel", "p_addr")

    def __init__(self, np_: int, k: int):
        class BArgs(ctypes.Structure):
            _fields_ = [("p", ctypes.c_uint64 * max(1, np_ * k)), ("meta", ctypes.c_void_p),
                        ("nprob", ctypes.c_int32), ("start", ctypes.c_int32 * (k + 1))]
        self.args = BArgs()
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self.params_addr = ctypes.addressof(self.params)
        self.p_addr = ctypes.addressof(self.args) + BArgs.p.offset
        self.grid, self.sel = 0, None


class BatchPlan:
    __slots__ = ("index", "kernel", "func", "block", "smem", "launches", "table", "mode", "chains", "np", "k",
                 "row", "live", "grids", "rows_at", "stage", "tab", "pointers", "uploads", "writes", "args_func",
                 "chunks", "scratch", "lock")

    def __call__(self, ins, out_addrs) -> None:
        with self.lock:          # one argument struct and stage: calls from two threads take turns
            self._call(ins, out_addrs)

    def _call(self, ins, out_addrs) -> None:
        changed = self.pointers.update(ins, out_addrs)
        if changed:
            self.writes += 1
        if self.mode == "table" and (changed or self.tab is None):
            if _capturing(self.index):
                self.tab = None           # uploaded on the next call outside the capture
                return self._launch(self.func_chunks(), self._chunks_from_stage())
            self.tab = _upload(self.stage, self.index)
            self.launches[0].args.p[0] = self.tab.data_ptr()
            self.uploads += 1
        self._launch(self.func, self.launches)

    def describe(self) -> str:
        if self.mode == "table":
            return ("1 launch, the pointer table in device memory (%d problems, %d fit the kernel arguments), "
                    "uploaded %d times in %d calls that changed a pointer" % (len(self.live), self.k, self.uploads,
                                                                               self.writes))
        return "%d launch%s, pointers in the kernel arguments (%d problems, up to %d a launch)" % (
            len(self.launches), "es" * (len(self.launches) != 1), len(self.live), self.k)

    def _launch(self, func, launches):
        drv, stream = self.kernel.driver, self.kernel.stream(self.index)
        for ln in launches:
            drv.launchKernel(func, ln.grid, 1, 1, self.block, 1, 1, self.smem, stream, ln.params_addr, 0)

    def func_chunks(self):
        if self.chunks is None:
            self.chunks = _arg_launches(self.np, self.k, self.row, self.live, self.grids, self.rows_at)
        return self.args_func()

    def _chunks_from_stage(self):
        values, lo = self.stage.tolist(), 0
        for ln in self.chunks:                    # consecutive runs of the live problems, in stage order
            n = len(ln.sel) * self.np
            ln.args.p[:n] = values[lo:lo + n]
            lo += n
        return self.chunks


def plan_batch(kernels: list, metas: list, tensors: list, nins: list, compile=None) -> BatchPlan:
    """The static part of a batch: problem q runs kernels[q] (a CudaKernel) with metas[q] (its meta values)
    over tensors[q] (its operands: nins[q] inputs, then outputs). compile(source, name, arch, cache_dir,
    defines) -> image builds the entries a kernel has not (cuda_compiler.compile_image)."""
    flat = [t for ts in tensors for t in ts]
    index = flat[-1].get_device() if flat else torch.cuda.current_device()
    if any(t.get_device() != index for t in flat):
        raise LayoutMismatch("the problems of a batch are on different devices")
    k0, seen, chain_of = kernels[0], {}, []
    for kq in kernels:
        chain_of.append(seen.setdefault(kq.spec.source, len(seen)))
    chains = [next(kq for kq in kernels if kq.spec.source == s) for s in seen]
    if len(chains) == 1:
        spec = k0.spec
        k = int(spec.launch.get("batch_max", 0))
        if k < 1:
            raise RuntimeError("the kernel has no batch entry")
        np_, row, skip, source, name = spec.num_operands, spec.num_meta, 0, spec.source, spec.batch_name
        args_func = lambda: k0.function(index, batch=True)
    else:
        d = divergent_kernel([c.spec for c in chains], cuda_target.MAX_PARAM_BYTES)
        np_, row, skip, k, source, name = d.nptr, d.nrow, 1, d.k, d.source, d.name
        args_func = lambda: entry_function(k0, source, name, np_, k, False, index, compile)
    dev = k0.device_info(index)
    live = [q for q, kq in enumerate(kernels) if plan_launch(kq.spec, metas[q], dev, lambda t, s: 1) is not None]
    plan = BatchPlan()
    plan.index, plan.kernel, plan.chains, plan.np, plan.k, plan.live = index, k0, len(chains), np_, k, live
    plan.row = row
    plan.uploads = plan.writes = 0
    plan.lock = threading.Lock()
    plan.tab = plan.chunks = plan.table = plan.stage = None
    plan.args_func, plan.launches, plan.grids = args_func, [], {}
    func = entry_function(k0, source, name, np_, k, True, index, compile) if len(live) > k else None
    plan.mode = "table" if func is not None else "args"
    if func is not None:         # the argument-mode twin for captures: from the same module, no load then
        plan.args_func = args_func = lambda: entry_function(k0, source, name, np_, k, False, index, compile)
    plan.func = func if func is not None else args_func() if live else None
    occ = k0.occupancy(plan.func, index) if live else (lambda t, s: 1)
    shapes = {q: plan_launch(kernels[q].spec, metas[q], dev, occ) for q in live}
    plan.block = max((s[1] for s in shapes.values()), default=32)
    plan.smem = max((s[2] for s in shapes.values()), default=0)
    if live and occ(plan.block, plan.smem) <= 0:
        raise LayoutMismatch("the batch entry cannot be resident with %d threads and %d bytes of shared memory"
                             % (plan.block, plan.smem))
    cap = max(1, MAX_GRID // max(k, len(live), 1))
    for q in live:
        grid, threads, _ = shapes[q]
        if kernels[q].spec.launch["shape"] in GRID_SPREAD:     # the same threads in fewer, larger blocks
            grid = -(-grid * threads // (plan.block * BATCH_CHUNKS))
        plan.grids[q] = max(1, min(cap, grid))
    rows = []
    for q in live:
        vals = ([chain_of[q]] if skip else []) + list(metas[q])
        rows.extend(vals + [0] * (row - len(vals)))
    starts = [0]
    for q in live:
        starts.append(starts[-1] + plan.grids[q])
    head = starts if plan.mode == "table" else []
    plan.table = k0.upload(head + rows or [0], index)
    plan.rows_at = plan.table.data_ptr() + 8 * len(head)
    slot = {}                    # (problem, operand) -> address its pointer is written to
    if plan.mode == "table":
        plan.stage = torch.zeros(max(1, len(live) * np_), dtype=torch.int64)
        base = plan.stage.data_ptr()
        for i, q in enumerate(live):
            for j in range(len(tensors[q])):
                slot[q, j] = base + 8 * (i * np_ + j)
        ln = BatchLaunch(*TABLE_ARGS)
        ln.args.p[1] = plan.table.data_ptr()
        ln.args.meta, ln.args.nprob, ln.grid, ln.sel = plan.rows_at, len(live), starts[-1], live
        plan.launches = [ln]
    else:
        plan.launches = _arg_launches(np_, k, row, live, plan.grids, plan.rows_at)
        for ln in plan.launches:
            for i, q in enumerate(ln.sel):
                for j in range(len(tensors[q])):
                    slot[q, j] = ln.p_addr + 8 * (i * np_ + j)
    order = [(q, j) for q in range(len(kernels)) for j in range(nins[q])]
    order += [(q, j) for q in range(len(kernels)) for j in range(nins[q], len(tensors[q]))]
    dead = [key for key in order if key not in slot]      # empty problems: a slot each, read by no launch
    plan.scratch = (ctypes.c_uint64 * max(1, len(dead)))()
    for i, key in enumerate(dead):
        slot[key] = ctypes.addressof(plan.scratch) + 8 * i
    where = [slot[key] for key in order]
    plan.pointers = Pointers(where, load_ext())
    return plan


def _arg_launches(np_: int, k: int, row: int, live: list, grids: dict, rows_at: int) -> list:
    """Argument mode: the live problems in launches of at most k, pointers by value."""
    launches = []
    for c in range(0, len(live), k):
        ln = BatchLaunch(np_, k)
        ln.sel = live[c:c + k]
        ln.args.meta, ln.args.nprob = rows_at + 8 * row * c, len(ln.sel)
        start = 0
        for i, q in enumerate(ln.sel):
            ln.args.start[i] = start
            start += grids[q]
        ln.args.start[len(ln.sel)] = start
        ln.grid = start
        launches.append(ln)
    return launches


def entry_function(kernel, source: str, name: str, np_: int, k: int, table: bool, index: int, compile=None):
    """The function handle of batch entry `name` of `source` on device `index` (its table-mode twin
    `name`_t with table=True), or None where table mode cannot be built (the batch then takes argument
    mode). A table-mode compile holds both entries, so the argument-mode one is at hand during a capture.
    The kernel's `batch_function` builds them where it has one (tests/cuda_emu.py); else NVRTC."""
    hook = getattr(kernel, "batch_function", None)
    if hook is not None:
        return hook(source, name, np_, k, table, index)
    key = (name, table, index)
    if key not in _modules:
        if compile is None or not hasattr(kernel.driver, "moduleLoadData"):
            if table:
                return None
            raise RuntimeError("this kernel cannot load a divergent batch entry")
        import cupy
        image = compile(source, name, kernel.device_info(index).arch, None,
                              ("-DFB_BATCH", "-DFB_TABLE") if table else ("-DFB_BATCH",))
        with cupy.cuda.Device(index):
            module = kernel.driver.moduleLoadData(image)
            _modules[name, False, index] = (module, kernel.driver.moduleGetFunction(module, name))
            if table:
                _modules[key] = (module, kernel.driver.moduleGetFunction(module, name + "_t"))
    return _modules[key][1]


def _capturing(index: int) -> bool:
    return index >= 0 and torch.cuda.is_current_stream_capturing()


def _upload(stage: torch.Tensor, index: int) -> torch.Tensor:
    """The stage's pointers in device memory: a fresh buffer, copied on the current stream from pinned memory
    (the host allocator keeps that block until the copy is done), so no launch in flight sees a change."""
    if index < 0:                      # CPU tensors: the emulator (tests/cuda_emu.py)
        return stage.clone()
    return stage.pin_memory().to(torch.device("cuda", index), non_blocking=True)
