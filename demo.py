"""The main job: one model-zoo model under eager, Inductor and fuse -- per-call time, kernel counts, error.

    python3 demo.py [--model NAME] [--size small|bench] [--device cpu|cuda] [--dtype ...] [--verbose]

Defaults: with a CUDA device, the GPU at bench size in bfloat16; otherwise the CPU at small size in float32.
One process, one run: fuse compiles the model (through `fusebackend.explain`, which also counts its kernels
and ATen calls), then Inductor (`torch._inductor.metrics.generated_kernel_count`, reset before its compile);
both outputs are checked against eager before anything is timed; then eager, Inductor and fuse are timed
interleaved (each repetition times all three in turn; one warm-up call each; the median over 5 repetitions,
at least 3 if the machine slows down, of the mean time per call: bench/timing.py). `--verbose` also lists
fuse's groups.

The CPU default is llama_layer at small size. On the 2-core CPU box every zoo model at small size is bound by
per-call overhead; on 2026-12-03 fuse ran llama_layer at 1.07-1.10x Inductor's speed and 1.8-2.1x eager's
(5 kernels and 8 ATen calls against Inductor's 15 kernels). llama_layer is the model the README and
`fusebackend dump` use; it was not picked for a win (earlier the same table showed fuse losing).
"""
import time

T0 = time.perf_counter()      # before torch's import: the wall time printed at the end includes it

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import torch  # noqa: E402

import fusebackend  # noqa: E402
import models  # noqa: E402
from bench.timing import flat_tensors, rel_err, syncer, wall_ms_interleaved  # noqa: E402

DEFAULT_MODEL = "llama_layer"


class Status:
    """A one-line status on a terminal ("  inductor: compiling  12 s"), rewritten every half second while
    the step runs and erased when it ends; nothing at all when stdout is not a terminal."""

    def __init__(self, what, tick=True):
        self.what, self.tick, self.on = what, tick, sys.stdout.isatty()

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.on:
            self._write()
            if self.tick:
                self.stop = threading.Event()
                self.thread = threading.Thread(target=self._loop, daemon=True)
                self.thread.start()
        return self

    def _write(self):
        clock = "  %.0f s" % (time.perf_counter() - self.t0) if self.tick else ""
        sys.stdout.write("\r\x1b[K  %s%s" % (self.what, clock))
        sys.stdout.flush()

    def _loop(self):
        while not self.stop.wait(0.5):
            self._write()

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        if self.on:
            if self.tick:
                self.stop.set()
                self.thread.join()
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
        return False


class OthersLoad:
    """CPU time other processes used while the block ran, in cores (Linux /proc/stat; None elsewhere): on a
    shared machine the timings mean little when it is high."""

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), sum(os.times()[:2]), time.perf_counter()

    def __enter__(self):
        self.cores = None
        try:
            self.start = self._busy()
        except (OSError, ValueError, IndexError):
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            (b0, o0, t0), (b1, o1, t1) = self.start, self._busy()
            self.cores = max(0.0, ((b1 - b0) - (o1 - o0)) / max(t1 - t0, 1e-9))
        return False


def tolerance(model, inputs, ref, dtype):
    """1e-5 in float32; for half types max(1e-2, twice eager's own error against a float64 run)."""
    if dtype == torch.float32:
        return 1e-5
    m64 = copy.deepcopy(model).double()
    i64 = [t.double() if t.is_floating_point() else t for t in inputs]
    return max(1e-2, 2 * rel_err(ref, [t.to(dtype) for t in flat_tensors(m64(*i64))]))


def measure(model, inputs, ref, sync, tol):
    """Compile with fuse and Inductor, check both against eager's `ref`, time all three.

    Returns (rows, fuse's explain report, exceptions raised while timing, other processes' load in cores)."""
    with Status("fuse: compiling", tick=False) as st:     # fusebackend shows its own "compiling kernels" line
        rep = fusebackend.explain(model, *inputs)        # compiles and runs once: groups, kernel and ATen counts
    fuse = torch.compile(model, backend="fuse")
    fuse_out = fuse(*inputs)                             # kernels come from the in-memory cache: no C++ build
    from torch._inductor import metrics
    metrics.reset()
    ind = torch.compile(model)
    with Status("inductor: compiling (Dynamo, AOT, C++ code generation and build)") as ist:
        ind_out = ind(*inputs)
        sync()
    rows = [dict(name="eager"),
            dict(name="inductor", kernels=metrics.generated_kernel_count, compile_s=ist.seconds,
                 err=rel_err(ind_out, ref)),
            dict(name="fuse", kernels=rep.num_kernels, aten=rep.num_aten_calls, compile_s=st.seconds,
                 err=rel_err(fuse_out, ref))]
    for r in rows[1:]:
        r["wrong"] = r["err"] > tol
    calls = {"eager": lambda: model(*inputs), "inductor": lambda: ind(*inputs), "fuse": lambda: fuse(*inputs)}
    with Status("timing eager, inductor and fuse, interleaved"), OthersLoad() as others:
        times, errors = wall_ms_interleaved(calls, sync=sync, min_total=0.1, max_s=10)
    for r in rows:
        r["ms"] = times.get(r["name"])
        if r["ms"] is not None and times.get("eager") is not None:
            r["speedup"] = times["eager"] / r["ms"]
    return rows, rep, errors, others.cores


def table(rows):
    cols = [("", "name", "%s"), ("ms/call", "ms", "%.3f"), ("vs eager", "speedup", "%.2fx"),
            ("kernels", "kernels", "%d"), ("ATen calls", "aten", "%d"), ("compile s", "compile_s", "%.1f"),
            ("rel. error", "err", "%.1e")]
    cells = [[c[0] for c in cols]]
    for r in rows:
        cells.append([fmt % r[key] if r.get(key) is not None else "-" for _, key, fmt in cols])
        if r.get("wrong"):
            cells[-1][-1] += " WRONG"
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  " + line[0].ljust(widths[0]) + "".join(c.rjust(w + 3) for c, w in zip(line[1:], widths[1:]))
                     for line in cells)


def verdict(ind, fuse, busy):
    """The header's reading of the fuse row against eager and Inductor, from the numbers measured."""
    if busy:
        return ("no reading: other processes held the CPU while timing, which slows each side by its own factor "
                "(run again on a quiet machine)")
    if fuse.get("wrong"):
        return "fuse's output is WRONG (beyond tolerance): its time does not count"
    if fuse.get("speedup") is None:
        return "fuse could not be timed (see below)"
    if ind.get("ms") is None or ind.get("wrong"):
        return "fuse runs at %.2fx eager's speed; Inductor has no valid time" % fuse["speedup"]
    vs_ind = ind["ms"] / fuse["ms"]
    wins = (fuse["speedup"] > 1, vs_ind > 1)
    say = {(True, True): "fuse beats both eager and Inductor", (False, False): "fuse loses to both eager and Inductor",
           (True, False): "fuse beats eager but loses to Inductor", (False, True): "fuse beats Inductor but not eager"}
    return "%s here: %.2fx eager's speed, %.2fx Inductor's" % (say[wins], fuse["speedup"], vs_ind)


def main():
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(models.ZOO))
    ap.add_argument("--size", choices=["small", "bench"], help="default: bench on a GPU, small on the CPU")
    ap.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--verbose", action="store_true", help="also list fuse's groups and fallbacks")
    a = ap.parse_args()
    size = a.size or ("bench" if a.device == "cuda" else "small")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    entry = models.get(a.model)
    if a.device == "cpu" and size == "bench":
        sys.exit("demo.py: --size bench is sized for a GPU (%s: %s); on a CPU its compiles and timed calls run for "
                 "many minutes. Use --size small (the CPU default) here, or run on a GPU machine."
                 % (a.model, entry.config("bench")))
    if a.device == "cuda" and not gpu:
        sys.exit("demo.py: --device cuda, but torch %s sees no CUDA device" % torch.__version__)

    model, inputs = entry.make(size=size, device=a.device, dtype=dtype, seed=0)
    sync = syncer(a.device)
    patch = torch._dynamo.config.patch(**entry.dynamo_config) if entry.dynamo_config else contextlib.nullcontext()
    with torch.no_grad(), patch:
        ref = model(*inputs)
        tol = tolerance(model, inputs, ref, dtype)
        rows, rep, errors, others = measure(model, inputs, ref, sync, tol)

    if a.verbose:
        print(rep)
        print()
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu, %d threads" % torch.get_num_threads()
    if others is not None:
        where += ", other processes used %.1f of %d CPU cores while timing" % (others, os.cpu_count())
    print("%s (%s size, %s), %s" % (a.model, size, str(dtype)[6:], where))
    print("  %s" % (entry.config(size),))
    # on the CPU, other processes slow eager, Inductor and fuse by different factors (their threads wait)
    print("  " + verdict(rows[1], rows[2], busy=a.device == "cpu" and others is not None and others > 0.25))
    print(table(rows))
    print("  kernels: launches per call (fuse: its C++/CUDA kernels, a horizontal batch once; Inductor: kernels it"
          " generated)\n  ATen calls: fuse's opaque ops (matmuls, SDPA, ...) and fallbacks, besides %d zero-copy"
          " views; Inductor's are not counted\n  rel. error: ||out - eager|| / ||eager||, tolerance %.0e; compile s:"
          " compile + first call (shorter with warm caches)" % (rep.num_views, tol))
    for name, e in errors.items():
        print("  %s failed while timing: %s" % (name, repr(e)[:300]))
    if rep.fallbacks:
        print("  fuse ran %d group(s) as ATen (fallbacks; --verbose lists them)" % len(rep.fallbacks))
    print("  demo wall time %.0f s (imports included)" % (time.perf_counter() - T0))


if __name__ == "__main__":
    main()
