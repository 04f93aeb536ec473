"""Per-call cost of a compiled graph: eager vs Inductor vs fuse (generated wrapper) vs fuse interpreted, in us.

    python3 bench/per_call.py [--device cpu|cuda] [--only NAME] [--rounds N] [--threads N] [--smoke]

Three workloads at sizes where the work is small, so the time per call is mostly the per-call path:
  llama_layer   demo.py's model (models.llama_layer, small; float32 on the CPU, bfloat16 on CUDA)
  one_kernel    x * 2 + 1 on 8x8: one fused kernel, pure overhead
  chain20       pointwise ops and reductions over alternating dims on 16x32 (fuse: 20 kernels)
Columns: eager; Inductor (default mode); fuse (the generated per-program function, runtime/wrapper.py); fuse
interpreted (the same compile with FUSEBACKEND_INTERPRET=1: the step loop over a dict). Each time is the
median over repetitions of the mean wall time per call (bench/timing.py: the four are interleaved, one warm-up
each); on CUDA every repetition is closed by torch.cuda.synchronize, so it is the synchronised wall clock,
host overhead included. The whole table is measured --rounds times (default 3; the box is noisy) and each
cell is the minimum over rounds. Outputs are checked against eager before timing (a miss is printed as WRONG,
the row is still timed). --smoke: one round, short repetitions (CPU ~1 min).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusebackend  # noqa: E402,F401
import models  # noqa: E402
from fusebackend.capture.backend import fuse as fuse_backend  # noqa: E402
from timing import rel_err, syncer, wall_ms_interleaved  # noqa: E402


def one_kernel(x):
    return x * 2 + 1


def chain20(x, w):
    for i in range(10):                                 # fuse: 20 kernels, one per reduction
        x = torch.tanh(x * w + i)
        x = x - x.mean(0, keepdim=True)                 # a column reduction, then a row one
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1)
    return x


def workloads(device, dtype):
    """(name, fn, args, tolerance): the model in `dtype`, the synthetic graphs in float32 (their cost per call
    does not depend on it, and twenty normalisations in bfloat16 round too far apart for a fair check)."""
    g = torch.Generator().manual_seed(0)
    entry = models.get("llama_layer")
    model, inputs = entry.make(size="small", device=device, dtype=dtype, seed=0)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    return [("llama_layer", model, inputs, tol),
            ("one_kernel", one_kernel, (torch.randn(8, 8, generator=g).to(device),), 1e-5),
            ("chain20", chain20, (torch.randn(16, 32, generator=g).to(device),
                                  torch.randn(16, 32, generator=g).to(device)), 1e-4)]


def fuse_interpreted(gm, example_inputs, **kwargs):
    """The fuse backend with FUSEBACKEND_INTERPRET=1 while it compiles (a Program reads it when built); a
    backend of its own, so Dynamo keeps its graphs apart from the plain fuse compile's."""
    old = os.environ.get("FUSEBACKEND_INTERPRET")
    os.environ["FUSEBACKEND_INTERPRET"] = "1"
    try:
        return fuse_backend(gm, example_inputs, **kwargs)
    finally:
        if old is None:
            del os.environ["FUSEBACKEND_INTERPRET"]
        else:
            os.environ["FUSEBACKEND_INTERPRET"] = old


def compiled(fn, args, tol):
    """name -> callable, every output checked against eager; and fuse's kernel / ATen counts."""
    ref = fn(*args)
    rep = fusebackend.explain(fn, *args)            # resets Dynamo first
    calls = {"eager": lambda: fn(*args)}
    variants = (("inductor", torch.compile(fn)), ("fuse", torch.compile(fn, backend=fuse_backend)),
                ("fuse interp", torch.compile(fn, backend=fuse_interpreted)))
    wrong = []
    for name, f in variants:
        err = rel_err(f(*args), ref)
        if err > tol:
            wrong.append("%s: relative error %.2e above %.0e" % (name, err, tol))
        calls[name] = (lambda f=f: f(*args))
    return calls, rep, wrong


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; on a loaded box 1 is far steadier)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    rounds, min_total = (1, 0.02) if a.smoke else (a.rounds, 0.1)
    sync = syncer(a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu, %d threads" % torch.get_num_threads()
    print("per-call us (min over %d rounds of the median of 5 interleaved reps), %s, torch %s"
          % (rounds, where, torch.__version__))
    cols = ["eager", "inductor", "fuse", "fuse interp"]
    print("  %-12s %9s %9s %9s %12s   kernels  ATen  views" % ("", *cols))
    with torch.no_grad():
        for name, fn, args, tol in workloads(a.device, dtype):
            if a.only and a.only not in name:
                continue
            calls, rep, wrong = compiled(fn, args, tol)
            best = {}
            for _ in range(rounds):
                times, errors = wall_ms_interleaved(calls, sync=sync, min_total=min_total, max_s=20)
                for k, ms in times.items():
                    best[k] = min(best.get(k, float("inf")), ms * 1e3)
                for k, e in errors.items():
                    print("  %s: %s failed: %r" % (name, k, e))
            cells = ["%9.1f" % best[c] if c in best else "%9s" % "-" for c in cols]
            print("  %-12s %s %s %s %12s   %7d %5d %6d" % (name, *cells[:3], cells[3].strip(), rep.num_kernels,
                                                             rep.num_aten_calls, rep.num_views))
            for w in wrong:
                print("  %s: WRONG, %s" % (name, w))
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
