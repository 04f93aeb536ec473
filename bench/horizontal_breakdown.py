"""Where horizontal_100_small's per-call time goes (issue 14: <= 0.10 ms without CUDA graphs).

    python3 bench/horizontal_breakdown.py [--device cuda|cpu] [--reps 300]

Rows, us per call, wall clock synchronised after each timed loop (bench/timing.py's rules; random inputs):
  dynamo_floor   torch.compile with a backend whose compiled graph returns outputs allocated once: Dynamo's
                 guards on the 100 inputs and its frame wrapper, what any backend pays;
  alloc_100      100 torch.empty_strided calls of the outputs' sizes from a Python loop (the program allocates
                 its outputs too, from a tighter loop: on the H200 fuse's whole call took less than this row);
  alloc_100_fast the same through runtime/alloc.py's path (torch's C++ _empty_strided), as the program does;
  fuse           torch.compile(backend="fuse"): the whole call;
  fuse_no_dynamo the callable fuse's backend returned (AOT autograd's wrapper around our program), called
                 directly: the whole call without Dynamo's guards and frame;
  copy_floor     one copy of the same bytes (all inputs read, all outputs written) as one tensor: the
                 memory-bandwidth floor of the call's work, no per-problem cost;
  inductor       torch.compile (default mode), for scale;
  eager          the 100 problems as ATen calls.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fusebackend  # noqa: E402,F401
from workloads import _args_horizontal, horizontal  # noqa: E402


def per_call_us(fn, args, reps, sync):
    for _ in range(5):
        fn(*args)
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        sync()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def floor_backend(gm, example_inputs):
    outs = [torch.empty_like(x) for x in example_inputs]     # allocated once: no work, no allocation per call

    def run(*args):
        return outs
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--cprofile", type=int, default=0, help="also list the N functions with most own time "
                    "in fuse_no_dynamo calls (cProfile: its overhead inflates, the shares are what to read)")
    a = ap.parse_args()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    g = torch.Generator(device=a.device).manual_seed(0)
    xs = _args_horizontal(a.device, g)
    want = horizontal(*xs)
    rows = {}
    torch._dynamo.reset()
    rows["dynamo_floor"] = per_call_us(torch.compile(horizontal, backend=floor_backend), xs, a.reps, sync)
    rows["alloc_100"] = per_call_us(lambda *xs: [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype,
                                                                     device=x.device) for x in xs], xs, a.reps, sync)
    from fusebackend.runtime.alloc import empty_strided_for
    empty = empty_strided_for(xs[0].device)
    rows["alloc_100_fast"] = per_call_us(lambda *xs: [empty(tuple(x.shape), tuple(x.stride()), x.dtype) for x in xs], xs,
                                         a.reps, sync)
    torch._dynamo.reset()
    fused = torch.compile(horizontal, backend="fuse")
    got = fused(*xs)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(got, want)), "fuse differs from eager"
    rows["fuse"] = per_call_us(fused, xs, a.reps, sync)
    torch._dynamo.reset()
    inner = []
    from fusebackend.capture.backend import fuse

    def keep(gm, example_inputs):
        inner.append(fuse(gm, example_inputs))
        return inner[-1]
    torch.compile(horizontal, backend=keep)(*xs)
    if len(inner) == 1:
        direct = inner[0]                       # AOT autograd's forward: the inputs as positional arguments
        rows["fuse_no_dynamo"] = per_call_us(direct, xs, a.reps, sync)
        if a.cprofile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.reps):
                direct(*xs)
            sync()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)
    big = torch.cat([x.reshape(-1) for x in xs])
    dst = torch.empty_like(big)
    rows["copy_floor"] = per_call_us(lambda *xs: dst.copy_(big), xs, a.reps, sync)
    torch._dynamo.reset()
    rows["inductor"] = per_call_us(torch.compile(horizontal), xs, max(20, a.reps // 5), sync)
    rows["eager"] = per_call_us(horizontal, xs, max(20, a.reps // 5), sync)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print("horizontal_100_small per call (us), %s, torch %s" % (name, torch.__version__))
    for k, v in rows.items():
        print("  %-14s %9.1f" % (k, v))


if __name__ == "__main__":
    main()
