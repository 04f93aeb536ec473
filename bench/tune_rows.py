"""Row-kernel launch knobs on the GPU row anchors, all variants in one run (issue 3 tuning).

    python3 bench/tune_rows.py [--only SUBSTR]

Each variant sets emit/cuda_target, runtime/cuda_launch and runtime/cuda_compiler knobs, recompiles the workloads with
backend="fuse" (new knobs give new kernel text, hence new binaries), checks the result against eager
(relative norm error) and times it; Inductor runs once in the same process for reference. Calls are
timed right after its compile (Dynamo's reset makes an earlier compiled function recompile with the knobs of
the moment); Inductor is timed first and last, to show drift.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from timing import copy_bandwidth, rel_err, syncer, wall_ms  # noqa: E402
from workloads import gpu_workloads  # noqa: E402

DEFAULTS = {"T.REG_ROW_BYTES": 32, "T.ROW_CACHE": "auto", "L.ROW_WAVES": 0,
            "C.BASE_OPTIONS": ("-std=c++17", "--fmad=true")}
VARIANTS = {  # name: knob settings on top of DEFAULTS (T: emit/cuda_target, L: runtime/cuda_launch)
    "default": {},
    "smem": {"T.ROW_CACHE": "smem"},
    "bytes64": {"T.REG_ROW_BYTES": 64},
    "bytes16": {"T.REG_ROW_BYTES": 16},
    "persistent": {"L.ROW_WAVES": 1},
    # what --fmad=false costs (db4f1df built with it after an FMA-contraction NaN in a softmax; fb::mul_rn
    # now keeps a graph's products rounded): a timing, not a candidate default
    "nofmad": {"C.BASE_OPTIONS": ("-std=c++17", "--fmad=false")},
}
ROWS = ("masked_softmax", "add_layernorm_gelu", "rmsnorm")


def _set(mods, knobs):
    for key, value in knobs.items():
        mod, attr = key.split(".")
        setattr(mods[mod], attr, value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    opts = ap.parse_args()
    import fusebackend.emit.cuda_target as T
    import fusebackend.runtime.cuda_compiler as C
    import fusebackend.runtime.cuda_launch as L
    mods = {"T": T, "L": L, "C": C}
    sync = syncer("cuda")
    bw = copy_bandwidth("cuda", 1 << 30)
    g = torch.Generator(device="cuda").manual_seed(0)
    table = []
    for name, fn, make_args, nbytes in gpu_workloads("cuda", opts.only):
        if not any(r in name for r in ROWS):
            continue
        args = make_args("cuda", g)
        with torch.no_grad():
            ref = fn(*args)
        floor = nbytes / bw * 1e3

        def timed(label, cf, err):
            with torch.no_grad():
                ms = wall_ms(lambda: cf(*args), sync, min_total=0.3, reps=7)
            table.append((name, label, ms, floor, err))
        torch._dynamo.reset()
        timed("inductor", torch.compile(fn), 0.0)
        for vname, knobs in VARIANTS.items():
            _set(mods, dict(DEFAULTS, **knobs))
            torch._dynamo.reset()
            cf = torch.compile(fn, backend="fuse")
            with torch.no_grad():
                err = rel_err(cf(*args), ref)
            timed(vname + " (nvrtc %d)" % C.stats["nvrtc"], cf, err)    # the count shows a variant rebuilt
        _set(mods, DEFAULTS)
        torch._dynamo.reset()
        timed("inductor", torch.compile(fn), 0.0)
    print("%-32s %-20s %9s %9s %8s %10s" % ("workload", "variant", "ms", "floor", "%floor", "rel err"))
    for name, k, m, fl, e in table:
        print("%-32s %-20s %9.4f %9.4f %7.1f%% %10.2e" % (name, k, m, fl, 100 * fl / m, e))


if __name__ == "__main__":
    main()
