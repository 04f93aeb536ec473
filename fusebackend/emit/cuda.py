"""CUDA C++ kernels for GPU tensors: the pointwise and the row-reduction shape (NVRTC- and nvcc-clean).

Same values, same calling convention as the C++/OpenMP target (emit/cpu.py): ExprBuilder writes the scalar
code, RowPlan the phases of a reduction; pointers and the int64 meta array (domain sizes, then each operand's
strides) arrive as one kernel parameter by value (`fb::KArgs`, fb_cuda.h), so a launch copies nothing.

The files: cuda_target.py (the target's table: knobs, signature, preamble, KernelSource), cuda_vec.py (16-byte
vector loads and stores of a chunk), cuda_pointwise.py, cuda_tiled.py (a transpose
through shared-memory tiles) and cuda_rows.py (the kernel shapes).

The launch shape is not in the source: `KernelSource.launch` carries hints (threads per block bounds, vector
width, shared memory per row element); runtime/cuda_compiler.py chooses the block and grid from the device.
"""
from __future__ import annotations

from ..graph.fusion_graph import FusionGraph
from .common import emit_shape
from .cuda_pointwise import emit_pointwise
from .cuda_rows import emit_reduction
from .cuda_tiled import emit_tiled
from .kernel import KernelSource


def emit_elementwise(fg: FusionGraph, group) -> KernelSource:
    """A pointwise group: the tiled kernel where an input and the outputs disagree on their fastest dim
    (cuda_tiled.plan_tiles), else the plain one."""
    return emit_tiled(fg, group) or emit_pointwise(fg, group)


def emit_cuda(fg: FusionGraph, group) -> KernelSource:
    return emit_shape(fg, group, {"pointwise": emit_elementwise, "reduction": emit_reduction})


__all__ = ["emit_cuda", "emit_elementwise", "emit_pointwise", "emit_reduction", "emit_tiled"]
