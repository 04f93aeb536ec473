"""The graph fuzzer on a device, time-boxed: random tensor programs compiled with backend="fuse" against eager.

    python3 bench/fuzz_gpu.py --seconds 1800 --seed 1                   # on the GPU (device cuda)
    python3 bench/fuzz_gpu.py --device cpu --seconds 30 --seed 1        # smoke check on a CPU machine

The generator and the comparison are tests/fuzz's (graphgen.py, fuzzcheck.py): eager on the device is the
reference, the float64 CPU run the tie-breaker (fuzzdevice.py). Every failing case is appended to --log as
`Case.from_source(...)` (paste it into tests/fuzz/test_regressions.py) and the run goes on. Prints a summary
line and one JSON line; exits 1 if any case failed.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TimeUp(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-examples", type=int, default=1_000_000)
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "fusebackend-fuzz-gpu.log"))
    a = ap.parse_args(argv)
    os.environ["FUSEBACKEND_FUZZ_DEVICE"] = a.device
    os.environ.setdefault("FUSEBACKEND_CACHE_DIR", tempfile.mkdtemp(prefix="fusebackend-fuzz-cache-"))
    sys.path[:0] = [os.path.join(ROOT, "tests", "fuzz"), os.path.join(ROOT, "tests")]
    import torch
    from hypothesis import HealthCheck, Phase, given, seed, settings
    import fuzzcheck
    import graphgen
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("fuzz_gpu: no CUDA device; use --device cpu for a smoke check")
        return 2
    failures, t0 = [], time.time()
    deadline = t0 + a.seconds

    @seed(a.seed)
    @settings(max_examples=a.max_examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate], print_blob=False)
    @given(case=graphgen.cases())
    def check(case):
        if time.time() > deadline:
            raise TimeUp
        try:
            fuzzcheck.run_case(case)
        except fuzzcheck.Invalid:
            fuzzcheck.STATS["rejected (eager raises)"] += 1
        except Exception as e:
            fuzzcheck.STATS["failures"] += 1
            failures.append(case)
            with open(a.log, "a") as f:
                f.write("=" * 72 + "\n# device %s, seed %d\n%r\n%s\n" % (
                    a.device, a.seed, case, "".join(traceback.format_exception_only(type(e), e))))

    with open(a.log, "a") as f:
        f.write("# fuzz_gpu: device %s, seed %d, %.0f s\n" % (a.device, a.seed, a.seconds))
    try:
        check()
    except TimeUp:
        pass
    stats = dict(fuzzcheck.STATS)
    graphs, bad = stats.pop("examples", 0), stats.pop("failures", 0)
    elapsed = time.time() - t0
    print("fuzz_gpu: device %s seed %d: %d graphs, %d mismatches in %.0f s (failing cases in %s)"
          % (a.device, a.seed, graphs, bad, elapsed, a.log))
    print("  " + "\n  ".join("%s: %s" % kv for kv in sorted(stats.items())))
    print(json.dumps({"device": a.device, "seed": a.seed, "graphs": graphs, "mismatches": bad,
                      "seconds": round(elapsed, 1), "stats": stats, "log": a.log}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
