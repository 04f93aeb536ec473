"""Measure this machine's HardwareProfile in seconds, cache it on disk, or load one the user gives.

What is measured (medians of few calls; sizes bandwidth-bound, repetitions few, the whole run time-boxed):
- CPU, at torch.get_num_threads(): host copy; per dtype 1-, 16- and 64-row F.linear calls on the same weights,
  read through the additive CPU model of passes/cost_model.py (time = bytes / GEMV rate + FLOPs / GEMM rate):
  the 16-to-64-row slope gives the GEMM rate, the 1-row call (less its FLOPs) the GEMV rate. With CUDA the
  weights cycle through about twice the last-level cache (a 300 MB L3 would otherwise serve them).
- CUDA: device copy, matmul rate (bf16, f16 at 8192^3; f32 at 4096^3, torch's TF32 setting as it is), pinned
  host<->device copies, the launch of a tiny ATen op (what experts and attention run as), a 4-byte
  device->host round trip, and the shared DRAM rate: a CPU GEMV loop and host->device copies (~15 ms each) at once, read
  through overlap_time's model (cost_model.shared_bw_from_overlap).
Without CUDA the profile is this CPU's measured part plus the reference H200's GPU, link and launch part, named
"measured-cpu+reference-h200-gpu": a CPU-only machine places nothing, but `dump`/`explain` can still show what
the H200 would decide. Its shared DRAM rate keeps the reference's ratio to (CPU GEMV + DMA) rates.

Cache: <cache dir>/profiles/<key>.json, keyed by GPU name, CPU model, core and thread count, torch version; a
file that does not parse, validate or match its key is measured again and replaced (written atomically).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from ..options import OptionError
from ..passes.cost_model import shared_bw_from_overlap
from ..passes.hardware_profile import DTYPES, HardwareProfile, reference_h200
from .cache import cache_dir, write_atomic

FORMAT = 2          # 2: the shared-DRAM probe runs ~15 ms per side (format 1 profiles are re-measured)
OPTION = "hardware_profile"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_K = 4096                # the reduction size of the CPU weight chunks (a hidden size)
_ROWS = (1, 16, 64)      # activation rows of the CPU probes: decode, and the two ends of the GEMM regime


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def last_level_cache_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 64 * 2**20


def machine_key() -> dict:
    return {"format": FORMAT, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "cpu": cpu_model_name(), "cores": os.cpu_count() or 1, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def profile_path(root: str | None = None) -> str:
    key = machine_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(ch if ch.isalnum() else "-" for ch in key["gpu"]).strip("-").lower()
    return os.path.join(root or cache_dir(), "profiles", "%s-%s.json" % (slug, digest))


def _timed(fn, reps, deadline, min_reps=2):
    """Median wall time of fn() over up to `reps` calls (fewer once past the deadline); fn synchronizes."""
    ts = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if i + 1 >= min_reps and time.perf_counter() > deadline:
            break
    return statistics.median(ts)


def _cpu_chunks(total_bytes: int, chunk_bytes: int):
    """Weight chunks in one buffer. Filled with bytes 0x3C: a normal number in bf16, f16 and f32 alike (no
    denormals, which would slow the FMAs down)."""
    n = max(2, total_bytes // chunk_bytes)
    buf = torch.empty(n * chunk_bytes, dtype=torch.uint8)
    buf.fill_(0x3C)
    return [buf[i * chunk_bytes:(i + 1) * chunk_bytes] for i in range(n)]


def _measure_cpu(chunks, deadline, reps) -> dict:
    out = {"cpu_gemm_flops": {}, "cpu_gemv_bw": {}}
    cb = chunks[0].numel()
    for name in DTYPES:
        dt = _TORCH_DTYPES[name]
        ws = [c.view(dt).view(-1, _K) for c in chunks]
        xs = [torch.full((m, _K), 0.5, dtype=dt) for m in _ROWS]
        for x in xs:
            F.linear(x, ws[0])                         # first calls: oneDNN's kernel setup
        times, it = {m: [] for m in _ROWS}, iter(range(1, 10**9))
        for i in range(reps):                          # interleaved, so drift and noise hit all alike
            for x in xs:
                w = ws[next(it) % len(ws)]
                t0 = time.perf_counter()
                F.linear(x, w)
                times[x.shape[0]].append(time.perf_counter() - t0)
            if i >= 1 and time.perf_counter() > deadline:
                break
        t1, t16, t64 = (statistics.median(times[m]) for m in _ROWS)
        flops1 = 2.0 * ws[0].numel()
        # the slope between 16 and 64 rows (a CPU may take a slower path for 1 row than for a tile of rows)
        gemm = 48 * flops1 / max(t64 - t16, 0.02 * t64)
        out["cpu_gemm_flops"][name] = gemm
        out["cpu_gemv_bw"][name] = cb / max(t1 - flops1 / gemm, 0.5 * t1)
    half = len(chunks) // 2
    it = iter(range(10**9))
    copy = _timed(lambda: chunks[half + next(it) % half].copy_(chunks[next(it) % half]), reps, deadline)
    out["cpu_mem_bw"] = 2.0 * cb / copy                   # read + write, as ANCHORS' host copy
    a, b = torch.ones(1), torch.empty(1)
    torch.add(a, 1, out=b)
    t0 = time.perf_counter()
    for _ in range(200):
        torch.add(a, 1, out=b)
    out["cpu_dispatch_s"] = (time.perf_counter() - t0) / 200
    return out


def _cuda_timed(fn, reps, deadline):
    fn()
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
        if i >= 1 and time.perf_counter() > deadline:
            break
    return statistics.median(ts)


def _launch_s() -> float:
    """Host time per launch of a tiny ATen op on the GPU (experts and attention run as ATen ops)."""
    y = torch.zeros(1, device="cuda")
    torch.add(y, 1, out=y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        torch.add(y, 1, out=y)
    dt = (time.perf_counter() - t0) / 300
    torch.cuda.synchronize()
    return dt


def _measure_gpu(deadline, reps):
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    out = {"gpu_name": torch.cuda.get_device_name(dev), "gpu_memory_bytes": int(props.total_memory)}
    n = 256 << 20
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    out["gpu_mem_bw"] = 2.0 * n / _cuda_timed(lambda: b.copy_(a), reps, deadline)
    out["gpu_matmul_flops"] = {}
    for name in DTYPES:
        m = 4096 if name == "float32" else 8192
        x = torch.randn(m, m, device=dev, dtype=_TORCH_DTYPES[name])
        out["gpu_matmul_flops"][name] = 2.0 * m ** 3 / _cuda_timed(lambda: x @ x, reps, deadline)
        del x
    h = torch.empty(n, dtype=torch.uint8).pin_memory()
    out["h2d_bw"] = n / _cuda_timed(lambda: a.copy_(h, non_blocking=True), reps, deadline)
    out["d2h_bw"] = n / _cuda_timed(lambda: h.copy_(a, non_blocking=True), reps, deadline)
    out["gpu_launch_s"] = _launch_s()
    d1, h1 = torch.zeros(1, device=dev), torch.zeros(1)
    h1.copy_(d1)
    t0 = time.perf_counter()
    for _ in range(100):
        h1.copy_(d1)                               # blocking: launch + wait + copy back
    out["sync_s"] = (time.perf_counter() - t0) / 100
    return out, h, a


def _measure_shared(chunks, gemv_bw, pinned, dst, dma_alone, rounds=3, span_s=0.015) -> float:
    """CPU GEMVs and host->device copies, each sized to last about `span_s`, alone and then started together,
    read through overlap_time's model (its inverse). As the hybrid runtime runs them: the GEMVs on a second
    thread over weights well beyond the last-level cache, the copies on a side stream waited for by an event.
    Why 15 ms and not one 256 MB copy (4.7 ms): at that length the thread's start and the event's wake-up are
    a large part of the overlap, and the first such measurement on the H200 read 63.6 GB/s where a 352 MB
    expert pair showed about 84."""
    ws = [c.view(torch.bfloat16).view(-1, _K) for c in chunks]
    x = torch.full((1, _K), 0.5, dtype=torch.bfloat16)
    n_copies = max(1, round(span_s / dma_alone))
    n_gemv = max(1, round(n_copies * dma_alone * gemv_bw / chunks[0].numel()))
    stream = torch.cuda.Stream()
    start = threading.Event()

    def cpu():
        t0 = time.perf_counter()
        for i in range(n_gemv):
            F.linear(x, ws[i % len(ws)])
        return time.perf_counter() - t0

    def dma():
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(n_copies):
                dst.copy_(pinned, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        return time.perf_counter() - t0
    cpu(), dma()
    c_alone = statistics.median(cpu() for _ in range(rounds))
    d_alone = statistics.median(dma() for _ in range(rounds))
    both = []
    for _ in range(rounds):
        got = {}
        start.clear()
        th = threading.Thread(target=lambda: (start.wait(), got.__setitem__("c", cpu())))
        th.start()
        time.sleep(0.002)                 # the thread is parked on the event: both start within microseconds
        start.set()
        d = dma()
        th.join()
        both.append((got["c"], d))
    c_both = statistics.median(c for c, _ in both)
    d_both = statistics.median(d for _, d in both)
    return shared_bw_from_overlap(n_gemv * chunks[0].numel(), c_alone, c_both, n_copies * pinned.numel(), d_alone,
                                  d_both)


def measure_profile(budget_s: float | None = None) -> HardwareProfile:
    """Measure this machine now (about 5 s with CUDA, 2 s without; `budget_s` overrides)."""
    cuda = torch.cuda.is_available()
    budget = budget_s if budget_s is not None else (5.0 if cuda else 2.0)
    start = time.perf_counter()
    if cuda:
        total = min(1 << 30, max(512 << 20, 4 * last_level_cache_bytes()))
        chunks = _cpu_chunks(total, 64 << 20)
    else:       # nothing is placed on a CPU-only machine: a smaller working set keeps this quick
        chunks = _cpu_chunks(160 << 20, 32 << 20)
    cpu = _measure_cpu(chunks, start + 0.4 * budget, reps=max(5, len(chunks)))
    ref = reference_h200()
    common = dict(cpu_name=cpu_model_name(), cpu_threads=torch.get_num_threads(), torch_version=torch.__version__,
                  **cpu)
    if not cuda:
        ratio = ref.shared_dram_bw / (ref.cpu_gemv_bw["bfloat16"] + ref.h2d_bw)
        return HardwareProfile(
            name="measured-cpu+reference-h200-gpu", gpu_name=ref.gpu_name, gpu_memory_bytes=ref.gpu_memory_bytes,
            gpu_mem_bw=ref.gpu_mem_bw, gpu_matmul_flops=dict(ref.gpu_matmul_flops), h2d_bw=ref.h2d_bw,
            d2h_bw=ref.d2h_bw, gpu_launch_s=ref.gpu_launch_s, sync_s=ref.sync_s,
            shared_dram_bw=ratio * (cpu["cpu_gemv_bw"]["bfloat16"] + ref.h2d_bw), **common)
    gpu, pinned, dst = _measure_gpu(start + 0.8 * budget, reps=5)
    dma_alone = pinned.numel() / gpu["h2d_bw"]
    shared = _measure_shared(chunks, cpu["cpu_gemv_bw"]["bfloat16"], pinned, dst, dma_alone)
    return HardwareProfile(name="measured", shared_dram_bw=shared, **gpu, **common)


def cached_profile(refresh: bool = False) -> HardwareProfile:
    """This machine's profile from the disk cache, measured (and cached) when absent, stale or corrupt. A cache
    folder that cannot be written costs a measurement per process, not an error."""
    try:
        path = profile_path()
    except OSError:
        return measure_profile()
    if not refresh:
        try:
            with open(path) as f:
                entry = json.load(f)
            if entry.get("key") == machine_key():
                return HardwareProfile.from_dict(entry["profile"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass                                   # absent or not to be trusted: measure again
    prof = measure_profile()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = json.dumps({"key": machine_key(), "profile": prof.to_dict()}, indent=1, sort_keys=True)
        write_atomic(path, data.encode())
    except OSError:
        pass
    return prof


def load_profile(spec=None) -> HardwareProfile:
    """The `hardware_profile` option: None (this machine, cached), "reference-h200", a HardwareProfile, a dict
    of its fields, or the path of a JSON file holding one (a cache file of this module also works)."""
    if spec is None:
        return cached_profile()
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, str) and spec == "reference-h200":
        return reference_h200()
    if isinstance(spec, dict):
        try:
            return HardwareProfile.from_dict(spec)
        except ValueError as e:
            raise OptionError("fusebackend: option %r: %s" % (OPTION, e)) from None
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise OptionError("fusebackend: option %r: no such file %r" % (OPTION, path)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError("fusebackend: option %r: cannot read %r: %s" % (OPTION, path, e)) from None
        except json.JSONDecodeError as e:
            raise OptionError("fusebackend: option %r: %r is not valid JSON: %s" % (OPTION, path, e)) from None
        if isinstance(d, dict) and isinstance(d.get("profile"), dict) and "key" in d:
            d = d["profile"]
        try:
            return HardwareProfile.from_dict(d)
        except ValueError as e:
            raise OptionError("fusebackend: option %r: %r: %s" % (OPTION, path, e)) from None
    raise OptionError("fusebackend: option %r must be None, 'reference-h200', a dict, a HardwareProfile or a "
                      "path to a JSON file, got %s" % (OPTION, type(spec).__name__))
