"""CPU row kernels over long rows (emit/cpu_rows.py): accumulator lanes, next-row prefetch, half-type column
buffers and float accumulation of non-negative sums.

The fuzzer's rows are short (below cpu_rows.LONG_ROW they keep `omp simd reduction`), so these cases pin the
long-row path: every reduction op at sizes with and without a tail (R % LANES), NaN in max/min rows, the
kernels the benchmark runs (masked softmax, RMS norm in bf16 and f16, layer norm), what the source says
(lanes, prefetch only in a middle phase of a 2-D kernel, float vs double accumulators), and the accuracy the
float accumulation promises at its largest row.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import fusebackend
from fusebackend.emit import cpu_rows
from tests.numerics import assert_matches

SIZES = [cpu_rows.LONG_ROW, 200, 4096 + 63]


def _compiled(fn):
    return torch.compile(fn, backend="fuse", options={"fallback": "error"})


def _check(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(fn, _compiled(fn), args)


def _source(fn, *args):
    rep = fusebackend.explain(fn, *args)
    assert not rep.fallbacks and rep.sources, str(rep)
    return "\n".join(rep.sources)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _with_nans(x):
    x = x.clone()
    x[1, 5] = float("nan")
    x[2, -1] = float("nan")          # in the tail where there is one
    return x


@pytest.mark.parametrize("r", SIZES)
def test_float_reductions_match_eager(r):
    x = _randn(7, r)
    _check(lambda t: (t.sum(-1), t.mean(-1, keepdim=True), t.amax(-1), t.amin(-1)), x)
    _check(lambda t: (t.amax(-1), t.amin(-1, keepdim=True), (t * t).sum(-1)), _with_nans(x))
    _check(lambda t: torch.prod(1.0 + t * 1e-3, -1), x)
    _check(lambda t: (t.exp().sum(-1), t.abs().mean(-1), t.pow(2).mean(-1)), x)


@pytest.mark.parametrize("r", SIZES)
def test_integer_and_bool_reductions_match_eager(r):
    x = _randn(5, r)
    i = (x * 100).to(torch.int64)
    _check(lambda t: (t.sum(-1), t.amax(-1), t.amin(-1)), i)
    _check(lambda t: ((t > 2.5).any(-1), (t > -4.0).all(-1), (t > 0).sum(-1)), x)


@pytest.mark.parametrize("r", SIZES)
def test_row_kernels_match_eager(r):
    x, m = _randn(9, r), _randn(9, r, seed=1)
    _check(lambda a, b: torch.softmax(a * 0.125 + b, -1), x, m)
    _check(lambda a: torch.log_softmax(a, -1), x)
    w, b = _randn(r, seed=2), _randn(r, seed=3)
    _check(lambda a, c, d: F.gelu(F.layer_norm(a + c, (r,), w, b)), x, m, x)
    _check(lambda a: torch.var_mean(a, -1), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", SIZES)
def test_half_rms_norm_reads_its_weight_from_a_column_buffer(dtype, r):
    def rmsnorm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
    x, w = _randn(33, r, dtype=dtype), _randn(r, dtype=dtype, seed=1)
    _check(rmsnorm, x, w)
    src = _source(rmsnorm, x, w)
    assert re.search(r"float\* w0 = ", src) and "= w0[r];" in src, src


def test_long_rows_reduce_into_lanes_short_rows_keep_omp_reductions():
    f = lambda t: torch.softmax(t, -1)
    long_src = _source(f, _randn(4, cpu_rows.LONG_ROW))
    assert "a0v[%d]" % cpu_rows.LANES in long_src and "reduction(" not in long_src, long_src
    short_src = _source(f, _randn(4, cpu_rows.LONG_ROW - 1))
    assert "a0v[" not in short_src and "reduction(fbmax:a0)" in short_src, short_src


def test_only_a_middle_phase_of_a_2d_kernel_prefetches():
    x = _randn(8, 1024)
    softmax = _source(lambda t: torch.softmax(t, -1), x)        # max, sum (prefetches), output
    sum_phase = softmax[softmax.index("a1v[l] = a1;"):]
    assert "__builtin_prefetch(pf0" in sum_phase, softmax
    assert "__builtin_prefetch" not in softmax[:softmax.index("a1v[l] = a1;")], softmax
    rms = _source(lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), x)   # two phases
    assert "__builtin_prefetch" not in rms, rms
    rank3 = _source(lambda t: torch.softmax(t, -1), x.view(2, 4, 1024))
    assert "__builtin_prefetch" not in rank3, rank3
    _check(lambda t: torch.softmax(t, -1), x.view(2, 4, 1024))


def test_float_accumulation_only_for_non_negative_terms_of_rows_it_bounds():
    x = _randn(4, 1024)
    sm = _source(lambda t: torch.softmax(t, -1), x)
    assert re.search(r"float a1 = fb::SumR", sm), sm                # sum of exps
    ln = _source(lambda t: F.layer_norm(t, (1024,)), x)
    assert re.search(r"double a0 = fb::SumR", ln), ln               # the mean it subtracts
    assert re.search(r"float a1 = fb::SumR", ln), ln                # the mean of squares
    assert re.search(r"double a0 = fb::SumR", _source(lambda t: t.sum(-1), x))
    long_row = _randn(2, cpu_rows.FLOAT_SUM_ROW + 1)
    assert re.search(r"double a0 = fb::SumR", _source(lambda t: t.pow(2).sum(-1), long_row))


def test_float_lanes_at_the_largest_row_stay_within_float32_tolerance():
    """Grid values make every addition round the same way (the case that made a 70k-element variance drift
    in float lanes): at FLOAT_SUM_ROW the sum of squares and the softmax stay within eager's tolerance."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.1, 0.3, 3.0])
    x = grid[torch.randint(0, 10, (6, cpu_rows.FLOAT_SUM_ROW), generator=g)]
    _check(lambda t: (t * t).sum(-1), x)
    _check(lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), x)
    _check(lambda t: torch.softmax(t, -1), x)
    got = _compiled(lambda t: (t * t).sum(-1))(x).double()
    exact = (x.double() * x.double()).sum(-1)
    assert ((got - exact).abs() / exact).max().item() < 8e-6


def test_constant_long_rows_layer_norm_to_zero():
    x = torch.full((5, 1000), 0.1)
    out = _compiled(lambda t: F.layer_norm(t, (1000,)))(x)
    assert torch.equal(out, torch.zeros_like(out))


def test_rows_split_across_threads_with_a_tail_row():
    # 2 threads, an odd number of rows: each part's last row prefetches itself, not past the part
    x, m = _randn(37, 3000), _randn(37, 3000, seed=1)
    _check(lambda a, b: torch.softmax(a * 0.125 + b, -1), x, m)
    _check(lambda a, b: torch.softmax(a * 0.125 + b, -1), x[1:], m[1:])
