"""Regression tests for the bugs the graph fuzzer found (tests/fuzz/test_fuzz_graphs.py): each is the shrunk
case, written as a plain function, compared with eager by the fuzzer's own rules."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fuzzcheck
from graphgen import Case, InputSpec


def _exact(fn, *args):
    """Bit-exact comparison, signed zeros included (1/x turns -0.0 vs 0.0 into -inf vs inf)."""
    got = torch.compile(fn, backend="fuse")(*args)
    ref = fn(*args)
    got, ref = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert torch.equal(g, r) or torch.allclose(g.double(), r.double(), rtol=1e-6, atol=0, equal_nan=True), \
            (g, r)
        if g.is_floating_point():
            assert torch.equal(torch.signbit(g), torch.signbit(r)), (g, r)


# 1. A one-dimensional domain took the linear index for every contiguous operand, so a broadcast operand
#    (a 0-dim or 1-element tensor) was read past its end and a slice view's remapped index was ignored.
@pytest.mark.parametrize("name", ["0-dim int divisor", "1-element factor", "slice view", "select of 2-d"])
def test_rank1_domain_broadcast_and_views(name):
    fn, args = {
        "0-dim int divisor": (lambda x, s: torch.pow(x / s, 3), (torch.randn(16), torch.tensor(3))),
        "1-element factor": (lambda x, s: x * s + 1, (torch.randn(33), torch.randn(1))),
        "slice view": (lambda x: x[1::2] * 2 + 1, (torch.randn(9),)),
        "select of 2-d": (lambda x: torch.exp(x[2]) * 0.5, (torch.randn(5, 7),)),
    }[name]
    _exact(fn, *args)


# 2. abs(-0.0) was -0.0 (seen through rsqrt as -inf instead of inf). (The fuzzer also showed that a tie between
#    -0.0 and 0.0 in maximum/minimum has no one eager answer: ATen's vectorized loop returns the second operand,
#    its scalar loop -- small tensors, loop tails -- the first. The kernels follow the vectorized loop.)
def test_signed_zero_abs():
    z = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.5, 2.0] * 4)
    _exact(lambda a: (torch.rsqrt(torch.abs(a)), 1 / torch.abs(a)), z)


def test_signed_zero_min_max_ties_follow_the_vectorized_loop():
    z = torch.tensor([-0.0, 0.0] * 32)
    o = torch.tensor([0.0, -0.0] * 32)
    _exact(lambda a, b: (1 / torch.maximum(a, b), 1 / torch.minimum(a, b), 1 / torch.fmax(a, b),
                         1 / torch.fmin(a, b)), z, o)


# 3. A half tensor compared with a Python float: eager rounds the scalar to the tensor's type first
#    (h == 0.1 is True for h = half(0.1)); the kernel compared with the float 0.1.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_compare_with_unrepresentable_scalar(dtype):
    h = torch.tensor([0.1, 0.2, 0.3, 1.0 / 3.0, -0.1], dtype=dtype)
    _exact(lambda x: (x < 0.1, x == 0.1, x >= 0.3, x != 1.0 / 3.0, torch.where(x > -0.1, x * 2, x)), h)


def test_fuzz_case_int_scalar_tensor_and_bf16_cast():
    """The first fuzzer failure, as it was shrunk (a 0-dim int64 argument in a 1-d pointwise group)."""
    case = Case(
        inputs=[InputSpec((16,), torch.float32, "contig", (), "grid", 1.0, False),
                InputSpec((16,), torch.float32, "contig", (), "wide", 1.0, False),
                InputSpec((), torch.int64, "contig", (), "randn", 1.0, False),
                InputSpec((16,), torch.float32, "expanded", (0,), "wide", 1.0, True)],
        lines=["v1 = a0 / a2", "v2 = torch.pow(v1, 3)", "v3 = v1 - a1", "v4 = 0 - a2",
               "v5 = torch.minimum(a1, v1)", "v6 = v5.to(torch.bfloat16)"],
        outputs=["v2", "v3", "v4", "v6"], half_path={"v6": True}, seed=546)
    fuzzcheck.run_case(case)


# 4. A row kernel decided "computed once per row" from a value's shape alone: an input of shape [1, n] read
#    through a transpose ([n, 1], reduced over dim 0) has a per-row shape, so its load was hoisted out of the
#    loop over the reduced index (and the kernel did not compile: the index variable did not exist there).
def test_row_kernel_reads_a_transposed_input_inside_the_row_loop():
    def f(x):
        t = x.transpose(0, 1)                   # [1030, 1]
        ls = torch.log_softmax(t, -2)
        return torch.amin(torch.clamp_min(ls, -0.5), (0, 1)), ls
    x = torch.randn(1, 1030) * 3
    got, ref = torch.compile(f, backend="fuse")(x), f(x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# 5. g++ fused a*b+c into one FMA (-ffp-contract=fast is its default), rounding once where eager rounds twice:
#    x*x - c was 2^-24 instead of 0, and a comparison downstream flipped. Kernels now build with
#    -ffp-contract=off (as Inductor does); the math templates keep their FMAs explicitly.
def test_multiply_add_rounds_like_eager():
    x = torch.full((64,), 1 + 2 ** -12)
    c = torch.full((64,), 1 + 2 ** -11)
    _exact(lambda x, c: (x * x - c, (x * x - c) > 0, torch.sign(x * 3.0 + c)), x, c)


# 6. A float32 mean added in float: the mean of a constant row was not exactly the constant, so x - mean was
#    rounding noise and a layer norm of a constant row gave ~1e-4 instead of eager's exact 0.
def test_layer_norm_of_constant_rows_is_zero():
    x = (torch.randn(6, 1) * 3).expand(6, 300)
    got = torch.compile(lambda x: F.layer_norm(x, (300,)), backend="fuse")(x)
    assert torch.equal(got, torch.zeros(6, 300)), got.abs().max()


# 7. clamp with a NaN bound (a tensor bound holding NaN, or a NaN scalar) gives NaN in eager; the Clamp
#    template only propagated NaN from x.
def test_clamp_with_nan_bounds():
    x = torch.tensor([1.0, -1.0, float("nan"), 3.0, 0.25])
    lo = torch.tensor([float("nan"), 0.0, 0.0, 2.0, -1.0])
    hi = torch.tensor([2.0, float("nan"), 1.0, 0.0, 0.5])
    _exact(lambda x, lo, hi: (torch.clamp(x, min=lo), torch.clamp(x, max=hi), torch.clamp(x, lo, hi),
                              torch.clamp(x, min=float("nan")), torch.trunc(torch.clamp(x, min=lo))), x, lo, hi)


# 8. A row kernel cached every value read in two phases, also one that only broadcasts into the row domain
#    (a [3] input in a [33, 3] RMS-norm group read again by the epilogue): it was stored and reloaded at the
#    full row index, and the emitter crashed (IndexError) -- the group fell back to ATen.
def test_row_group_reading_a_broadcast_input_in_two_phases():
    def f(x, w):
        v = x * w
        r = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))
        return torch.add(w, r, alpha=2)
    import fusebackend
    args = (torch.randn(33, 3), torch.randn(3))
    rep = fusebackend.explain(f, *args)
    assert not rep.fallbacks and rep.num_kernels == 1, str(rep)
    got, ref = torch.compile(f, backend="fuse")(*args), f(*args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# 9. A float32 sum over one long row (the variance of a 70k-element layer-norm output, grid-valued so every
#    addition rounds the same way) drifted by 1e-4 relative in float lanes; eager's variance adds in double.
def test_long_float32_sum_is_as_exact_as_eager():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.1, 0.3, 3.0])[torch.randint(0, 10, (7, 1, 33, 300),
                                                                                          generator=g)]
    f = lambda x: torch.var(F.layer_norm(x, (33, 300), eps=1e-3), (0, 1, 2, 3), correction=0)
    got, ref, exact = torch.compile(f, backend="fuse")(x), f(x), f(x.double())
    assert abs(got.double() - exact) <= 4 * max(abs(ref.double() - exact), 1.2e-7 * abs(exact)), (got, ref, exact)


# 10. cosh/sinh called the C library, which stays finite up to |x| = 89.4; ATen's vectorized CPU loop (Sleef)
#     overflows where exp(|x|) does (88.72): inf in eager, 3e38 here. Now built on exp_ (and vectorized).
#     (ATen's scalar loop -- tensors under one vector, loop tails -- uses the C library: eager is not consistent;
#     64 elements keep this test inside the vector loop.)
def test_cosh_sinh_overflow_where_eager_does():
    x = torch.tensor([88.0, 88.7, 88.73, 89.0, 89.41, -89.0, 1e6, float("inf"), float("nan"), 0.0, -0.0, 1e-30,
                      -1e-7, 0.5, -3.0, 2.0] * 4)
    got = torch.compile(lambda x: (torch.cosh(x), torch.sinh(x)), backend="fuse")(x)
    for g, r in zip(got, (torch.cosh(x), torch.sinh(x))):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0, equal_nan=True)


# 11. g++ (-fno-trapping-math, SSE4.1) folds (float)(int64_t)x into trunc(x), which keeps a zero's sign:
#     x / x.to(torch.int64) for x = -0.01 was +inf (eager: -0.01 / 0 = -inf). int -> float now goes
#     through fb::i2f, which sets the sign from the integer.
def test_float_to_int_to_float_keeps_eager_zero_sign():
    x = torch.tensor([-0.0123, 0.5, -3.7, 2.2, -0.0, 0.0, -0.99, 7.0] * 8)
    _exact(lambda a: (a / a.to(torch.int64), 1 / (a.to(torch.int32) * 1.0), a / a.double().to(torch.int64)), x)


# 12. where(m, h, h.float()) with h = tanh(bf16) computed in one kernel: one branch read h back from memory
#     (rounded to bf16), the widening cast used the unrounded float in a register, so a constant row had a
#     non-zero std. A widening cast of a half value computed in the kernel now rounds it first, as eager does.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_cast_of_a_computed_half_value_rounds_it(dtype):
    def f(m, a):
        h = torch.tanh(a)
        w = torch.where(m, h, h.to(torch.float32))
        return h, w, torch.std(w, (-1,), correction=0)
    m = torch.tensor([True, False, True, False, False, True, True])
    for a in (torch.tensor(3.2031, dtype=dtype), torch.randn((), dtype=dtype)):
        got, ref = torch.compile(f, backend="fuse")(m, a), f(m, a)
        for g, r in zip(got, ref):
            assert torch.equal(g, r), (g, r)


# 13. Fuzzer, not backend: the float64 reference ran `int32 tensor * 3.0` in float32 (the default dtype) next
#     to float64 tensors, and lerp refused the mix; the reference now runs with float64 as the default dtype.
def test_fuzz_reference_promotes_python_floats_to_float64():
    case = Case.from_source(inputs=[
            InputSpec((16, 1), torch.float32, 'offset', (), 'grid', 1.0, False),
            InputSpec((), torch.int32, 'contig', (), 'randn', 1.0, False)],
        seed=774, half_path=['v9'], reassoc=['v11', 'v4', 'v9'],
        source='''
    def f(a0, a1):
        v1 = torch.sum(a0)
        v2 = a1 * 3.0
        v3 = torch.copysign(v1, v2)
        v4 = torch.softmax(a0, -1)
        v5 = v4.to(torch.bfloat16)
        v6 = torch.logical_and(a1, v2)
        v7 = torch.sort(a0, -2, descending=True).values
        v8 = torch.lerp(v2, (v7 + 0.0), 0.3)
        v9 = F.logsigmoid(v5)
        v10 = torch.round(v7)
        v11 = torch.exp2(v3)
        return (v8, v9, v10, v11, v4,)
    ''')
    fuzzcheck.run_case(case)


# 14. addcmul/lerp are multiply-adds that ATen's vector loop may contract into an FMA: one rounding apart,
#     amplified by cancellation (a2 + 0.5 * a0 * a0 with a2 < 0); compared like float sums since seed 13.
def test_fuzz_multiply_add_then_divide_and_minimum():
    case = Case.from_source(inputs=[
            InputSpec((5, 1, 2, 129), torch.float32, 'permuted', (0, 1, 2, 3), 'randn', 1.0, True),
            InputSpec((5, 1, 2, 129), torch.float32, 'contig', (), 'randn', 0.01, True),
            InputSpec((1, 1, 1, 1), torch.float32, 'offset', (), 'randn', 3.0, False),
            InputSpec((5, 1, 2, 1), torch.bfloat16, 'offset', (), 'wide', 1.0, False)],
        seed=14654, half_path=['v7'], reassoc=['v1', 'v4', 'v6', 'v7', 'v8'],
        source='''
    def f(a0, a1, a2, a3):
        v1 = torch.addcmul(a2, a0, a0, value=0.5)
        v2 = torch.div(a2, a3, rounding_mode='trunc')
        v3 = torch.sum(a0, (0, 3), keepdim=False)
        v4 = v1 / a1
        v5 = torch.log(torch.abs(v3))
        v6 = torch.log_softmax(v1, 1)
        v7 = v5.to(torch.bfloat16)
        v8 = torch.minimum(v4, v1)
        v9 = torch.logical_not(a2)
        return (v6, v7, v8, v9, v1,)
    ''')
    fuzzcheck.run_case(case)


# 15. A float16 result kept in float inside a kernel kept its range too: pow(x, 3) of x = 50 was 125000 where
#     eager's float16 is inf, and atan2/minimum downstream differed. float16 values now overflow as eager's do.
def test_float16_intermediate_overflows_like_eager():
    x = torch.tensor([50.0, -41.0, 40.0, 3.0, 0.5, -60.0, 1e4, float("inf")] * 4, dtype=torch.float16)
    fn = lambda x: (torch.isinf(x.pow(3) * 0.5), x * x * 40 - x * x * 30, (x * 2000).float(), x * 0.5)
    got, ref = torch.compile(fn, backend="fuse")(x), fn(x)
    assert torch.equal(got[0], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=1e-3, equal_nan=True)


# 16. Floor division with a zero quotient returned +0 for 0 // -0.5 (the test `a / b < 0` is false for -0.0);
#     ATen returns copysign(0, a / b) = -0.0, and x // that zero is +inf, not -inf (fuzz seed 15).
def test_floor_division_keeps_the_sign_of_a_zero_quotient():
    a = torch.tensor([0.0, -0.0, 0.0, 0.25, -0.25, 3.0, -3.0, 0.0] * 8)
    b = torch.tensor([-0.5, 0.5, 0.5, -4.0, 4.0, -7.0, 7.0, -1e30] * 8)
    _exact(lambda a, b: (torch.div(a, b, rounding_mode="floor"),
                         1.0 / torch.div(a, b, rounding_mode="floor"),
                         torch.div(a.to(torch.int64), b, rounding_mode="floor")), a, b)


# 17. (fuzz seed 16): a select of a row-reduction's output that picks another row (layer_norm(x)[9])
#     is merged into the row kernel, which computes it at the row's own index: wrong rows. The vertical pass
#     refuses views that move a reduced value to another index.
def test_select_of_another_row_of_a_layer_norm():
    g = torch.Generator().manual_seed(0)
    a, m = torch.randn(16, 5, 2, generator=g), torch.randn(16, 5, 2, generator=g) > 0
    fn = lambda a, m: m / (torch.abs(F.layer_norm(a, (5, 2), None, None, 1e-05).select(0, 9)) + 0.5)
    torch.testing.assert_close(torch.compile(fn, backend="fuse")(a, m), fn(a, m), rtol=1e-5, atol=1e-6)


# 18. (fuzz seed 18): var of a float16 tensor computed with float16 intermediates: the sum of squares
#     (158848) overflowed to inf where eager's float32 accumulation gives a variance of 39712. The var
#     decomposition now runs in float32 for half types and rounds once.
def test_half_var_whose_sum_of_squares_overflows_float16():
    x = torch.tensor([[-300.0, 3.0], [-60.0, 1.0], [225.0, 2.0], [135.0, 5.0], [-15.0, 7.0]]).half()
    fn = lambda x: torch.var(x * 1, 0, correction=1)
    got, want = torch.compile(fn, backend="fuse")(x), fn(x)
    assert torch.isfinite(want).all() and want[0] > 30000
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


# 19. (fuzz seed 19): x[idx] reduced over a dim of idx (amin over dim 1 of a0[idx], idx of shape [7, 7]): the
#     row kernel took the source value as constant along the row (its shape is a row's shape) and hoisted
#     its load out of the loop that computes the index -- the generated C++ did not compile. A value read
#     where an index tensor points is never per row.
def test_take_reduced_over_a_dim_of_its_index():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g)
    fn = lambda a: torch.amin(a[torch.remainder((a * 10).to(torch.int64), 7) - 7], 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusebackend")      # a fallback is a failure here
        torch.testing.assert_close(torch.compile(fn, backend="fuse")(a), fn(a), rtol=0, atol=0)


# 20. (GPU fuzz seeds 71 and 72, the same on the CPU): frac(-0.0) and frac of a negative float that truncates to
#     -0 came out -0 through core ATen's x - floor(|x|) * sign(x), where eager's kernel (x - trunc(x)) gives +0:
#     1 / frac(x) was -inf against eager's inf, signbit True against False.
def test_frac_of_negative_zero_and_of_negative_integers_keeps_eagers_sign():
    x = torch.tensor([-0.0, 0.0, -3.0, -2.5, 2.5, -0.25, float("inf"), float("-inf"), float("nan")])
    _exact(lambda x: (torch.frac(x), 1.0 / torch.frac(torch.trunc(x)), torch.signbit(torch.frac(x))), x)
    _exact(lambda x: torch.frac(x * 1), x.half())
