"""Horizontal batches of a CUDA kernel: many problems in one launch of its batch entry (emit/cuda_batch.py).

Everything static is settled once per batch step (`plan_batch`): each problem's launch shape (plan_launch),
one block size for all (the largest a problem asks for), each problem's range of blocks, and the meta table
(every problem's sizes and strides) uploaded to the device. A call then only writes the operand pointers into
the by-value argument struct of each launch (`fb::BArgs`) and launches (CudaKernel.batch): no device copy, no
allocation, and a CUDA graph captures the pointers with the launch. More problems than one struct holds
(`launch["batch_max"]`) take several launches.
"""
from __future__ import annotations

import ctypes

import torch

from .cuda_launch import MAX_GRID, plan_launch
from .steps import LayoutMismatch

GRID_SPREAD = ("pointwise", "row_warp")   # shapes whose blocks share a grid-stride loop over the problem


class BatchLaunch:
    """One launch of the batch entry: problems [lo/nptr, hi/nptr) of the call's pointer list (or the
    pointers at `sel`, when empty problems were left out)."""
    __slots__ = ("args", "params", "params_addr", "grid", "lo", "hi", "sel", "nptr")

    def __init__(self, np_: int, k: int):
        class BArgs(ctypes.Structure):
            _fields_ = [("p", ctypes.c_uint64 * max(1, np_ * k)), ("meta", ctypes.c_void_p),
                        ("nprob", ctypes.c_int32), ("start", ctypes.c_int32 * (k + 1))]
        self.args = BArgs()
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self.params_addr = ctypes.addressof(self.params)


class BatchPlan:
    __slots__ = ("index", "func", "block", "smem", "launches", "table")


def plan_batch(kernel, metas: list, tensors: list) -> BatchPlan:
    """The static part of a batch: `metas[q]` is problem q's meta values, `tensors` every operand."""
    spec = kernel.spec
    index = tensors[-1].get_device() if tensors else torch.cuda.current_device()
    if any(t.get_device() != index for t in tensors):
        raise LayoutMismatch("the problems of a batch are on different devices")
    k = int(spec.launch.get("batch_max", 0))
    if k < 1:
        raise RuntimeError("the kernel has no batch entry")
    func = kernel.function(index, batch=True)
    dev = kernel.device_info(index)
    occ = kernel.occupancy(func, index)
    shapes = [plan_launch(spec, m, dev, occ) for m in metas]
    live = [q for q, s in enumerate(shapes) if s is not None]
    plan = BatchPlan()
    plan.index, plan.func, plan.launches, plan.table = index, func, [], None
    plan.block = max((shapes[q][1] for q in live), default=32)
    plan.smem = max((shapes[q][2] for q in live), default=0)
    if not live:
        return plan
    if occ(plan.block, plan.smem) <= 0:
        raise LayoutMismatch("the batch entry cannot be resident with %d threads and %d bytes of shared memory"
                             % (plan.block, plan.smem))
    cap = max(1, MAX_GRID // k)
    grids = {}
    for q in live:
        grid, threads, _ = shapes[q]
        if spec.launch["shape"] in GRID_SPREAD:     # the same threads in fewer, larger blocks
            grid = -(-grid * threads // plan.block)
        grids[q] = max(1, min(cap, grid))
    nm = max(1, len(spec.domain) + sum(spec.operand_ranks))
    table = []
    for q in live:
        table.extend(list(metas[q]) + [0] * (nm - len(metas[q])))
    plan.table = kernel.upload(table, index)
    np_ = spec.num_operands
    for c in range(0, len(live), k):
        chunk = live[c:c + k]
        ln = BatchLaunch(np_, k)
        ln.args.meta = plan.table.data_ptr() + 8 * nm * c
        ln.args.nprob = len(chunk)
        start = 0
        for i, q in enumerate(chunk):
            ln.args.start[i] = start
            start += grids[q]
        ln.args.start[len(chunk)] = start
        ln.grid, ln.nptr = start, np_ * len(chunk)
        if chunk == list(range(chunk[0], chunk[-1] + 1)):
            ln.lo, ln.hi, ln.sel = chunk[0] * np_, (chunk[-1] + 1) * np_, None
        else:
            ln.lo = ln.hi = 0
            ln.sel = [q * np_ + j for q in chunk for j in range(np_)]
        plan.launches.append(ln)
    return plan
