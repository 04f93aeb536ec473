"""Property test: random tensor programs compiled with backend="fuse" match eager (issue 6).

Each example is a random DAG of 2-12 ops (pointwise incl. comparisons, logical ops, where, clamp and casts;
sum/mean/amax/amin/any/all/var/std/var_mean over random dims with and without keepdim; softmax, log_softmax,
layer_norm, an RMS norm; views: transpose, permute, slice, select, expand, flatten, squeeze/unsqueeze) over 1-4
inputs with broadcasting, permuted/sliced/offset/expanded layouts, size-0 and size-1 dims, NaN/Inf/-0.0 and
ties in the data, and mixed float32/float16/bfloat16/int32/int64/bool dtypes. See graphgen.py for the
generator and fuzzcheck.py for the comparison rules (those of tests/numerics.py). Every example is compiled
cold-ish (each new kernel costs one g++ run; identical kernel text is built once per session).

Profiles:
  CI (default):       CI_EXAMPLES examples, derandomized (the same cases every run).
                      Measured on the 2-core dev box: 200 examples in 61 s (load ~3) to 140 s (other jobs
                      running, load 4-5), ~450 kernels; tests/fuzz as a whole 71-150 s. CI runs 120
                      since 2026-12-03 (the whole suite took 1141 s of CI's 20-minute budget at 200).
  long (by hand):     FUSEBACKEND_FUZZ_EXAMPLES=10000 python3 -m pytest -q -s tests/fuzz/test_fuzz_graphs.py
  another stream:     FUSEBACKEND_FUZZ_SEED=<int> (otherwise derandomized)
  survey mode:        FUSEBACKEND_FUZZ_LOG=<file>: record every failing case in <file> and go on (no shrinking)
                      instead of stopping at the first failure; the test fails at the end if any was found.
A failing example prints as `Case.from_source(...)` (its source and input recipe), which evaluates back to
the case: paste it into test_regressions.py and call fuzzcheck.run_case on it.
"""
import os
import time
import traceback

from hypothesis import HealthCheck, Phase, given, note, reject, seed, settings

import fuzzcheck
import graphgen

CI_EXAMPLES = 120
CI_SECONDS = 61     # measured, load ~3 (140 with other jobs running)
EXAMPLES = int(os.environ.get("FUSEBACKEND_FUZZ_EXAMPLES", CI_EXAMPLES))
SEED = os.environ.get("FUSEBACKEND_FUZZ_SEED")
LOG = os.environ.get("FUSEBACKEND_FUZZ_LOG")


def _settings():
    phases = [Phase.explicit, Phase.generate] if LOG else [Phase.explicit, Phase.generate, Phase.shrink]
    return settings(max_examples=EXAMPLES, derandomize=SEED is None, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), phases=phases, print_blob=False)


def _property():
    failures, progress = [], [0]
    t0 = time.time()

    @_settings()
    @given(case=graphgen.cases())
    def check(case):
        note(repr(case))
        try:
            fuzzcheck.run_case(case)
        except fuzzcheck.Invalid:
            fuzzcheck.STATS["rejected (eager raises)"] += 1
            reject()
        except Exception as e:
            if not LOG:
                raise
            fuzzcheck.STATS["failures"] += 1
            failures.append(case)
            with open(LOG, "a") as f:
                f.write("=" * 72 + "\n%r\n%s\n" % (case, "".join(traceback.format_exception_only(type(e), e))))
        if LOG and fuzzcheck.NOTES:
            with open(LOG, "a") as f:
                f.write("".join("-" * 72 + "\n" + n + "\n" for n in fuzzcheck.NOTES))
            del fuzzcheck.NOTES[:]
        n = fuzzcheck.STATS["examples"]
        if LOG and n % 50 == 0 and n != progress[0]:
            progress[0] = n
            with open(LOG, "a") as f:
                f.write("progress: %d examples, %d failures, %.0f s\n"
                        % (n, fuzzcheck.STATS["failures"], time.time() - t0))
    if SEED is not None:
        check = seed(int(SEED))(check)
    return check, failures


def test_random_graphs_match_eager():
    fuzzcheck.STATS.clear()
    check, failures = _property()
    t0 = time.time()
    try:
        check()
    finally:
        stats = dict(fuzzcheck.STATS)
        print("\nfuzz: %d examples in %.0f s; %s" % (stats.pop("examples", 0), time.time() - t0,
                                                     ", ".join("%s: %s" % kv for kv in sorted(stats.items()))))
    assert not failures, "%d failing case(s), logged in %s" % (len(failures), LOG)
