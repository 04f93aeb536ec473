"""Matrix products with few rows as fused reduction kernels (fusebackend/decomp_gemv.py).

On CPU machines the decomposition is switched on for CPU tensors too (decomp_gemv.DEVICES), which checks the
grouping and the numerics the GPU build relies on; the `gpu` cases run the real thing on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import numerics
import fusebackend
from fusebackend.capture import decomp_gemv

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def gemv_on_cpu(monkeypatch):
    monkeypatch.setattr(decomp_gemv, "DEVICES", ("cuda", "cpu"))


def swiglu_block(x, w, wg, wu, wd, layers=2):
    """Llama's RMS norm + SwiGLU MLP + residual, `layers` times with the same weights (functional, so the
    float64 reference of tests/numerics.py runs it on float64 weights too)."""
    for _ in range(layers):
        xf = x.float() if x.dtype != torch.float64 else x
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
        x = x + F.linear(F.silu(F.linear(n, wg)) * F.linear(n, wu), wd)
    return x


def _weights(device, dtype, hidden, ffn):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device=device, dtype=dtype)
    return ((torch.rand(hidden, generator=g) + 0.5).to(device=device, dtype=dtype),
            mk(ffn, hidden), mk(ffn, hidden), mk(hidden, ffn))


ROWS16 = {"gemv_max_rows": 16}


def _check(fn, args, options=None):
    with torch.no_grad():
        numerics.assert_matches(fn, torch.compile(fn, backend="fuse", options=options), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_block_is_three_kernels_per_layer(device, dtype):
    args = (torch.randn(1, 256, device=device, dtype=dtype),) + _weights(device, dtype, 256, 704)
    with torch.no_grad():
        rep = fusebackend.explain(swiglu_block, *args)
    # RMS norm; gate, up, silu and the product; down and the residual add -- no cuBLAS call left
    assert rep.num_aten_calls == 0 and rep.num_kernels == 6, str(rep)
    torch._dynamo.reset()
    _check(swiglu_block, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [(6,), (2, 3)])
def test_linear_with_bias_on_a_few_tokens(device, tokens):
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16)
            for s in (tokens + (128,), (96, 128), (96,))]
    fn = lambda x, w, b: torch.relu(F.linear(x, w, b))
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args, options=ROWS16)
    # with a 3-d input the epilogue reads the product through a view and stays a kernel of its own
    assert rep.num_aten_calls == 0 and rep.num_kernels == len(tokens), str(rep)
    torch._dynamo.reset()
    _check(fn, args, ROWS16)


@pytest.mark.parametrize("case", ["float32", "too many rows", "option off", "weight not transposed", "short K"])
def test_products_that_stay_cublas(case):
    torch.manual_seed(2)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    rows = 2 if case == "too many rows" else 1
    k = 32 if case == "short K" else 128
    w = torch.randn(k, 64, dtype=dtype)
    if case == "weight not transposed":
        fn = lambda x, w: torch.tanh(x @ w)
    else:
        w = w.t().contiguous()
        fn = lambda x, w: torch.tanh(F.linear(x, w))
    args = (torch.randn(rows, k, dtype=dtype), w)
    opts = {"gemv_max_rows": 0} if case == "option off" else None
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args, options=opts)
        assert rep.num_aten_calls == 1, str(rep)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="fuse", options=opts) if opts else torch.compile(fn, backend="fuse")
        numerics.assert_matches(fn, compiled, args)


def test_training_step_gradients_match_eager():
    g = torch.Generator().manual_seed(3)
    params = [p.requires_grad_() for p in _weights("cpu", torch.bfloat16, 128, 192)]
    x = torch.randn(4, 128, generator=g).to(torch.bfloat16).requires_grad_()
    fn = lambda x, *p: swiglu_block(x, *p, layers=1)

    def grads(f):
        for t in [x] + params:
            t.grad = None
        f(x, *params).float().pow(2).sum().backward()
        return [t.grad.clone() for t in [x] + params]
    ref, got = grads(fn), grads(torch.compile(fn, backend="fuse", options=ROWS16))
    for gt, r in zip(got, ref):
        # the same bf16 formulas, summed in another order: a few bf16 ulps of the largest value
        assert (gt.float() - r.float()).abs().max().item() <= 8 * torch.finfo(torch.bfloat16).eps * r.abs().max().item()


def test_option_is_validated():
    with pytest.raises(fusebackend.OptionError, match="gemv_max_rows"):
        torch.compile(lambda x: x + 1, backend="fuse", options={"gemv_max_rows": -1})(torch.randn(3))
