"""Optimizer steps: eager foreach (and eager fused on CUDA) vs Inductor vs fuse, from one run.

    python3 bench/optimizer.py [--device cpu|cuda] [--n 50] [--opt adamw,adam,sgd] [--steps-check 5]

Parameters: n float32 tensors cycling through the five shapes of shared/reference/adamw_anchor.py. Per optimizer
one row: ms per step (wall clock, median, interleaved reps), cold compile seconds (fresh fuse and Inductor
caches), kernel launches per step, and the relative error of parameters and optimizer state after
--steps-check compiled steps against eager foreach from the same start. floor = bytes moved / copy bandwidth
(AdamW and Adam: read p, g, m, v, write p, m, v = 28 B/param; SGD with momentum: read p, g, b, write p, b = 20).
"""
import argparse
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
    if backend == "fuse":
        import fusebackend
        fusebackend.reset()
    return torch.compile(opt.step, backend=backend)


class KernelCount:
    """Counts the kernel launches per step of the compile that happens inside the block (fuse: its compile
    records; Inductor: its generated-kernel counter)."""

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
            self.count = sum(r.num_kernels + r.num_aten_calls for r in self._reps)
        elif self.backend == "inductor":
            from torch._inductor import metrics
            self.count = metrics.generated_kernel_count
        return False


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
    ap.add_argument("--opt", default="adamw,adam,sgd")
    ap.add_argument("--backends", default="inductor,fuse")
    ap.add_argument("--steps-check", type=int, default=5)
    ap.add_argument("--max-s", type=float, default=30.0, help="time box of each optimizer's timed reps")
    a = ap.parse_args()
    n = a.n or (200 if a.device == "cuda" else 50)
    backends = [b for b in a.backends.split(",") if b]
    bw = copy_bandwidth(a.device, 1 << 27)
    print("device %s, %d tensors of shapes %s, copy bandwidth %.1f GB/s (read + write)"
          % (a.device, n, SHAPES, bw / 1e9), flush=True)
    cols = ["eager"] + (["eager_fused"] if a.device == "cuda" else []) + backends
    head = "%-6s %8s " % ("opt", "floor") + " ".join("%12s" % (c + " ms") for c in cols)
    head += "  " + "  ".join("%s compile s / launches / err" % b for b in backends)
    print(head)
    for name in a.opt.split(","):
        row, bpp = bench_one(name, n, a.device, a.steps_check, backends, a.max_s)
        floor = row["params_M"] * 1e6 * bpp / bw * 1e3
        line = "%-6s %8.3f " % (name, floor) + " ".join(
            "%12s" % ("%.3f" % row[c + "_ms"] if c + "_ms" in row else "ERROR") for c in cols)
        for b in backends:
            if b + "_compile_s" in row:
                line += "  %s %.1f / %s / %.1e" % (b, row[b + "_compile_s"], row.get(b + "_kernels"),
                                                   row.get(b + "_err", float("nan")))
        print(line, flush=True)
        for k, v in row.items():
            if k.endswith("_error"):
                print("    %s: %s" % (k, v))


if __name__ == "__main__":
    main()
