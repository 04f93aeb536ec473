"""Matrix products over a length-1 inner dim (outer products) as one broadcast multiply.

HF's rotary embedding builds its angles as positions x inverse frequencies, a [B, M, 1] @ [B, 1, N] bmm:
a GEMM launch whose result a cos/sin kernel then reads back. As a multiply it is pointwise and fuses with
the cos and sin. Each output element is one product, rounded once to the output type, as the GEMM does
(half types: the product of two half values is exact in float32, then rounded).
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def _inner_is_one(a, b) -> bool:
    k = a.shape[-1]
    return isinstance(k, int) and k == 1 and a.dtype == b.dtype and not a.dtype.is_complex


def mm(a, b):
    if a.dim() != 2 or b.dim() != 2 or not _inner_is_one(a, b):
        return NotImplemented
    return aten.mul.Tensor(a, b)            # [M, 1] * [1, N]


def bmm(a, b):
    if a.dim() != 3 or b.dim() != 3 or not _inner_is_one(a, b):
        return NotImplemented
    return aten.mul.Tensor(a, b)            # [B, M, 1] * [B, 1, N]
