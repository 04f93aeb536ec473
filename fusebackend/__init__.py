"""fusebackend: a torch.compile backend that fuses ATen graphs into generated C++/OpenMP and CUDA kernels.

    model = torch.compile(model, backend="fuse")            # found through the torch_dynamo_backends entry point
    report = fusebackend.explain(fn, *args)                  # what was fused, the generated sources

Attributes load lazily, so `import fusebackend` (and the CLI) start without importing Dynamo.
"""
from .options import FuseOptions, OptionError

__version__ = "0.1.0"
__all__ = ["fuse", "explain", "Report", "FuseOptions", "OptionError", "reset"]

_LAZY = {"fuse": ("capture.backend", "fuse"), "explain": ("inspection.explain", "explain"),
         "Report": ("inspection.explain", "Report"),
         "reset": ("runtime", "reset")}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module("." + module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError("module 'fusebackend' has no attribute %r" % name)
