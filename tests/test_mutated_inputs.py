"""In-place updates of graph inputs (running stats, caches, optimizer state) come back exactly as eager's,
in every float dtype, on the CPU and on CUDA; and an ATen output whose real dtype contradicts its fake
metadata is caught before a kernel reads it.

The bug this guards (issue "Reliability II"): bf16 running stats of a training-mode batch norm came back near
1e31 on the CPU -- the fake kernel promised float32 stats, the real op returned bfloat16, a fused cast read
them as float32.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from numerics import assert_matches

aten = torch.ops.aten
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))


def _bn_inputs(dtype, device, c=8):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, c, 5, 5, generator=g)
    stats = (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)
    affine = (torch.randn(c, generator=g), torch.randn(c, generator=g))
    return [t.to(device=device, dtype=dtype) for t in (x, *stats, *affine)]


def _functional_bn(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3) * 2 + 1


def _native_bn(x, rm, rv, w, b):
    out, mean, invstd = aten.native_batch_norm(x, w, b, rm, rv, True, 0.3, 1e-5)
    return out.relu(), mean, invstd


def _legit_bn(x, rm, rv, w, b):
    out, mean, rstd = aten._native_batch_norm_legit(x, w, b, rm, rv, True, 0.3, 1e-5)
    return out - 1, mean, rstd


def _bn_with_update(x, rm, rv, w, b):
    out, mean, rstd, _ = aten._batch_norm_with_update(x, w, b, rm, rv, 0.3, 1e-5)
    return out * out, mean, rstd


def _instance_norm(x, rm, rv, w, b):
    return F.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.3).sigmoid()


BN_FAMILIES = [_functional_bn, _native_bn, _legit_bn, _bn_with_update, _instance_norm]


def _kv_cache_update(cache, pos, new):
    cache[:, pos] = new * 2
    return cache.sum(dim=1)


def _optimizer_state(m, v, g):
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.99).addcmul_(g, g, value=0.01)
    return m / (v.sqrt() + 1e-3)


def _run_both(fn, make_args):
    """eager and compiled on separate copies of the same inputs; returns (eager args, outs), (compiled ...)."""
    eager_args, fused_args = make_args(), make_args()
    with torch.no_grad():
        ref = fn(*eager_args)
        out = torch.compile(fn, backend="fuse")(*fused_args)
    return (eager_args, ref), (fused_args, out)


def _assert_same_mutations(eager_args, fused_args):
    for i, (e, f) in enumerate(zip(eager_args, fused_args)):
        assert f.dtype == e.dtype and f.shape == e.shape and f.stride() == e.stride(), "input %d layout" % i
        # the stats are an elementwise blend of the old value and a batch statistic: eager's own rounding
        # is one half-type step; the compiled update may differ from it by one such step at most
        tol = 0 if e.dtype == torch.float32 else torch.finfo(e.dtype).eps * 2
        scale = max(1.0, e.float().abs().max().item())
        err = (f.float() - e.float()).abs().max().item()
        assert err <= max(1e-5, tol) * scale, "mutated input %d differs from eager by %g" % (i, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fn", BN_FAMILIES, ids=lambda f: f.__name__.strip("_"))
def test_norm_running_stats_written_back_as_eager(fn, dtype, device):
    (ea, ref), (fa, out) = _run_both(fn, lambda: _bn_inputs(dtype, device))
    _assert_same_mutations(ea, fa)
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o.float(), r.float(), rtol=0 if dtype == torch.float32 else 2e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cache_and_optimizer_state_mutations(dtype, device):
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 16, 8, generator=g), torch.randn(2, 8, generator=g)]
    (ea, _), (fa, _) = _run_both(lambda c, n: _kv_cache_update(c, 5, n),
                                 lambda: [t.to(device=device, dtype=dtype) for t in base])
    _assert_same_mutations(ea, fa)
    state = [torch.randn(64, generator=g), torch.rand(64, generator=g), torch.randn(64, generator=g)]
    (ea, ref), (fa, out) = _run_both(_optimizer_state, lambda: [t.to(device=device, dtype=dtype) for t in state])
    _assert_same_mutations(ea, fa)


def test_real_dtype_that_contradicts_the_fake_one_is_converted_before_a_kernel_reads_it(monkeypatch):
    """Without the lowering's real-dtype rule, the runtime check alone still gives eager's stats."""
    from fusebackend.graph import meta_rules
    monkeypatch.setattr(meta_rules, "_OUTPUT_DTYPE_OF_ARG", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ea, ref), (fa, out) = _run_both(_functional_bn, lambda: _bn_inputs(torch.bfloat16, "cpu"))
    _assert_same_mutations(ea, fa)
    notes = [str(w.message) for w in caught if "fake kernel promised" in str(w.message)]
    assert len(notes) == 1 and "_native_batch_norm_legit_functional" in notes[0], notes


def test_real_sizes_that_contradict_the_fake_ones_run_the_rest_as_aten():
    """A value a kernel cannot read (other sizes than promised): the rest of the call runs as ATen ops."""
    from fusebackend.capture import records as report_mod
    from fusebackend.runtime.meta_check import CheckedAtenStep

    def f(x, w):
        return torch.mm(x, w).relu() * 3

    x, w = torch.randn(8, 16), torch.randn(16, 4)
    compiled = torch.compile(f, backend="fuse")
    with report_mod.collect() as reps:
        compiled(x, w)
    program = reps[0].program
    checked = [s for s in program.steps if isinstance(s, CheckedAtenStep)]
    assert checked, "the mm's output is read by a kernel, so it is checked"
    item, meta, _ = checked[0].checked[0]
    checked[0].checked[0] = (item, meta, (99, 99))         # pretend the fake kernel promised other sizes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x, w)
    torch.testing.assert_close(out, f(x, w))
    assert any("metadata:" in str(c.message) for c in caught)
    assert_matches(f, compiled, (torch.randn(8, 16), torch.randn(16, 4)))
