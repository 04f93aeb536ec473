"""The hardware profile: what the placement cost model knows about one machine, as plain data.

Rates are bytes/s or FLOP/s, times are seconds. `runtime/hardware.py` measures a profile and caches it on disk;
capture hands it to the passes, which never import the runtime. `reference_h200()` is the fixed profile of the
lent H200 machine (from /work/shared/ANCHORS.md), used by tests and by `dump` on CPU-only machines.
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Mapping

# Per-dtype tables must cover these (the dtypes placement decides for).
DTYPES = ("float32", "bfloat16", "float16")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
_RATE_TABLES = ("gpu_matmul_flops", "cpu_gemm_flops", "cpu_gemv_bw")
_STRINGS = ("name", "gpu_name", "cpu_name", "torch_version")


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16' (passes take either; no torch import needed)."""
    s = dtype if isinstance(dtype, str) else str(dtype)
    return s[len("torch."):] if s.startswith("torch.") else s


def dtype_size(dtype) -> int:
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = dtype_name(dtype)
    if name not in _ITEMSIZE:
        raise ValueError("cost model: unknown dtype %r" % (dtype,))
    return _ITEMSIZE[name]


@dataclass(frozen=True)
class HardwareProfile:
    name: str                  # where it came from, e.g. "reference-h200" or "measured (...)"
    gpu_name: str
    gpu_memory_bytes: int
    gpu_mem_bw: float          # device-to-device copy, bytes read + written per second
    gpu_matmul_flops: Mapping[str, float]   # dtype name -> FLOP/s of a large matmul
    cpu_name: str
    cpu_threads: int           # torch threads the CPU rates were measured at
    cpu_mem_bw: float          # host copy, bytes read + written per second
    # dtype -> FLOP/s that each extra activation row of a CPU matmul costs (the CPU model is additive: time =
    # weight bytes / cpu_gemv_bw + FLOPs / cpu_gemm_flops, cost_model.py); measured as the 16-to-64-row slope
    cpu_gemm_flops: Mapping[str, float]
    cpu_gemv_bw: Mapping[str, float]        # dtype -> bytes/s of weight streamed by a 1-row CPU matmul
    h2d_bw: float              # pinned host -> device
    d2h_bw: float              # pinned device -> host
    shared_dram_bw: float      # host DRAM bytes/s while CPU compute and DMA run at once (< their sum)
    gpu_launch_s: float        # host time to launch one GPU op (an ATen op from Python)
    cpu_dispatch_s: float      # host time to dispatch one ATen op on CPU tensors
    sync_s: float              # one CPU<->GPU handoff (an event wait / tiny copy round trip)
    torch_version: str

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _RATE_TABLES:
                object.__setattr__(self, f.name, types.MappingProxyType(_check_table(f.name, v)))
            elif f.name in _STRINGS:
                if not isinstance(v, str) or not v:
                    raise ValueError("hardware profile: %r must be a non-empty string, got %r" % (f.name, v))
            elif f.name in ("cpu_threads", "gpu_memory_bytes"):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                    object.__setattr__(self, f.name, v)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ValueError("hardware profile: %r must be a positive integer, got %r" % (f.name, v))
            else:
                object.__setattr__(self, f.name, _check_positive(f.name, v))
        # the rate tables are mappings: hash their items, once, so a profile can key caches cheaply
        object.__setattr__(self, "_hash", hash(tuple(
            tuple(sorted(v.items())) if isinstance(v, Mapping) else v
            for v in (getattr(self, f.name) for f in dataclasses.fields(self)))))

    def __hash__(self):
        return self._hash

    def __reduce__(self):  # mapping proxies do not pickle: rebuild from plain data (copy/deepcopy use this too)
        return (HardwareProfile.from_dict, (self.to_dict(),))

    def rate(self, table: str, dtype) -> float:
        """profile.rate("cpu_gemm_flops", torch.bfloat16): one entry of a per-dtype table, clearly when absent."""
        t, name = getattr(self, table), dtype_name(dtype)
        if name not in t:
            raise ValueError("hardware profile %r has no %s entry for dtype %r (has: %s)"
                             % (self.name, table, name, ", ".join(sorted(t))))
        return t[name]

    def to_dict(self) -> dict:
        return {f.name: (dict(getattr(self, f.name)) if f.name in _RATE_TABLES else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d) -> "HardwareProfile":
        if not isinstance(d, Mapping):
            raise ValueError("hardware profile must be a dict, got %s" % type(d).__name__)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError("hardware profile: unknown key %r" % (key,))
        for key in names:
            if key not in d:
                raise ValueError("hardware profile: missing key %r" % (key,))
        return cls(**dict(d))

    def replace(self, **kw) -> "HardwareProfile":
        return dataclasses.replace(self, **kw)


def _check_positive(key, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError("hardware profile: %r must be a positive finite number, got %r" % (key, v))
    return float(v)


def _check_table(key, v) -> dict:
    if not isinstance(v, Mapping):
        raise ValueError("hardware profile: %r must be a dict of dtype name -> rate, got %r" % (key, v))
    for dt in DTYPES:
        if dt not in v:
            raise ValueError("hardware profile: %r is missing dtype %r" % (key, dt))
    out = {}
    for dt, r in v.items():
        if not isinstance(dt, str) or dt not in _ITEMSIZE:
            raise ValueError("hardware profile: %r has unknown dtype %r" % (key, dt))
        out[dt] = _check_positive("%s[%r]" % (key, dt), r)
    return out


def reference_h200() -> HardwareProfile:
    """The lent H200 machine (ANCHORS.md, 2026-12-01; torch 2.11.0+cu130). Fixed: tests and CPU `dump` use it."""
    return HardwareProfile(
        name="reference-h200",
        gpu_name="NVIDIA H200",
        gpu_memory_bytes=139 * 2**30,   # what the lent card reports (~139 GiB of the 141 GB)
        gpu_mem_bw=4.22e12,             # device copy, read + write
        # Assumed, not measured: dense bf16/f16 tensor-core rate reachable by cuBLAS on large shapes (~70% of the
        # 989 TFLOP/s peak); float32 without TF32 (torch's default) on the CUDA cores, ~75% of 67 TFLOP/s.
        gpu_matmul_flops={"bfloat16": 700e12, "float16": 700e12, "float32": 50e12},
        cpu_name="Intel Xeon (16 cores, AVX-512, AMX)",
        cpu_threads=16,
        cpu_mem_bw=88e9,
        # bf16 is fitted to ANCHORS' one-expert CPU times (5.5 / 6.9 / 9.1 / 10.3 ms at 1 / 16 / 32 / 64 tokens)
        # under the additive model: within 10% at each. The 1.0 TFLOP/s of probe.py (a 4096^3 GEMM, 3 calls, no
        # warm-up, so oneDNN's first-call setup is in it) cannot be the rate here: 64 tokens would take 22.5 ms
        # of FLOPs alone. float32 / float16 are assumptions (AVX-512 FMA, no AMX): not measured there.
        cpu_gemm_flops={"bfloat16": 3.7e12, "float32": 1.0e12, "float16": 1.0e12},
        # bf16 measured (1x4096 . 4096x14336); a GEMV is memory-bound, so the others are assumed equal.
        cpu_gemv_bw={"bfloat16": 69e9, "float32": 69e9, "float16": 69e9},
        h2d_bw=54.4e9,
        d2h_bw=54.4e9,
        # contention_probe.py: alone CPU 7.36 ms (48 GB/s), DMA 6.41 ms (55 GB/s); at once CPU 8.83, DMA 6.89 ms.
        # While both ran (the first 6.89 ms) DRAM served 352 MB of DMA + (352 - 47.9 GB/s * 1.94 ms) = 259 MB of
        # CPU reads: 88.8 GB/s. ANCHORS' "76 GB/s" is 704 MB over the wall clock including thread start (9.27 ms);
        # overlap_time() models the rate while both run, so it takes 88.8.
        shared_dram_bw=88.8e9,
        # experts and attention run as ATen ops: a torch op's launch (torch.add 11 us; a CuPy RawKernel is 8.4 us)
        gpu_launch_s=11e-6,
        cpu_dispatch_s=5e-6,            # assumed: a torch op on small CPU tensors (7 us on the loaded 2-core box)
        sync_s=15e-6,                   # assumed: an event wait or a 4-byte copy round trip
        torch_version="2.11.0+cu130",
    )
