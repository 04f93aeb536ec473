"""Large half-type matrix products whose sizes are not multiples of 8, padded so cuBLAS takes its fast path.

A [M, K] x [K, N] product with N (or K) not a multiple of 8 has a row pitch that is not 16-byte aligned:
cuBLAS falls back to an align1 kernel. GPT-2's LM head (N = 50257) ran in 6.6 ms there on an H100 where the
padded product takes 0.9 ms (Inductor pads too). We pad the weight with zeros to the next multiple of 8
(a copy of the weight per call: ~50 us for GPT-2's 77 MB), multiply, and copy the [M, N] part out so the
result is contiguous like eager's -- a consumer that views it keeps working. Zeros along K add nothing;
padded columns of N are dropped.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
DEVICES = ("cuda",)
MIN_WORK = 1 << 27      # multiply-adds below which a copy of the weight costs more than it saves
ALIGN = 8               # elements: 16 bytes of a half type


def eligible(a, b) -> bool:
    if a.device.type not in DEVICES or a.dtype not in HALF or b.dtype != a.dtype or a.dim() != 2 or b.dim() != 2:
        return False
    m, k = a.shape
    n = b.shape[1]
    if not all(isinstance(s, int) for s in (m, k, n)):
        return False
    return (n % ALIGN or k % ALIGN) != 0 and m * n * k >= MIN_WORK


def padded_mm(a, b):
    m, k = a.shape
    n = b.shape[1]
    pk, pn = -k % ALIGN, -n % ALIGN
    if pk:
        a = aten.constant_pad_nd.default(a, [0, pk], 0.0)
    if b.stride(0) == 1 and b.stride(1) == k:
        # a transposed contiguous weight (x @ W.t()): pad W itself, a contiguous copy (GPT-2's LM head:
        # ~50 us where padding the transposed view is a strided gather of 300 us), and multiply by its view
        b = aten.permute.default(aten.constant_pad_nd.default(aten.permute.default(b, [1, 0]), [0, pk, 0, pn], 0.0),
                                 [1, 0])
    else:
        b = aten.constant_pad_nd.default(b, [0, pn, 0, pk], 0.0)
    out = aten.mm.default(a, b)
    if pn:
        out = aten.clone.default(aten.slice.Tensor(out, 1, 0, n), memory_format=torch.contiguous_format)
    return out


def decomposition():
    def mm(a, b):
        return padded_mm(a, b) if eligible(a, b) else NotImplemented
    return mm
