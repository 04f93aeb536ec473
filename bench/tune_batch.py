"""Horizontal-batch and pointwise launch knobs on the H200, all variants in one run (issues 14 and 15).

    python3 bench/tune_batch.py [--n 200] [--max-s 20]

* AdamW over n tensors of the five anchor shapes (bench/optimizer.py's): runtime/cuda_batch.BATCH_CHUNKS
  (grid-stride steps per thread of a batch block) 1, 2, 4, 8. Each variant recompiles the step (Dynamo reset,
  new plan), checks parameters and state against eager after 3 steps, and reports the step's GPU busy time
  from the profiler (the target is GPU time: the wall clock of a step is host-bound) and its wall clock.
* pointwise_chain_f32_64M: emit/cuda_target.PW_VEC_BYTES 16 / 32 and runtime/cuda_launch.PW_WAVES 0 / 4 / 8
  (wall clock: at 64M elements the call is GPU-bound), against Inductor timed first and last.
The table prints last; the whole run stops adding variants after --max-s seconds.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from optimizer import OPTIMIZERS, compiled, make_params, profile_step, rel_err as state_err, state_tensors  # noqa: E402
from timing import copy_bandwidth, rel_err, syncer, wall_ms  # noqa: E402
from workloads import gpu_workloads  # noqa: E402

BATCH_VARIANTS = (1, 2, 4, 8)
PW_VARIANTS = ((16, 0), (32, 0), (16, 4), (16, 8), (32, 8))


def adamw_rows(n, sync, deadline, table):
    import fusebackend.runtime.cuda_batch as B
    ctor, _ = OPTIMIZERS["adamw"]
    ref_ps = make_params(n, "cuda")
    ref = ctor(ref_ps, foreach=True)
    for _ in range(3):
        ref.step()
    want = state_tensors(ref, ref_ps)
    for chunks in BATCH_VARIANTS:
        if time.perf_counter() > deadline:
            table.append(("adamw_%d" % n, "chunks=%d" % chunks, None, None, "skipped: time box"))
            continue
        B.BATCH_CHUNKS = chunks
        ps = make_params(n, "cuda")
        opt = ctor(ps, foreach=True)
        step = compiled(opt, "fuse")
        for _ in range(3):
            step()
        sync()
        err = state_err(state_tensors(opt, ps), want)
        gpu = min(profile_step(step, "cuda", sync)[2] for _ in range(3)) / 1e3
        wall = wall_ms(step, sync, min_total=0.3, reps=5)
        table.append(("adamw_%d" % n, "chunks=%d" % chunks, gpu, wall, "%.1e" % err))
    B.BATCH_CHUNKS = 1


def pointwise_rows(sync, deadline, table):
    import fusebackend.emit.cuda_target as T
    import fusebackend.runtime.cuda_launch as L
    bw = copy_bandwidth("cuda", 1 << 30)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, fn, make_args, nbytes in gpu_workloads("cuda", "pointwise_chain_f32_64M"):
        args = make_args("cuda", g)
        ref = fn(*args)
        floor = nbytes / bw * 1e3
        table.append((name, "floor", None, floor, "%.0f GB/s copy" % (bw / 1e9)))
        torch._dynamo.reset()
        ind = torch.compile(fn)
        ind(*args)
        table.append((name, "inductor", None, wall_ms(lambda: ind(*args), sync, min_total=0.3, reps=7), ""))
        for vec, waves in PW_VARIANTS:
            if time.perf_counter() > deadline:
                table.append((name, "vec%d_waves%d" % (vec, waves), None, None, "skipped: time box"))
                continue
            T.PW_VEC_BYTES, L.PW_WAVES = vec, waves
            torch._dynamo.reset()
            cf = torch.compile(fn, backend="fuse")
            err = rel_err(cf(*args), ref)
            ms = wall_ms(lambda: cf(*args), sync, min_total=0.3, reps=7)
            table.append((name, "vec%d_waves%d" % (vec, waves), None, ms, "%.1e" % err))
        T.PW_VEC_BYTES, L.PW_WAVES = 16, 0
        torch._dynamo.reset()
        ind = torch.compile(fn)
        ind(*args)
        table.append((name, "inductor", None, wall_ms(lambda: ind(*args), sync, min_total=0.3, reps=7), "again"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-s", type=float, default=120.0)
    a = ap.parse_args()
    sync = syncer("cuda")
    deadline = time.perf_counter() + a.max_s
    table = []
    for part in (lambda: adamw_rows(a.n, sync, deadline, table), lambda: pointwise_rows(sync, deadline, table)):
        try:
            part()
        except Exception as e:      # noqa: BLE001 -- one failing part is a row, not the end of the table
            table.append(("error", "", None, None, repr(e)[:160]))
    print("%s, torch %s" % (torch.cuda.get_device_name(), torch.__version__))
    print("%-26s %-14s %9s %9s  %s" % ("workload", "variant", "GPU ms", "wall ms", "note"))
    for w, v, gpu, wall, note in table:
        f = lambda x: "%9.4f" % x if x is not None else "%9s" % "-"
        print("%-26s %-14s %s %s  %s" % (w, v, f(gpu), f(wall), note))


if __name__ == "__main__":
    main()
