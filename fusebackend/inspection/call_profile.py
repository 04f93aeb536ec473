"""Where a call's time goes: host time, GPU busy time and TKLQT, for eager, Inductor and fuse side by side.

TKLQT (total kernel launch and queuing time, from the SKIP profiler paper on CPU-GPU coupled systems) sums, over
a call's kernels, the time from the host's launch call to the kernel's start on the GPU. A call whose GPU busy
time is well under its wall time leaves the GPU idle waiting for launches: launch-bound at that batch size,
where fewer kernels and a cheaper per-call path pay; otherwise it is GPU-bound, where the kernels themselves do.

    fusebackend dump llama_layer --device cuda --profile
    print(fusebackend.explain(model, x, profile=True))
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

GPU_BOUND = 0.9            # GPU busy >= 90% of the wall time per call: the kernels, not the launches, limit it


@dataclass
class Event:
    """One profiler event, reduced to what the summary needs (kind: "kernel", "memcpy", "launch", "cpu")."""
    kind: str
    name: str
    start_ns: int
    dur_ns: int
    corr: int = 0


@dataclass
class CallProfile:
    backend: str
    wall_us: float             # per call, device synchronised at the end of the timed calls
    host_us: float             # per call, until the call returned (launches queued)
    kernels: float = 0.0       # GPU kernels per call
    gpu_busy_us: float = None  # union of kernel and copy intervals per call (None on the CPU)
    tklqt_us: float = None     # summed launch-to-start time of the call's kernels
    note: str = ""

    @property
    def bound(self) -> str:
        if self.note:
            return "-"
        if self.gpu_busy_us is None:
            return "host (CPU)"
        return "GPU-bound" if self.gpu_busy_us >= GPU_BOUND * self.wall_us else "launch-bound"


def _union_ns(spans) -> int:
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(events, calls: int):
    """(kernels, GPU busy us, TKLQT us) per call from the events of `calls` calls."""
    launches = {}
    for e in events:
        if e.kind == "launch" and e.corr:
            launches.setdefault(e.corr, e.start_ns)
    kern = [e for e in events if e.kind == "kernel"]
    busy = _union_ns([(e.start_ns, e.start_ns + e.dur_ns) for e in events if e.kind in ("kernel", "memcpy")])
    tklqt = sum(max(0, e.start_ns - launches[e.corr]) for e in kern if e.corr in launches)
    n = max(1, calls)
    return len(kern) / n, busy / 1e3 / n, tklqt / 1e3 / n


def _events(prof):
    out = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        corr = e.correlation_id() or e.linked_correlation_id()
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            kind = "memcpy" if "memcpy" in name.lower() or "memset" in name.lower() else "kernel"
        elif "LaunchKernel" in name or "LaunchCooperativeKernel" in name:
            kind = "launch"
        else:
            kind = "cpu"
        out.append(Event(kind, name, e.start_ns(), e.duration_ns(), corr))
    return out


def profile_call(fn, args, backend: str = "", reps: int = 20, warmup: int = 3, kwargs=None) -> CallProfile:
    """Time fn(*args, **kwargs): wall and host time per call over `reps` calls, then one profiled round of
    `reps` calls for the GPU's side."""
    kwargs = kwargs or {}
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in list(args) + list(kwargs.values()))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args, **kwargs)
        sync()
        host = 0.0
        t0 = time.perf_counter()
        for _ in range(reps):
            h = time.perf_counter()
            fn(*args, **kwargs)
            host += time.perf_counter() - h
        sync()
        wall = (time.perf_counter() - t0) / reps * 1e6
        prof = CallProfile(backend, wall, host / reps * 1e6)
        if not cuda:
            return prof
        from torch.profiler import ProfilerActivity, profile
        # each call on an idle GPU: a kernel's launch-to-start time is then its own call's launch and queueing,
        # not the wait behind earlier calls (H200: without it, a GPU-bound loop summed seconds per call)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(reps):
                fn(*args, **kwargs)
                sync()
    prof.kernels, prof.gpu_busy_us, prof.tklqt_us = summarize(_events(p), reps)
    return prof


def compare_backends(fn, args, options=None, backends=("eager", "inductor", "fuse"), reps: int = 20, kwargs=None):
    """One CallProfile per backend, from one process: eager, Inductor and fuse on the same inputs."""
    from ..capture.backend import fuse
    out = []
    for name in backends:
        torch._dynamo.reset()
        try:
            if name == "eager":
                f = fn
            elif name == "inductor":
                f = torch.compile(fn)
            else:
                f = torch.compile(fn, backend=fuse, options=options) if options else torch.compile(fn, backend=fuse)
            out.append(profile_call(f, args, name, reps, kwargs=kwargs))
        except Exception as e:          # Inductor may not build here (no compiler, no Triton): say so, go on
            out.append(CallProfile(name, float("nan"), float("nan"), note="%s: %s" % (
                type(e).__name__, str(e).splitlines()[0][:80] if str(e) else "")))
    torch._dynamo.reset()
    return out


def format_profiles(profiles) -> str:
    def us(v):
        return "-" if v is None or v != v else "%.1f" % v
    lines = ["per call (us)   %10s %10s %8s %10s %10s  %s" % ("wall", "host", "kernels", "GPU busy", "TKLQT",
                                                               "limited by")]
    for p in profiles:
        if p.note:
            lines.append("  %-13s %s" % (p.backend, p.note))
            continue
        kern = "-" if p.gpu_busy_us is None else "%.0f" % p.kernels
        lines.append("  %-13s %10s %10s %8s %10s %10s  %s" % (p.backend, us(p.wall_us), us(p.host_us), kern,
                                                           us(p.gpu_busy_us), us(p.tklqt_us), p.bound))
    return "\n".join(lines)
