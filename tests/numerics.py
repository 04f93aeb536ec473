"""Comparing compiled results with eager: float32 tightly, half types within eager's own error."""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def _to64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    return v


def eager_error(fn, args) -> float:
    """max |eager - float64 reference| / max|reference| for half-type outputs (how exact eager itself is)."""
    ref = fn(*[_to64(a) for a in args])
    out = fn(*args)
    outs, refs = (out, ref) if isinstance(out, (list, tuple)) else ((out,), (ref,))
    err = 0.0
    for o, r in zip(outs, refs):
        scale = r.abs().max().item() or 1.0
        err = max(err, (o.double() - r.double()).abs().max().item() / scale)
    return err


def assert_half_close(fn, args, out, eager_out, factor):
    """The compiled half-type result is at most `factor` times further from float64 than eager is."""
    ref = fn(*[_to64(a) for a in args])
    refs = ref if isinstance(ref, (list, tuple)) else (ref,)
    r64 = next(r for r in refs if r.shape == out.shape)
    nan = r64.isnan()
    assert torch.equal(out.isnan(), eager_out.isnan()), "NaN positions differ from eager"
    fin = r64.isfinite() & eager_out.isfinite()
    assert torch.equal(out[~fin & ~nan], eager_out[~fin & ~nan]), "infinities differ from eager"
    out, eager_out, r64 = out[fin], eager_out[fin], r64[fin]
    if r64.numel() == 0:
        return
    scale = r64.abs().max().item() or 1.0
    mine = (out.double() - r64).abs().max().item() / scale
    eager = (eager_out.double() - r64).abs().max().item() / scale
    tol = factor * max(eager, torch.finfo(out.dtype).eps)
    assert mine <= tol, "half-type error %.3g exceeds %.1f x eager's %.3g" % (mine, factor, eager)


def assert_matches(fn, compiled, args, *, half_factor=4.0, atol=1e-6):
    """Compare compiled(*args) with fn(*args): f32 rtol 1e-5 / atol 1e-6 x max(1, max|out|); half types by eager's own error."""
    out, ref = compiled(*args), fn(*args)
    outs, refs = (out, ref) if isinstance(out, (list, tuple)) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype, r.dtype)
        if r.dtype in HALF:
            assert_half_close(fn, args, o, r, half_factor)
        elif r.dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12, equal_nan=True)
        elif r.is_floating_point():
            # A sum that cancels is exact only to round-off of its terms, so the absolute floor scales with
            # the output's magnitude (1e-6 of its largest finite value), never below atol.
            finite = r[r.isfinite()]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            torch.testing.assert_close(o, r, rtol=1e-5, atol=atol * scale, equal_nan=True)
        else:
            assert torch.equal(o, r)
