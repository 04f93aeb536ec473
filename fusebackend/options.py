"""Every user-visible knob, in one dataclass, validated with a message that names the option."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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
    # Keep each compiled graph's program in that cache too, so a warm start skips lowering, passes and emission
    # (runtime/program_cache.py). None: on, unless $FUSEBACKEND_PROGRAM_CACHE=0.
    program_cache: Optional[bool] = None
    # 'warn': a group that cannot be compiled runs as ATen with one warning; 'error': raise instead.
    fallback: str = "warn"
    # Largest number of ATen nodes fused into one kernel.
    max_group_nodes: int = 200
    # Compile kernels on this many threads (0: one per CPU core).
    compile_threads: int = 0
    # Write graphs, groups and sources of every compiled graph to this folder (also $FUSEBACKEND_DUMP_DIR).
    dump_dir: Optional[str] = None
    # Matrix products on the GPU with at most this many rows (half types, nn.Linear weights) become fused
    # reduction kernels with their epilogue instead of cuBLAS calls; 0: always cuBLAS. Measured on one H100
    # (2026-11; re-check on the H200): 1 row (decode) beats cuBLAS (decode_mlp_block 0.129 vs 0.159 ms with
    # CUDA graphs); 16 rows lose badly (moe_top2of8 0.78 vs 0.19 ms: the kernel reads each weight row once per
    # activation row, from L2).
    gemv_max_rows: int = 1
    # Pad large GPU half-type matrix products whose sizes are not multiples of 8 (cuBLAS's slow align1 path;
    # GPT-2's LM head: 6.6 ms unpadded on an H100, 2026-11; re-check on the H200) -- costs a copy of the weight
    # per call.
    pad_matmul: bool = True
    # Place MoE experts and attention on the CPU or the GPU (inference): the GPU may hold at most this much of
    # the model's weights -- bytes (int), a size string ("24GiB", "512MB") or a share of the card ("50%").
    # Weights beyond it live in pinned host memory; the cost model picks CPU compute or streaming per expert.
    gpu_memory_budget: Optional[Union[int, str]] = None
    # The hardware profile placement plans with: None (measured once per machine, cached on disk), a path to a
    # JSON file, or a dict of HardwareProfile fields.
    hardware_profile: Optional[Union[str, dict]] = None
    # Expert popularity for placement: {layer: [share of tokens per expert]}; None: uniform.
    routing_profile: Optional[dict] = None
    # Without a budget, each whole MoE layer (HF's loop, or every expert masked by its gate) runs as one op with
    # one device -> host sync per call (passes/moe_rewrite.py). Default: on unless $FUSEBACKEND_MOE_OP=0.
    moe_op: bool = dataclasses.field(default_factory=lambda: os.environ.get("FUSEBACKEND_MOE_OP", "1") != "0")
    # Memory layout of 2-D convolutions and the kernels between them (passes/layout.py): 'auto' runs them
    # channels-last on CUDA where TorchInductor's rule would; 'channels_last' always; 'contiguous' never.
    # Default 'auto' since s9 (H200, 2026-12-04: small_cnn bf16 1.37 ms against 1.64 contiguous, Inductor 1.37),
    # once batch norm and pooling fused and the NHWC pool + mean became a column reduction.
    conv_layout: str = "auto"

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
        need(self.program_cache is None or isinstance(self.program_cache, bool), "program_cache",
             "True, False or None")
        need(self.fallback in ("warn", "error"), "fallback", "one of 'warn', 'error'")
        need(isinstance(self.max_group_nodes, int) and not isinstance(self.max_group_nodes, bool)
             and self.max_group_nodes >= 1, "max_group_nodes", "an int >= 1")
        need(isinstance(self.compile_threads, int) and not isinstance(self.compile_threads, bool)
             and self.compile_threads >= 0, "compile_threads", "an int >= 0")
        need(self.dump_dir is None or isinstance(self.dump_dir, str), "dump_dir", "a path string or None")
        need(isinstance(self.pad_matmul, bool), "pad_matmul", "True or False")
        need(isinstance(self.moe_op, bool), "moe_op", "True or False")
        need(self.conv_layout in ("auto", "channels_last", "contiguous"), "conv_layout",
             "one of 'auto', 'channels_last', 'contiguous'")
        if self.gpu_memory_budget is not None:
            budget_fraction_or_bytes(self.gpu_memory_budget)
        need(self.hardware_profile is None or isinstance(self.hardware_profile, (str, dict)), "hardware_profile",
             "a path string, a dict of profile fields, or None")
        need(self.routing_profile is None or (isinstance(self.routing_profile, dict) and all(
            isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and x >= 0 for x in v)
            for v in self.routing_profile.values())), "routing_profile",
             "a dict {layer: [non-negative share per expert]} or None")
        need(isinstance(self.gemv_max_rows, int) and not isinstance(self.gemv_max_rows, bool)
             and self.gemv_max_rows >= 0, "gemv_max_rows", "an int >= 0")


def budget_fraction_or_bytes(value):
    """gpu_memory_budget -> ("bytes", n) or ("fraction", f); OptionError naming the option otherwise."""
    def bad(why):
        return OptionError("fusebackend: option 'gpu_memory_budget' %s, got %r (examples: 24000000000, "
                           "\"24GiB\", \"512MB\", \"50%%\")" % (why, value))
    if isinstance(value, bool):
        raise bad("must be bytes, a size string or a percentage")
    if isinstance(value, int):
        if value < 0:
            raise bad("must not be negative")
        return "bytes", value
    if not isinstance(value, str):
        raise bad("must be an int or a string")
    text = value.strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise bad("is not a percentage") from None
        if not 0 <= pct <= 100:
            raise bad("must be a percentage from 0% to 100%")
        return "fraction", pct / 100.0
    if text.startswith("-"):
        raise bad("must not be negative")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if match is None:
        raise bad("is not a number with a unit")
    if match.group(2) not in _UNITS:
        raise bad("has an unknown unit %r (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %%)" % match.group(2))
    amount = float(match.group(1))
    unit = match.group(2)
    return "bytes", int(amount * _UNITS[unit])


def resolve_budget(value, device_bytes: int) -> int:
    """The budget in bytes on a card of device_bytes."""
    kind, amount = budget_fraction_or_bytes(value)
    return int(amount * device_bytes) if kind == "fraction" else amount
