"""Regression cases the fuzzer found on the GPU (bench/fuzz_gpu.py on the H200): each runs on CUDA tensors with
eager on CUDA as the reference and float64 on the CPU as the tie-breaker, by the fuzzer's own rules."""
import pytest
import torch

import fuzzcheck
import fuzzdevice
from graphgen import Case, InputSpec

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _on_cuda(monkeypatch):
    monkeypatch.setattr(fuzzdevice, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(fuzzcheck, "DEVICE", torch.device("cuda"))


# 1. NVRTC contracted a*b - max into one FMA inside the softmax: the max element's exp was exp(rounding error
#    of the product) -- inf for |a*b| ~ 1e10 -- and the column's normalisation inf/inf = NaN where eager gives ~1.
#    A graph's multiply now rounds its product (fb::mul_rn, emit/include/fb_math.h), whatever --fmad says.
def test_softmax_of_a_large_product_rounds_the_product_as_eager():
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(16, 64, device="cuda", generator=g) * 1e5
    b = torch.randn(16, 64, device="cuda", generator=g) * 1e5

    def f(a, b):
        return torch.softmax(a * b, 0) + 1.0

    got, ref = torch.compile(f, backend="fuse")(a, b), f(a, b)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fuzz_softmax_over_a_sliced_product_beside_a_bf16_offset_input():
    case = Case.from_source(inputs=[
        InputSpec((16, 1, 5), torch.bfloat16, 'offset', (), 'wide', 1.0, False),
        InputSpec((16, 1, 5), torch.float32, 'contig', (), 'wide', 1.0, False),
        InputSpec((16, 1, 5), torch.float32, 'sliced', (2,), 'wide', 1.0, True)],
        seed=0, half_path=[], reassoc=['v4', 'v7'],
        source='''
def f(a0, a1, a2):
    v2 = a2 * a1
    v3 = torch.softmax(v2, -3)
    v4 = torch.std(v3, (1, 2), correction=0, keepdim=False)
    v7 = v3 + a0
    return (v7, v4,)
''')
    fuzzcheck.run_case(case, calls=4)


# 2. abs of a bool tensor: eager on CUDA computes it, the CPU does not ("abs_cpu" not implemented for 'Bool'), so
#    the float64 tie-break on the CPU raised; it now runs on the device (fuzzcheck.compare).
def test_fuzz_pow_of_abs_of_a_bool_tensor():
    case = Case.from_source(inputs=[
        InputSpec((1, 1), torch.float32, 'expanded', (1,), 'randn', 1.0, False),
        InputSpec((1,), torch.float16, 'offset', (), 'wide', 1.0, False),
        InputSpec((1, 1), torch.bfloat16, 'sliced', (0,), 'wide', 1.0, False),
        InputSpec((1, 1), torch.bool, 'permuted', (0, 1), 'randn', 1.0, False)],
        seed=6, half_path=['v2'], reassoc=['v4', 'v5'],
        source='''
def f(a0, a1, a2, a3):
    v1 = torch.sort(a0, -2, descending=True).values
    v2 = F.hardsigmoid(a1)
    v3 = a2 > a3
    v4, v5 = torch.var_mean(v1, (0,), correction=1, keepdim=True)
    v6 = torch.pow(torch.abs(v3) + 0.5, a0)
    v7 = v6 + a0
    return (v2, v4, v5, v7, v1,)
''')
    fuzzcheck.run_case(case)


def test_fuzz_silu_of_a_bf16_power_of_a_bool():
    case = Case.from_source(inputs=[
        InputSpec((), torch.bfloat16, 'contig', (), 'grid', 1.0, False),
        InputSpec((), torch.bool, 'contig', (), 'randn', 1.0, False),
        InputSpec((), torch.float32, 'contig', (), 'wide', 1.0, False)],
        seed=78, half_path=['v10', 'v12'], reassoc=[],
        source='''
def f(a0, a1, a2):
    v1 = torch.logical_not(a1)
    v2 = torch.pow(torch.abs(v1) + 0.5, a0)
    v3 = torch.logical_not(v1)
    v4 = v3 + a2
    v5 = torch.asin(a0)
    v6 = torch.exp2(v5)
    v8 = (v6) * torch.tanh(F.softplus(v6))
    v9 = torch.frac(v4)
    v10 = F.silu(v2)
    v11 = torch.signbit(v3)
    v12 = v8 * v8
    return (v9, v10, v11, v12, v1,)
''')
    fuzzcheck.run_case(case)


# 3. frac of -0 (and of a negative integer) was -0 through core ATen's decomposition, +0 in eager: a later
#    division by it gave -inf for inf, signbit True for False (seeds 71, 72). frac is now x - trunc(x).
def test_fuzz_division_by_frac_of_a_truncated_tensor():
    case = Case.from_source(inputs=[
        InputSpec((1, 7, 3), torch.bool, 'expanded', (0,), 'randn', 1.0, False),
        InputSpec((1, 7, 3), torch.float32, 'expanded', (0,), 'randn', 1.0, True)],
        seed=2, half_path=[], reassoc=['v6'],
        source='''
def f(a0, a1):
    v1 = torch.trunc(a1)
    v3 = torch.frac(v1)
    v4 = torch.prod(v3, 1, keepdim=False)
    v6 = torch.abs(v4 - v1)
    v7 = a0 / v3
    return (v6, v7,)
''')
    fuzzcheck.run_case(case, calls=4)
