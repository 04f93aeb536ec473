"""A row kernel over a domain with size-1 dims (batch 1) reads its cached row values back in later phases, as
one without them does: the read index pins those dims at 0 (emit/rowdriver.py). Before, such a kernel missed
its cache and recomputed each phase from memory. CUDA source checked, then the CPU emulator of generated CUDA
and the CPU kernel against eager."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda import cuda_sources  # noqa: E402
from test_inplace_cuda_emu import compile_emulated  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _ln_gelu(x, r, w, b):
    return F.gelu(F.layer_norm(x + r, (x.shape[-1],), w, b))


@pytest.mark.parametrize("shape", [(1, 6, 256), (1, 1, 3, 128)])
def test_batch_one_rows_use_the_cache(shape):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    src = "".join(k.source for k in cuda_sources(_ln_gelu, (x, r, w, b)) if k.kind == "reduction")
    body = src[src.index("if (vec_ok) {"):src.index("return;", src.index("if (vec_ok) {"))]
    assert body.count("fb::ldv<") - body.count("fb::ldv<", body.index("a1 = ")) == 2   # x and r, read once
    assert "= c0[" in body
    with torch.no_grad():
        got = compile_emulated(_ln_gelu, [])(x, r, w, b)
        torch._dynamo.reset()
        cpu = torch.compile(_ln_gelu, backend="fuse")(x, r, w, b)
    want = _ln_gelu(x, r, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu, want, rtol=1e-5, atol=1e-6)
