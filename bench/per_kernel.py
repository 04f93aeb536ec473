"""Time of each fused CPU kernel of a zoo model, launched alone, in us.

    python3 bench/per_kernel.py [--model llama_layer] [--size small] [--dtype float32] [--threads N]

The model is compiled with backend="fuse" and called once (interpreted, FUSEBACKEND_INTERPRET=1, so every
kernel step runs from the program's step list); each kernel step's operands from that call are kept, then
every kernel is launched alone in a loop (its ctypes launch: the kernel plus about a microsecond of Python
and ctypes), interleaved with the others, median over 7 repetitions of the mean per launch. `empty` is the
same call of a kernel that does nothing, for scale. Kernels in a horizontal batch are not listed.
"""
import argparse
import os
import statistics
import sys
import time

os.environ["FUSEBACKEND_INTERPRET"] = "1"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusebackend  # noqa: E402,F401
import models  # noqa: E402
from fusebackend.capture.backend import fuse as fuse_backend  # noqa: E402
from fusebackend.runtime.steps import KernelStep  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_layer")
    ap.add_argument("--size", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--min-s", type=float, default=0.05, help="seconds per kernel per repetition")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model, inputs = models.get(a.model).make(size=a.size, device="cpu", dtype=dtype, seed=0)
    with torch.no_grad():
        rows = collect(model, inputs)
        report(rows, a.min_s)


def collect(model, inputs):
    """Compile, run once with every kernel step's launch watched; [(label, thunk)]."""
    launches = []
    orig_init = KernelStep.__init__

    def init(self, spec, launch, *rest, **kw):
        orig_init(self, spec, launch, *rest, **kw)
        label = "%s %s" % (spec.name, "x".join(str(d) for d in spec.domain))

        def watched(tensors, meta, launch=launch, label=label):
            if not any(l == label for l, _ in launches):
                launches.append((label, direct(launch, list(tensors), meta)))
            return launch(tensors, meta)
        self.launch = watched
    KernelStep.__init__ = init
    try:
        torch._dynamo.reset()
        fusebackend.reset()
        compiled = torch.compile(model, backend=fuse_backend)
        compiled(*inputs)
        compiled(*inputs)        # the first call settles the meta arrays; the second launches packed ones
    finally:
        KernelStep.__init__ = orig_init
    return launches


def direct(launch, tensors, meta):
    """A thunk calling the kernel's C function itself on a pointer array filled once."""
    import ctypes
    from fusebackend.runtime import steps
    if isinstance(meta, list):
        meta = launch.pack(meta)
    how = launch.fast_call(meta, len(tensors))
    fn = how[2] if how[0] == "ctypes" else ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(how[2])
    ptrs = steps._pointer_array(len(tensors))(*[t.data_ptr() for t in tensors])
    keep = (tensors, meta)
    return lambda: fn(ptrs, meta) if keep else None


def report(launches, min_s):
    from fusebackend.runtime import cpu_compiler, steps
    lib = cpu_compiler.build('#include <stdint.h>\nextern "C" void fb_empty(void** P, const int64_t* M) {}\n', "fb_empty")
    fn = lib["fb_empty"]
    fn.restype = None
    ptrs = steps._pointer_array(3)(0, 0, 0)
    meta = (steps.ctypes.c_int64 * 1)(0)
    rows = [("empty", lambda: fn(ptrs, meta))] + launches
    loops = {}
    for label, thunk in rows:           # size each loop to ~min_s
        thunk()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s / 4:
            thunk()
            n += 1
        loops[label] = max(10, int(n * 4))
    reps = {label: [] for label, _ in rows}
    for _ in range(7):
        for label, thunk in rows:
            n = loops[label]
            t0 = time.perf_counter()
            for _ in range(n):
                thunk()
            reps[label].append((time.perf_counter() - t0) / n * 1e6)
    print("per-kernel launch us (median of 7 interleaved reps), cpu, %d threads, torch %s"
          % (torch.get_num_threads(), torch.__version__))
    for label, _ in rows:
        print("  %-40s %9.2f" % (label, statistics.median(reps[label])))


if __name__ == "__main__":
    main()
