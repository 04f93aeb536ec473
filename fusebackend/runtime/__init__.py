"""Runtime: compiling, caching, loading and launching kernels; the compiled-graph Program."""
from .build import build_program, compile_kernel, first_call_builds, reset

__all__ = ["build_program", "compile_kernel", "first_call_builds", "reset"]
