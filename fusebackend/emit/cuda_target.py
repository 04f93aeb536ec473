"""The CUDA target's table: launch and vector knobs, the kernel signature and argument preamble, and the
KernelSource of a finished kernel. The knobs are read as attributes of this module at emit time (tests and
tuning scripts set them)."""
from __future__ import annotations

import re

from .common import kernel_name, kernel_source, indent, preamble
from .cuda_batch import batch_kernel, max_problems
from .errors import EmitError
from .exprs import ExprBuilder
from .kernel import KernelSource

HEADER = '#include "fb_cuda.h"\n'
MAX_PARAM_BYTES = 4000      # the classic kernel-parameter limit (4 KiB), with room to spare
PW_THREADS = 256            # preferred threads per block, pointwise
PW_BOUND = 512              # __launch_bounds__ of pointwise kernels (the runtime never exceeds it)
VEC_BYTES = 16              # bytes per thread per chunk, row reductions (one 16-byte access per operand)
PW_VEC_BYTES = 16           # bytes per thread per chunk, pointwise (32: two 16-byte accesses per operand)
MAX_VEC = 16                # elements per thread per chunk
REG_BUDGET = 64             # 32-bit registers per thread for row values cached between phases
MAX_UNROLL = 16             # unrolled elements per thread when the row is cached in registers
REG_ROW_BYTES = 32          # ... and at most this many bytes of the narrowest operand per thread
ROW_CACHE = "auto"          # "auto": registers when the row fits the two limits above, else shared memory;
                            # "smem": never registers (tuning)
# Measured on one H100 (16384x4096 rows, ms), bench/tune_rows.py, 2026-11-27 (re-check on the H200), one block
# per row (ROW_WAVES 0):
# 8 / 16 elements per thread: softmax f32 0.268 / 0.276, layer norm + gelu bf16 0.199 / 0.172,
# RMS norm bf16 0.097 / 0.097 -- i.e. 32 bytes of input per thread, whatever the type. Earlier (persistent
# grid): VEC_BYTES 32 instead of 16: softmax 0.292 vs 0.281, RMS norm 0.114 vs 0.102: 16-byte chunks.
WARP_ROW_MAX = 1024         # rows this short run one per warp (no block barrier)
WARP_ROWS_PER_BLOCK = 4     # warps (rows) per block in the warp shape
BLOCK_BOUND = 1024          # __launch_bounds__ of block-per-row kernels that hold nothing in registers
COLUMN_BOUND = 512          # __launch_bounds__ of column kernels: 32 rows a block, up to 16 warps on each
SMEM_CACHE_MAX = 160 * 1024 # dynamic shared memory for a cached row (the runtime checks the device's limit)
# Tiled pointwise kernels (cuda_tiled.py): a transpose through TILE x TILE shared tiles. 32 = a warp's lanes,
# so each phase's warp access is one 128-byte line for float32. A side shorter than TILE_MIN leaves most lanes
# of one phase idle and the plain walk then wastes little (its strided side spans < 32 distinct rows), so the
# barriers and shared-memory round trip would not pay. 256 threads: 8 rows a pass, 4 elements per thread per
# tile, as Triton's 2-D transposes; at most TILE_MAX_STAGED inputs go through tiles (8.4 KB each at 8 bytes).
TILE = 32
TILE_MIN = 32
TILE_THREADS = 256
TILE_MAX_STAGED = 4


def vec_width(b: ExprBuilder, inner, nbytes: int | None = None) -> int:
    """Elements per chunk: nbytes of the narrowest operand, halved until it divides the inner size."""
    nbytes = VEC_BYTES if nbytes is None else nbytes
    sizes = [op.meta.dtype.itemsize for op in b.operands]
    v = max(1, min(MAX_VEC, nbytes // min(sizes))) if sizes else 1
    if not isinstance(inner, int) or inner <= 0:
        return 1
    while v > 1 and inner % v:
        v //= 2
    return v


def cuda_preamble(b: ExprBuilder, rank: int) -> list:
    """common.preamble, reading pointers and sizes straight from the by-value argument struct."""
    out = []
    for line in preamble(b, rank, "cuda"):
        out.append(re.sub(r"\bP\[", "A.p[", re.sub(r"\bM\[", "A.m[", line)))
    return out


def num_meta(b: ExprBuilder, rank: int) -> int:
    """Length of the meta array (domain sizes, every operand's strides, the symbolic ints), at least 1."""
    return max(1, rank + sum(op.meta.rank for op in b.operands) + len(b.scalars))


def signature(name: str, b: ExprBuilder, rank: int, bound: int) -> str:
    nm = num_meta(b, rank)
    np_ = len(b.operands)
    if 8 * (np_ + nm) > MAX_PARAM_BYTES:
        raise EmitError("%d operands and %d sizes/strides exceed the kernel parameter limit" % (np_, nm))
    return ('extern "C" __global__ void __launch_bounds__(%d) %s(const fb::KArgs<%d, %d> A)'
            % (bound, name, np_, nm))


def finish(group, b: ExprBuilder, kind: str, body: list, bound: int, launch: dict) -> KernelSource:
    rank = len(group.domain)
    text = "\n".join(body)
    name = kernel_name("fb_cu_" + kind[:3], text + repr(sorted(launch.items())) + str(bound))
    single = signature(name, b, rank, bound) + " {\n" + "\n".join(indent(body, 2)) + "\n}\n"
    k = max_problems(len(b.operands), MAX_PARAM_BYTES)
    if not k:
        return kernel_source(group, b, name, "cuda", kind, HEADER + single, launch=dict(launch, bound=bound))
    batch = batch_kernel(name, body, len(b.operands), num_meta(b, rank), bound, k)
    source = HEADER + "#ifndef FB_BATCH\n" + single + "#else\n" + batch + "#endif\n"
    return kernel_source(group, b, name, "cuda", kind, source, launch=dict(launch, bound=bound, batch_max=k),
                         batch_name=name + "_batch")
