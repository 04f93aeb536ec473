"""fusebackend: a torch.compile backend that fuses ATen graphs into generated C++/OpenMP and CUDA kernels.

    model = torch.compile(model, backend="fuse")            # found through the torch_dynamo_backends entry point
    report = fusebackend.explain(fn, *args)                  # what was fused, the generated sources
"""
from .backend import fuse
from .explain import Report, explain
from .options import FuseOptions, OptionError
from .runtime import reset

__version__ = "0.1.0"
__all__ = ["fuse", "explain", "Report", "FuseOptions", "OptionError", "reset"]
