"""Every user-visible knob, in one dataclass, validated with a message that names the option."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


try:   # Dynamo wraps backend errors in BackendCompilerFailed, except those of this class: let ours through
    from torch._dynamo.exc import ShortenTraceback as _PassThrough
except ImportError:  # pragma: no cover - other torch versions
    class _PassThrough(Exception):
        def __init__(self, *args, first_useful_frame=None):
            super().__init__(*args)


class OptionError(ValueError, _PassThrough):
    """A bad option or option value; raised as itself from torch.compile(..., backend="fuse", options=...)."""

    def __init__(self, message: str):
        _PassThrough.__init__(self, message, first_useful_frame=None)


@dataclass(frozen=True)
class FuseOptions:
    # Capture the whole compiled program in a CUDA graph and replay it (CUDA only; see README for when).
    cudagraphs: bool = False
    # Where compiled kernels are cached (default: $FUSEBACKEND_CACHE_DIR or ~/.cache/fusebackend).
    cache_dir: Optional[str] = None
    # 'warn': a group that cannot be compiled runs as ATen with one warning; 'error': raise instead.
    fallback: str = "warn"
    # Largest number of ATen nodes fused into one kernel.
    max_group_nodes: int = 200
    # Compile kernels on this many threads (0: one per CPU core).
    compile_threads: int = 0
    # Write graphs, groups and sources of every compiled graph to this folder (also $FUSEBACKEND_DUMP_DIR).
    dump_dir: Optional[str] = None
    # Matrix products on the GPU with at most this many rows (half types, nn.Linear weights) become fused
    # reduction kernels with their epilogue instead of cuBLAS calls; 0: always cuBLAS. Measured on one H100:
    # 1 row (decode) beats cuBLAS (decode_mlp_block 0.129 vs 0.159 ms with CUDA graphs); 16 rows lose badly
    # (moe_top2of8 0.78 vs 0.19 ms: the kernel reads each weight row once per activation row, from L2).
    gemv_max_rows: int = 1
    # Pad large GPU half-type matrix products whose sizes are not multiples of 8 (cuBLAS's slow align1 path;
    # GPT-2's LM head: 6.6 ms unpadded on an H100) -- costs a copy of the weight per call.
    pad_matmul: bool = True

    @classmethod
    def from_dict(cls, options) -> "FuseOptions":
        if options is None:
            return cls()
        if isinstance(options, FuseOptions):
            return options
        if not isinstance(options, dict):
            raise OptionError("fusebackend: options must be a dict, got %s" % type(options).__name__)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in options:
            if key not in fields:
                raise OptionError("fusebackend: unknown option %r; allowed options: %s"
                                  % (key, ", ".join(sorted(fields))))
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def need(cond, name, what):
            if not cond:
                raise OptionError("fusebackend: option %r must be %s, got %r" % (name, what, getattr(self, name)))
        need(isinstance(self.cudagraphs, bool), "cudagraphs", "True or False")
        need(self.cache_dir is None or isinstance(self.cache_dir, str), "cache_dir", "a path string or None")
        need(self.fallback in ("warn", "error"), "fallback", "one of 'warn', 'error'")
        need(isinstance(self.max_group_nodes, int) and not isinstance(self.max_group_nodes, bool)
             and self.max_group_nodes >= 1, "max_group_nodes", "an int >= 1")
        need(isinstance(self.compile_threads, int) and not isinstance(self.compile_threads, bool)
             and self.compile_threads >= 0, "compile_threads", "an int >= 0")
        need(self.dump_dir is None or isinstance(self.dump_dir, str), "dump_dir", "a path string or None")
        need(isinstance(self.pad_matmul, bool), "pad_matmul", "True or False")
        need(isinstance(self.gemv_max_rows, int) and not isinstance(self.gemv_max_rows, bool)
             and self.gemv_max_rows >= 0, "gemv_max_rows", "an int >= 0")
