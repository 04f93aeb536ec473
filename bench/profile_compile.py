"""Where a cold fuse compile spends its time, per GPU anchor: Dynamo + AOT tracing, our lowering and passes,
emission, NVRTC, loading (issue 3: cold compile at most half of Inductor's).

    python3 bench/profile_compile.py [--only SUBSTR] [--cprofile N]

Each workload compiles once with a fresh FUSEBACKEND_CACHE_DIR (as bench/gpu.py's cold column). Times are
wall clock of the first call, split by wrapping fusebackend's entry points; --cprofile N also prints the N
functions with the most cumulative time of the first workload's first call.
"""
import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from workloads import gpu_workloads  # noqa: E402


class Clock:
    """Accumulated wall time of wrapped functions (outermost call only)."""

    def __init__(self):
        self.t, self.depth = {}, {}

    def wrap(self, mod, attr, label):
        fn = getattr(mod, attr)

        def timed(*a, **k):
            self.depth[label] = self.depth.get(label, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.depth[label] -= 1
                if self.depth[label] == 0:
                    self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
        setattr(mod, attr, timed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--cprofile", type=int, default=0)
    opts = ap.parse_args()
    import fusebackend
    from fusebackend.capture import backend
    from fusebackend.runtime import cuda_compiler
    clock = Clock()
    clock.wrap(backend, "compile_graph", "compile_graph")
    clock.wrap(backend, "_build_kernels", "build_kernels")
    clock.wrap(backend, "fuse_vertical", "passes")
    clock.wrap(backend, "build_program", "build_program")
    clock.wrap(cuda_compiler, "_nvrtc", "nvrtc")
    g = torch.Generator(device="cuda").manual_seed(0)
    print("%-32s %8s %8s %8s %8s %8s %8s %6s" % ("workload", "first", "ours", "passes", "emit+nv", "nvrtc",
                                                "program", "nvrtc#"))
    for i, (name, fn, make_args, _) in enumerate(gpu_workloads("cuda", opts.only)):
        args = make_args("cuda", g)
        os.environ["FUSEBACKEND_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_fuse_")
        torch._dynamo.reset()
        fusebackend.reset()
        clock.t.clear()
        n0 = cuda_compiler.stats["nvrtc"]
        prof = cProfile.Profile() if (opts.cprofile and i == 0) else None
        cfn = torch.compile(fn, backend="fuse")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        with torch.no_grad():
            cfn(*args)
        torch.cuda.synchronize()
        if prof:
            prof.disable()
        first = time.perf_counter() - t0
        t = clock.t
        print("%-32s %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %6d" % (
            name, first, t.get("compile_graph", 0), t.get("passes", 0), t.get("build_kernels", 0),
            t.get("nvrtc", 0), t.get("build_program", 0), cuda_compiler.stats["nvrtc"] - n0))
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(opts.cprofile)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
