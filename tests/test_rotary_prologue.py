"""The rotary-embedding prologue of HF Llama as fusable ops: the positions x inverse-frequencies outer product
(a bmm over a length-1 dim, fusebackend/decomp_outer.py) becomes a multiply, and a cast that names its input's
own device (`.to(dtype, device=x.device)`) is a cast. The cos/sin table is one kernel, no ATen call."""
from __future__ import annotations

import pytest
import torch

import numerics
import fusebackend


def rotary_table(inv_freq, positions):
    """transformers' LlamaRotaryEmbedding.forward, minus the module."""
    f = inv_freq[None, :, None].float().expand(positions.shape[0], -1, 1).to(positions.device)
    p = positions[:, None, :].float()
    freqs = (f.float() @ p.float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def _args(g):
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    return inv * (1 + 0.01 * torch.rand(32, generator=g)), torch.arange(40).view(1, 40).expand(3, 40).contiguous()


def test_rotary_table_is_one_kernel():
    rep = fusebackend.explain(rotary_table, *_args(torch.Generator().manual_seed(0)))
    assert rep.num_kernels == 1 and rep.num_aten_calls == 0, str(rep)
    torch._dynamo.reset()
    numerics.assert_matches(rotary_table, torch.compile(rotary_table, backend="fuse"),
                            _args(torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("batched", [False, True])
def test_outer_products_match_eager_exactly(dtype, batched):
    """One product per element, rounded once: the same bits as ATen's GEMM (alone; with an epilogue, half
    types are not rounded in between, as in any fused kernel)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 17, 1, generator=g), torch.randn(3, 1, 9, generator=g)
    if dtype == torch.int64:
        a, b = (a * 50).long(), (b * 50).long()
    a, b = a.to(dtype), b.to(dtype)
    prod = (lambda x, y: torch.bmm(x, y)) if batched else (lambda x, y: torch.mm(x[0], y[0]))
    rep = fusebackend.explain(prod, a, b)
    assert rep.num_kernels == 1 and rep.num_aten_calls == 0, str(rep)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(prod, backend="fuse")(a, b), prod(a, b))
    fn = lambda x, y: prod(x, y) + 1                    # fused with its epilogue: eager's own tolerance
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), (a, b))


def test_products_with_a_longer_inner_dim_stay_gemms():
    fn = lambda x, y: torch.bmm(x, y) + 1
    rep = fusebackend.explain(fn, torch.randn(2, 5, 2), torch.randn(2, 2, 4))
    assert rep.num_aten_calls == 1, str(rep)


def test_cast_naming_its_own_device_fuses():
    fn = lambda x: x.to(device=x.device, dtype=torch.float32) * 2
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    rep = fusebackend.explain(fn, x)
    assert rep.num_kernels == 1 and rep.num_aten_calls == 0, str(rep)
    torch._dynamo.reset()
    numerics.assert_matches(fn, torch.compile(fn, backend="fuse"), (torch.randn(6, 5, dtype=torch.bfloat16),))
