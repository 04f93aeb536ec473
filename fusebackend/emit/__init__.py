"""Emit layer: fusion groups -> kernel source text (C++/OpenMP for CPU tensors, CUDA C++ for GPU tensors)."""
from .errors import EmitError
from .kernel import KernelSource


def emit_kernel(fg, group) -> KernelSource:
    if group.device == "cpu":
        from .cpu import emit_cpu
        return emit_cpu(fg, group)
    if group.device == "cuda":
        try:
            from .cuda import emit_cuda
        except ImportError as e:
            raise EmitError("no CUDA emitter: %s" % e)
        return emit_cuda(fg, group)
    raise EmitError("no emitter for device %r" % group.device)


__all__ = ["EmitError", "KernelSource", "emit_kernel"]
