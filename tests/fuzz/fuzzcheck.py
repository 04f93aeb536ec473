"""Run one generated case with backend="fuse" and compare it with eager.

The comparison rules are those of tests/numerics.py: float32 within rtol 1e-5 / atol 1e-6 (NaN equal to NaN,
infinities exact), float64 within 1e-10, integers and bools exact, and half-type results within a small multiple
of eager's own error against a float64 reference. Two things the fuzzer needs on top: the half-type rule is made
NaN/Inf-aware (an element may be non-finite only where eager or the float64 reference is non-finite the same
way), and it also applies to float32 outputs that were computed through half-type arithmetic (a fused kernel
keeps float intermediates where eager rounds to half after every op; see fuzzcase.Val.half_path).
A float32 output that went through a floating-point sum (sum, mean, var, softmax, norms: the kernel adds in
another order than ATen) and misses rtol 1e-5 gets a second chance by the same rule with float32's eps: a sum
that cancels (1e6 - 1e6 + 121) is only as exact as its terms allow, in eager as in any kernel.
"""
from __future__ import annotations

import collections
import warnings

import torch

from fuzzdevice import DEVICE, to_cpu, to_device

HALF = (torch.float16, torch.bfloat16)
HALF_FACTOR = 4.0
STATS = collections.Counter()       # examples, kernels, fallbacks by reason: printed by the tests
NOTES = []                          # cases worth a look that are not failures (a kernel that fell back)


class Invalid(Exception):
    """Eager itself rejects the case (e.g. amax over an empty dim): not a backend test."""


def _classes(t):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, per element."""
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == float("inf")] = 2
    c[t == float("-inf")] = 3
    return c


def half_rule(out, eager, ref, eps, what=""):
    """`out` at most HALF_FACTOR x further from the float64 reference than eager is (relative to max|ref|)."""
    o, e, r = out.double(), eager.double(), ref.double()
    co, ce, cr = _classes(o), _classes(e), _classes(r)
    bad = (co != ce) & (co != cr)
    assert not bad.any(), "%s: non-finite mismatch at %d element(s), e.g. index %s: got %s, eager %s, ref %s" % (
        what, int(bad.sum()), tuple(int(i) for i in bad.nonzero()[0]), o[bad][0].item(), e[bad][0].item(),
        r[bad][0].item())
    fin_r = cr == 0
    scale = r[fin_r].abs().max().item() if fin_r.any() else 1.0
    scale = scale or 1.0
    m = (co == 0) & fin_r
    me = (ce == 0) & fin_r
    mine = ((o - r).abs()[m].max().item() if m.any() else 0.0) / scale
    theirs = ((e - r).abs()[me].max().item() if me.any() else 0.0) / scale
    tol = HALF_FACTOR * max(theirs, eps)
    assert mine <= tol, "%s: half-type error %.3g exceeds %.1f x eager's %.3g (eps %.3g)" % (
        what, mine, HALF_FACTOR, theirs, eps)


def _to64(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def compare(case, fn, args, got, expected, tie_break=False):
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected), (len(got), len(expected))
    ref = None

    def reference(name):
        nonlocal ref
        if ref is None:
            f64, inputs = case.function(reference=True), [_to64(a) for a in args]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ref = f64(*inputs)
                except (NotImplementedError, RuntimeError):
                    if DEVICE.type == "cpu":        # eager on the CPU ran this program: so must float64
                        raise
                    # an op the CPU lacks for a dtype the device has (abs of bool): float64 on the device
                    ref = to_cpu(f64(*[to_device(a) for a in inputs]))
            ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        return ref[case.outputs.index(name)]
    has_bf16 = any(s.dtype == torch.bfloat16 for s in case.inputs) or "bfloat16" in case.source
    for name, o, r in zip(case.outputs, got, expected):
        what = "output %s" % name
        assert o.shape == r.shape and o.dtype == r.dtype, "%s: %s %s vs eager %s %s" % (
            what, tuple(o.shape), o.dtype, tuple(r.shape), r.dtype)
        if not r.is_floating_point():
            if not torch.equal(o, r):
                bad = (o != r).nonzero()
                idx = tuple(int(i) for i in bad[0])
                raise AssertionError("%s: %d element(s) differ, e.g. at %s: got %s, eager %s" % (
                    what, len(bad), idx, o[idx].item(), r[idx].item()))
            continue
        if case.half_path.get(name) or r.dtype in HALF:
            r64 = reference(name)
            eps_dt = r.dtype if r.dtype in HALF else (torch.bfloat16 if has_bf16 else torch.float16)
            half_rule(o, r, r64, torch.finfo(eps_dt).eps, what)
        elif r.dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12, equal_nan=True, msg=lambda m: what + ": " + m)
        else:
            try:
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=lambda m: what + ": " + m)
            except AssertionError:
                if not case.reassoc.get(name) and not tie_break:
                    raise
                # a float32 sum (any device), or any float32 value on a GPU (eager's CUDA math library and the
                # kernel's differ by an ulp; NVRTC contracts a * b + c into an fma where eager rounds twice): the float64 CPU run decides, by the half-type rule at float32's eps
                STATS["float32 sums checked against float64" if case.reassoc.get(name)
                      else "%s float32 tie-breaks against float64" % DEVICE.type] += 1
                half_rule(o, r, reference(name), torch.finfo(torch.float32).eps, what + " (float64 tie-break)")


def run_case(case, *, calls=2):
    """Compile the case with backend="fuse", call it `calls` times on fresh data, compare each with eager.
    On FUSEBACKEND_FUZZ_DEVICE (fuzzdevice.py): eager on that device is the reference, float64 on the CPU
    the tie-breaker."""
    from fusebackend.capture import records as report_mod
    fn = case.function()
    host = case.make_inputs()
    args = [to_device(a) for a in host]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = fn(*args)
    except Exception as e:              # eager rejects it (reduction over an empty dim, ...)
        raise Invalid("%s: %s" % (type(e).__name__, e))
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fuse")
    with warnings.catch_warnings(record=True) as caught, report_mod.collect() as reps:
        warnings.simplefilter("always")
        got = compiled(*args)
    STATS["examples"] += 1
    for rep in reps:
        STATS["kernels"] += rep.num_kernels
        STATS["horizontal batches"] += sum(1 for st in getattr(rep.program, "steps", ()) if st.kind == "batch")
        for _, reason in rep.fallbacks:
            STATS["fallback: " + reason.splitlines()[0][:70]] += 1
    compile_errors = [reason for rep in reps for _, reason in rep.fallbacks if reason.startswith("compile")]
    assert not compile_errors, "generated %s did not compile:\n" % ("C++" if DEVICE.type == "cpu" else "CUDA") \
        + compile_errors[0]
    layout = [str(w.message) for w in caught if "layout" in str(w.message)]
    if layout:
        STATS["layout fallbacks"] += 1
        NOTES.append("layout fallback: %s\n%r" % (layout[0], case))
    tie = DEVICE.type != "cpu"
    compare(case, fn, host, to_cpu(got), to_cpu(expected), tie)
    for k in range(1, calls):          # same layout, fresh values: the kernels' cached meta path
        host = case.make_inputs(case.seed + 1000 * k)
        args = [to_device(a) for a in host]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = fn(*args)
            got = compiled(*args)
        compare(case, fn, host, to_cpu(got), to_cpu(expected), tie)
