"""Decode attention split between the CPU and the GPU: the predicted time of each side, and the split point at
which both finish together. Pure functions of a HardwareProfile (nothing measured or run here).

The context [0, T) of a K/V cache is cut in three: [0, split) is computed on the CPU by the fused decode kernel
(emit/cpu_attention.py) from host memory, [split, T - resident) is streamed over the link and computed on the
GPU, the last `resident` positions are already on the GPU. Each part yields (out, lse); the GPU merges them by
log-sum-exp (runtime/split_attention.py).

Time model, per call:
  CPU side   kv bytes of [0, split) / (cpu_mem_bw * CPU_ATTENTION_EFFICIENCY), or its FLOPs / the kernel's
             FLOP rate when that is longer (many query rows per kv head: Lq > 1 with GQA), plus the call's fixed
             cost and q to the host / the partial back.
  link       kv bytes of the streamed part / h2d_bw, one launch per copy (K and V).
  CPU reads and DMA share host DRAM: while both run and their rates add up to more than the shared rate, both
             slow by the same factor (overlap_proportional). Measured with this kernel on the H200 machine: alone
             6.02 ms (89 GB/s) and a 537 MB DMA 9.80 ms; at once 7.28 / 11.00 ms: both slowed (21%, 12%), 122 GB/s
             together -- cost_model.overlap_time's link-first model (fitted to a CPU GEMV, whose cores stall) would
             leave the kernel 65 GB/s and put the split at 0.55 of the context where the measured best is 0.6.
  GPU side   the resident part while the copy runs, the streamed part once it has landed (roofline of
             cost_model.attention_cost); then the merge.
The split is a multiple of `grain` positions; the choice is the one with the smallest predicted time, found by
bisection on the sign of (CPU side - GPU side), which grows with the split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .cost_model import attention_cost
from .hardware_profile import HardwareProfile, dtype_name, dtype_size

# The fused CPU decode kernel's K/V read rate over profile.cpu_mem_bw (the host copy rate, bytes read + written).
# Measured on the H200 machine (bench/decode_attention.py, 16 threads, bf16, q [b,32,1,128], K/V [b,8,T,128],
# caches rotated past L3), kernel GB/s / host copy GB/s of the same run over 4 runs and 15 DRAM-resident cells:
# 0.86-1.48, median 1.11 (kernel 71-104 GB/s; copy 67.6-82.2, plain read 92-112 GB/s: the machine's DRAM rate
# moves between and within runs). cost_model.attention_cost's "reads K/V once at cpu_mem_bw" holds to ~10%.
CPU_ATTENTION_EFFICIENCY = 1.1
# float32 FLOP/s per CPU thread of the kernel (q.K and P.V FMAs), for the compute-bound case (Lq > 1):
# measured 96 GFLOP/s on one thread with K/V cached (4 rows per kv head, bf16, 2026-12); a bound, not a fit.
CPU_ATTENTION_FLOPS_PER_THREAD = 90e9
CPU_ATTENTION_CALL_S = 30e-6      # ctypes call, OpenMP team start, workspace and the merge pass
# Host DRAM rate while this kernel and a DMA run at once, over the host copy rate: 113.6 / 82.2, 119.0 / 74.4,
# 119.5 / 75.8, 123.8 / 67.6 GB/s in four H200 runs (1.38-1.83; the low end). The profile's shared_dram_bw is
# measured with a CPU GEMV (64-89 GB/s there): where it is lower, this is used instead.
ATTENTION_SHARED_OVER_COPY = 1.38
MERGE_GPU_KERNELS = 6             # the log-sum-exp merge of two partials: a handful of small torch ops
GRAIN = 64                        # split points are multiples of this many positions (the kernel's tile)


@dataclass(frozen=True)
class SplitPlan:
    split: int              # positions [0, split) on the CPU
    streamed: int           # positions [split, context - resident) streamed over the link
    resident: int           # the last `resident` positions, already on the GPU
    predicted_s: float      # the call: max(CPU side, GPU side) + merge
    cpu_s: float            # CPU side, DRAM contention included
    link_s: float           # link busy time, contention included
    gpu_s: float            # GPU side end: compute after its data has landed
    cpu_only_s: float       # the alternatives, for the record: every non-resident position on the CPU
    streamed_only_s: float  #   ... or all streamed

    @property
    def cpu_fraction(self) -> float:
        n = self.split + self.streamed
        return self.split / n if n else 0.0


def overlap_proportional(cpu_bytes: float, cpu_s: float, dma_bytes: float, dma_s: float, shared_bw: float):
    """(cpu_s, dma_s) when both start together: while both run, if their rates add up to more than shared_bw,
    both slow by the same factor (rates / shared_bw); once the shorter ends the other is back at its own rate.
    Closed form: both are late by short * (factor - 1)."""
    if min(cpu_bytes, cpu_s, dma_bytes, dma_s) <= 0:
        return cpu_s, dma_s
    factor = (cpu_bytes / cpu_s + dma_bytes / dma_s) / shared_bw
    if factor <= 1.0:
        return cpu_s, dma_s
    late = min(cpu_s, dma_s) * (factor - 1.0)
    return cpu_s + late, dma_s + late


def _kv_bytes(batch, kv_heads, positions, head_dim, dtype):
    return 2.0 * batch * kv_heads * positions * head_dim * dtype_size(dtype)


def cpu_attention_s(profile: HardwareProfile, batch: int, q_heads: int, kv_heads: int, positions: int,
                    head_dim: int, dtype, new_tokens: int = 1, copies: bool = True) -> float:
    """The fused CPU kernel over `positions` context positions: the K/V read at the kernel's share of the host
    copy rate, or its FLOPs when those take longer, plus the call. copies: q to the host and the partial
    (float32 out and lse) back, with a sync each way (a split call; a CPU-only model pays them too)."""
    if positions <= 0:
        return 0.0
    kv = _kv_bytes(batch, kv_heads, positions, head_dim, dtype)
    flops = 4.0 * batch * q_heads * new_tokens * positions * head_dim
    t = max(kv / (profile.cpu_mem_bw * CPU_ATTENTION_EFFICIENCY),
            flops / (profile.cpu_threads * CPU_ATTENTION_FLOPS_PER_THREAD)) + CPU_ATTENTION_CALL_S
    if copies:
        rows = batch * q_heads * new_tokens
        t += rows * head_dim * dtype_size(dtype) / profile.d2h_bw + rows * (head_dim + 1) * 4 / profile.h2d_bw \
            + 2 * profile.sync_s
    return t


def _gpu_compute_s(profile, batch, q_heads, kv_heads, positions, head_dim, dtype, new_tokens):
    if positions <= 0:
        return 0.0
    return attention_cost(profile, batch, q_heads, kv_heads, positions, head_dim, dtype, new_tokens).gpu_resident_s


def _link_s(profile, nbytes):
    return nbytes / profile.h2d_bw + 2 * profile.gpu_launch_s if nbytes > 0 else 0.0


def split_time(profile: HardwareProfile, batch: int, q_heads: int, kv_heads: int, context: int, head_dim: int,
               dtype, split: int, new_tokens: int = 1, resident: int = 0, shared_dram_bw: float = None) -> tuple:
    """(predicted_s, cpu_s, link_s, gpu_s) with [0, split) on the CPU, [split, context - resident) streamed.
    shared_dram_bw: host DRAM rate of this kernel and a DMA at once (default: the profile's, at least
    ATTENTION_SHARED_OVER_COPY x its copy rate)."""
    streamed = context - resident - split
    if not 0 <= split <= context - resident or resident < 0:
        raise ValueError("cost model: split %r and resident %r must satisfy 0 <= split <= context (%d) - resident"
                         % (split, resident, context))
    cpu_alone = cpu_attention_s(profile, batch, q_heads, kv_heads, split, head_dim, dtype, new_tokens)
    link_bytes = _kv_bytes(batch, kv_heads, streamed, head_dim, dtype)
    link_alone = _link_s(profile, link_bytes)
    shared = shared_dram_bw or max(profile.shared_dram_bw, ATTENTION_SHARED_OVER_COPY * profile.cpu_mem_bw)
    cpu_s, link_s = overlap_proportional(_kv_bytes(batch, kv_heads, split, head_dim, dtype), cpu_alone, link_bytes,
                                         link_alone, shared)
    res_s = _gpu_compute_s(profile, batch, q_heads, kv_heads, resident, head_dim, dtype, new_tokens)
    str_s = _gpu_compute_s(profile, batch, q_heads, kv_heads, streamed, head_dim, dtype, new_tokens)
    gpu_s = max(res_s, link_s + str_s) if streamed > 0 else res_s
    parts = (split > 0) + (streamed > 0) + (resident > 0)
    merge = MERGE_GPU_KERNELS * profile.gpu_launch_s if parts > 1 else 0.0
    return max(cpu_s, gpu_s) + merge, cpu_s, link_s, gpu_s


@functools.lru_cache(maxsize=1024)
def choose_split(profile: HardwareProfile, batch: int, q_heads: int, kv_heads: int, context: int, head_dim: int,
                 dtype, new_tokens: int = 1, resident: int = 0, grain: int = GRAIN,
                 shared_dram_bw: float = None) -> SplitPlan:
    """The CPU share [0, split) of the non-resident context at which the CPU and the GPU side finish together
    (the smallest predicted time over multiples of `grain`, and the two ends: all CPU, all streamed)."""
    for v, n in ((batch, "batch"), (q_heads, "q_heads"), (kv_heads, "kv_heads"), (head_dim, "head_dim"),
                 (new_tokens, "new_tokens"), (grain, "grain")):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError("cost model: %s must be an int >= 1, got %r" % (n, v))
    if not isinstance(context, int) or context < 0 or not isinstance(resident, int) or not 0 <= resident <= context:
        raise ValueError("cost model: need 0 <= resident (%r) <= context (%r)" % (resident, context))
    dtype = dtype_name(dtype)
    n = context - resident

    def at(s):
        return split_time(profile, batch, q_heads, kv_heads, context, head_dim, dtype, s, new_tokens, resident,
                          shared_dram_bw)
    steps = n // grain
    lo, hi = 0, steps                       # first step where the CPU side is the later one
    while lo < hi:
        mid = (lo + hi) // 2
        _, c, _, g = at(mid * grain)
        if c >= g:
            hi = mid
        else:
            lo = mid + 1
    cands = {0, n} | {k * grain for k in (lo - 1, lo, lo + 1) if 0 <= k <= steps}
    best = min(sorted(cands), key=lambda s: at(s)[0])
    t, c, l, g = at(best)
    return SplitPlan(best, n - best, resident, t, c, l, g, at(n)[0], at(0)[0])
