"""aten._safe_softmax (SDPA's math path: softmax, 0 on fully masked rows) is one row kernel."""
from __future__ import annotations

import pytest
import torch

import numerics
import fusebackend

NINF = float("-inf")


def masked_scores(s, mask):
    return torch.ops.aten._safe_softmax(s * 0.125 + mask, -1)


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 8, 40, generator=g)
    mask = torch.zeros(2, 1, 8, 40)
    mask[0, :, 2, :] = NINF            # a fully masked row: 0, not NaN
    mask[1, :, :, 5:] = NINF           # padding
    mask[1, :, 3, 1] = NINF
    return s.to(device=device, dtype=dtype), mask.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safe_softmax_is_one_kernel_and_matches_eager(device, dtype):
    args = _inputs(device, dtype)
    rep = fusebackend.explain(masked_scores, *args)
    assert rep.num_kernels == 1 and rep.num_aten_calls == 0, str(rep)
    torch._dynamo.reset()
    got = torch.compile(masked_scores, backend="fuse")(*args)
    assert torch.equal(got[0, :, 2], torch.zeros_like(got[0, :, 2]))
    numerics.assert_matches(masked_scores, torch.compile(masked_scores, backend="fuse"), args)


def test_safe_softmax_with_dtype_and_nan():
    s, mask = _inputs("cpu", torch.bfloat16)
    s[1, 0, 4, 2] = float("nan")        # a NaN row stays NaN, as in eager
    fn = lambda s, m: torch.ops.aten._safe_softmax(s + m, -1, dtype=torch.float32)
    got, ref = torch.compile(fn, backend="fuse")(s, mask), fn(s, mask)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
