"""CUDA launch shapes, pure (tested without a GPU): the grid, block and dynamic shared memory of one launch
from the kernel's hints and the call's sizes, and the ctypes layout of its by-value argument struct."""
from __future__ import annotations

import ctypes
import math

import torch

from .steps import LayoutMismatch

STATIC_SMEM = 512               # bytes of static shared memory a block-per-row kernel may use (fb_scratch)
# Pointwise grid cap in full waves of resident blocks; 0: one chunk per thread, no cap. On one H100 (2026-11,
# pointwise_chain_f32_64M, floor 0.268 ms): 1 wave 0.327 ms, 4 waves 0.294, uncapped 0.276. On the H200
# (2026-12-03, bench/tune_batch.py, floor 0.190 ms, Inductor 0.196-0.203): uncapped 0.230, 4 waves 0.215,
# 8 waves 0.212; 32-byte chunks 0.235 uncapped, 0.216 at 8 waves.
PW_WAVES = 8
# Block-per-row grid cap in waves of resident blocks; 0: one block per row. Measured on one H100 (2026-11;
# re-check on the H200) (16384 rows of 4096, ms, 1 wave / uncapped): softmax f32 0.278 / 0.276, layer norm +
# gelu bf16 0.180 / 0.172, RMS norm bf16 0.0975 / 0.0965 (bench/tune_rows.py): the block scheduler balances
# the tail better than a row loop.
ROW_WAVES = 0
MAX_GRID = 2 ** 31 - 1


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
    elif shape == "tiled":
        # a grid-stride loop over tiles (emit/cuda_tiled.py): the other dims times the tiles of the A and B runs
        tile, A, B = int(hints["tile"]), hints["a_dims"], hints["b_dims"]
        tile_a = int(hints.get("tile_a", tile))          # the A side is 2 x TILE for 2-byte types
        LA, LB = math.prod(sizes[d] for d in A), math.prod(sizes[d] for d in B)
        rest = math.prod(s for d, s in enumerate(sizes) if d not in A and d not in B)
        need = rest * -(-LA // tile_a) * -(-LB // tile)
        if need == 0:
            return None
        threads, smem = min(int(hints.get("threads", 256)), tmax), int(hints.get("smem", 0))
    else:
        rdims = set(spec.reduce_dims)
        O = math.prod(s for d, s in enumerate(sizes) if d not in rdims)
        R = math.prod(s for d, s in enumerate(sizes) if d in rdims)
        if O == 0:
            return None
        items = int(hints.get("items_per_thread", 0))
        smem = 0
        if shape == "row_column":         # 32 rows a block; warps enough to fill the device, at most 16
            groups = -(-O // 32)
            warps = -(-dev.sm_count * 2048 // (32 * groups))
            threads = 32 * max(2, min(16, tmax // 32, 1 << max(0, (warps - 1).bit_length()), -(-R // 4)))
            need = groups
        elif shape == "row_warp":
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
    waves = PW_WAVES if shape in ("pointwise", "tiled") else (ROW_WAVES if shape == "row_block" else 1)
    grid = max(1, min(MAX_GRID, min(need, dev.sm_count * per_sm * waves) if waves > 0 else need))
    return grid, threads, smem


def arg_struct(spec):
    """A ctypes struct laid out as fb::KArgs<NP, NM> for this kernel."""
    np_ = spec.num_operands
    nm = spec.num_meta

    class KArgs(ctypes.Structure):
        _fields_ = [("p", ctypes.c_void_p * np_), ("m", ctypes.c_int64 * nm)]
    return KArgs()
