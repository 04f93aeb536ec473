"""Optimizer steps: eager foreach, eager fused (CUDA), Inductor and fuse, from one run; per step the wall time,
the kernel launches and the ATen calls, against the floor.

    python3 bench/optimizer.py [--device cpu|cuda] [--n 50] [--opt adamw,adam,sgd] [--steps-check 5]
    python3 bench/optimizer.py --smoke        # small and quick: 24 tensors, AdamW, eager and fuse (CPU)

Parameters: n float32 tensors cycling through the five shapes of shared/reference/adamw_anchor.py. One row per
optimizer and way of running it:
  ms        wall clock per step (median of interleaved reps, Python overhead included),
  GPU ms    (CUDA) the summed durations of the step's device activities in the profiler (kernels and copies),
  launches  kernel launches per step: on CUDA counted by the profiler (device kernels, any launcher); on the
            CPU fuse's compiled kernels (a horizontal batch counts once), Inductor's generated kernels, eager's
            ATen calls,
  ATen      ATen calls per step (the profiler's top-level aten:: events: dispatched ops, allocations and
            copies included; a fuse or Inductor kernel launch is none),
  compile   seconds of the first (compiling) step, fresh fuse and Inductor caches,
  err       relative error of parameters and optimizer state after --steps-check steps against eager foreach
            from the same start.
The floor row is bytes moved / bandwidth (AdamW and Adam: read p, g, m, v, write p, m, v = 28 B/param; SGD
with momentum: read p, g, b, write p, b = 20) at 4.2 TB/s on CUDA (--floor-bw; the H200's copy rate), at the
measured copy bandwidth on the CPU.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FUSEBACKEND_CACHE_DIR", tempfile.mkdtemp(prefix="bench_opt_fuse_"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_opt_ind_"))

import torch  # noqa: E402

from timing import copy_bandwidth, syncer, wall_ms_interleaved  # noqa: E402

SHAPES = [(256, 256), (1024,), (256, 1024), (256,), (64, 256)]
OPTIMIZERS = {   # name -> (constructor, bytes per parameter moved by one step)
    "adamw": (lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw), 28),
    "adam": (lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw), 28),
    "sgd": (lambda ps, **kw: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw), 20),
}
H200_BW = 4.2e12


def make_params(n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(SHAPES[i % 5], generator=g).to(device)) for i in range(n)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return ps


def state_tensors(opt, ps):
    out = list(ps)
    for p in ps:
        st = opt.state.get(p, {})
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def rel_err(got, ref):
    worst = 0.0
    for a, b in zip(got, ref):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0)
    return worst


def compiled(opt, backend):
    torch._dynamo.reset()
    if backend == "fuse":       # the package on sys.path (PYTHONPATH), installed or not
        import fusebackend
        from fusebackend.capture.backend import fuse
        fusebackend.reset()
        return torch.compile(opt.step, backend=fuse)
    return torch.compile(opt.step, backend=backend)


class KernelCount:
    """The kernel launches per step the compile inside the block settles on (fuse: its compile records, a
    horizontal batch once; Inductor: its generated-kernel counter). Used on the CPU, where the profiler does
    not see a kernel launch."""

    def __init__(self, backend):
        self.backend, self.count = backend, None

    def __enter__(self):
        if self.backend == "fuse":
            from fusebackend.capture import records
            self._ctx = records.collect()
            self._reps = self._ctx.__enter__()
        elif self.backend == "inductor":
            from torch._inductor import metrics
            metrics.reset()
        return self

    def __exit__(self, *exc):
        if self.backend == "fuse":
            self._ctx.__exit__(*exc)
            self.count = sum(r.num_kernels for r in self._reps)
        elif self.backend == "inductor":
            from torch._inductor import metrics
            self.count = metrics.generated_kernel_count
        return False


def profile_step(fn, device, sync):
    """(ATen calls, device kernels, GPU busy us) of one call of fn: the profiler's top-level aten:: events (not
    those an ATen op runs inside itself) and, on CUDA, its kernel activities (memcpy and memset left out). The call counted
    is the second under the profiler: Dynamo may compile the step anew the first time the profiler is on (the
    optimizer's step opens a record_function then), and a compile -- Inductor's autotuning runs kernels --
    is no step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sync()
    with torch.profiler.profile(activities=acts):
        fn()
        sync()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync()
    aten, kernels, gpu_us = collections.Counter(), 0, 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            name = e.name.lower()
            kernels += not ("memcpy" in name or "memset" in name)
            gpu_us += e.time_range.elapsed_us()     # device activity, copies included: the GPU's busy time
        elif e.name.startswith("aten::"):
            parent = e.cpu_parent
            if not (parent is not None and parent.name.startswith("aten::")):
                aten[e.name] += 1
    return aten, kernels, gpu_us


def bench_one(name, n, device, check_steps, backends, max_s):
    ctor, bytes_per_param = OPTIMIZERS[name]
    sync = syncer(device)
    row = {"optimizer": name, "tensors": n, "params_M": sum(p.numel() for p in make_params(n, "cpu")) / 1e6}
    ref_ps = make_params(n, device)
    ref = ctor(ref_ps, foreach=True)
    for _ in range(check_steps):
        ref.step()
    calls = {}
    ps = make_params(n, device)
    calls["eager"] = ctor(ps, foreach=True).step
    if device == "cuda":
        ps_f = make_params(n, device)
        calls["eager_fused"] = ctor(ps_f, fused=True).step
    for be in backends:
        try:
            ps_c = make_params(n, device)
            opt_c = ctor(ps_c, foreach=True)
            step = compiled(opt_c, be)
            with KernelCount(be) as kc:
                t0 = time.perf_counter()
                step()
                sync()
                row[be + "_compile_s"] = time.perf_counter() - t0
            row[be + "_kernels"] = kc.count
            for _ in range(check_steps - 1):
                step()
            sync()
            row[be + "_err"] = rel_err(state_tensors(opt_c, ps_c), state_tensors(ref, ref_ps))
            calls[be] = step
        except Exception as e:     # noqa: BLE001 -- a failing backend is a cell, not the end of the run
            row[be + "_error"] = repr(e)[:200]
    for k, fn in calls.items():     # warm: the compiled ones after the checked steps, eager after one step
        try:
            if k in ("eager", "eager_fused"):
                fn()
            aten, kernels, gpu_us = profile_step(fn, device, sync)
            row[k + "_aten"] = sum(aten.values())
            if device == "cuda":
                row[k + "_gpu_ms"] = gpu_us / 1e3
            row[k + "_aten_ops"] = dict(aten.most_common(6))
            if device == "cuda" and kernels:
                row[k + "_launches"] = kernels
            elif k in ("eager", "eager_fused"):
                row[k + "_launches"] = sum(aten.values())
            else:
                row[k + "_launches"] = row.get(k + "_kernels")
        except Exception as e:     # noqa: BLE001
            row[k + "_profile_error"] = repr(e)[:200]
    ms, errors = wall_ms_interleaved(calls, sync, min_total=0.3, reps=7, max_s=max_s)
    for k, v in ms.items():
        row[k + "_ms"] = v
    for k, e in errors.items():
        row[k + "_error"] = repr(e)[:200]
    return row, bytes_per_param


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=None, help="tensors (default 50 on the CPU, 200 on CUDA)")
    ap.add_argument("--opt", default=None, help="default adamw,adam,sgd (--smoke: adamw)")
    ap.add_argument("--backends", default=None, help="default inductor,fuse (--smoke: fuse)")
    ap.add_argument("--steps-check", type=int, default=None)
    ap.add_argument("--max-s", type=float, default=None, help="time box of each optimizer's timed reps")
    ap.add_argument("--floor-bw", type=float, default=None,
                    help="bytes/s of the floor (default 4.2e12 on CUDA, the measured copy rate on the CPU)")
    ap.add_argument("--smoke", action="store_true", help="24 tensors, AdamW, fuse only, 3 checked steps")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    n = a.n or (24 if a.smoke else 200 if a.device == "cuda" else 50)
    opts = (a.opt or ("adamw" if a.smoke else "adamw,adam,sgd")).split(",")
    backends = [b for b in (a.backends or ("fuse" if a.smoke else "inductor,fuse")).split(",") if b]
    steps_check = a.steps_check or (3 if a.smoke else 5)
    max_s = a.max_s or (5.0 if a.smoke else 30.0)
    bw = copy_bandwidth(a.device, 1 << 27)
    floor_bw = a.floor_bw or (H200_BW if a.device == "cuda" else bw)
    print("device %s, %d tensors of shapes %s; floor at %.1f GB/s (measured copy bandwidth %.1f GB/s, read + "
          "write)" % (a.device, n, SHAPES, floor_bw / 1e9, bw / 1e9), flush=True)
    cols = ["eager"] + (["eager_fused"] if a.device == "cuda" else []) + backends
    print("%-6s %-12s %9s %9s %9s %9s %9s %9s" % ("opt", "run", "ms/step", "GPU ms", "launches", "ATen", "compile s",
                                                  "err"))
    rows = []
    for name in opts:
        row, bpp = bench_one(name, n, a.device, steps_check, backends, max_s)
        row["floor_ms"] = row["params_M"] * 1e6 * bpp / floor_bw * 1e3
        rows.append(row)
        print("%-6s %-12s %9.3f" % (name, "floor", row["floor_ms"]))
        for c in cols:
            def cell(key, fmt):
                v = row.get(c + key)
                return fmt % v if v is not None else "-"
            print("%-6s %-12s %9s %9s %9s %9s %9s %9s" % (
                name, c, cell("_ms", "%.3f") if c + "_ms" in row else "ERROR", cell("_gpu_ms", "%.3f"),
                cell("_launches", "%d"),
                cell("_aten", "%d"), cell("_compile_s", "%.1f"), cell("_err", "%.1e")), flush=True)
        for c in cols:
            if row.get(c + "_aten_ops"):
                print("    %s ATen calls: %s" % (c, ", ".join("%s x%d" % kv for kv in row[c + "_aten_ops"].items())))
        for k, v in row.items():
            if k.endswith("_error"):
                print("    %s: %s" % (k, v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "tensors": n, "floor_bw": floor_bw, "copy_bw": bw, "rows": rows}, f,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
