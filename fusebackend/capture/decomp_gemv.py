"""Matrix products with few rows (decode, a handful of tokens) as fusable reductions.

cuBLAS runs a [M, K] x [K, N] product with M of 1 to 16 well under the memory bandwidth the weight read
needs (bench/results: about 1.4 to 2.3 TB/s on an H100, where a copy reaches 3.0), and its result goes to
memory before the activation that follows reads it back. Spelled as sum_k a[m, k] * w[n, k] -- products and
sums in float32, one rounding at the end, as cuBLAS does for half types -- the product becomes a row
reduction over K: the vertical pass fuses the casts into it and the pointwise epilogue after it
(silu(x @ Wg) * (x @ Wu) is one kernel that reads x once and both weights once). The H100 figures were
measured in 2026-11; re-check them on the H200.

Only where it pays: half-type operands on a GPU, M a static size of at most `max_rows` (FuseOptions.
gemv_max_rows; each row of the reduction re-reads its weight row, so only M = 1 is a sure win), and the weight
stored as [N, K] rows (an nn.Linear weight: `b` is its transpose, stride (1, K)), so the reduction reads
16-byte vectors along K. Anything else returns NotImplemented: ATen's mm.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
DEVICES = ("cuda",)     # tests add "cpu" to check the fusion and the numerics without a GPU
MIN_K = 64              # shorter rows: not worth a reduction kernel


def _static(v) -> bool:
    return isinstance(v, int)


def eligible(a, b, max_rows: int) -> bool:
    if a.device.type not in DEVICES or a.dtype not in HALF or b.dtype != a.dtype or a.dim() != 2 or b.dim() != 2:
        return False
    m, k = a.shape
    k2, n = b.shape
    if not all(_static(s) for s in (m, k, k2, n)) or not 1 <= m <= max_rows or k < MIN_K or n < 1:
        return False
    return b.stride(0) == 1 and (n == 1 or b.stride(1) == k)


def _gemv(a, b):
    # half x float32 promotes to float32: the product of two half values is exact there, as in cuBLAS
    wf = aten._to_copy.default(aten.permute.default(b, [1, 0]), dtype=torch.float32)    # [N, K]
    prod = aten.mul.Tensor(aten.unsqueeze.default(a, 1), aten.unsqueeze.default(wf, 0))  # [M, N, K]
    return aten.sum.dim_IntList(prod, [2])                                               # [M, N] float32


def mm_decomposition(max_rows: int):
    def mm(a, b):
        if not eligible(a, b, max_rows):
            return NotImplemented
        return aten._to_copy.default(_gemv(a, b), dtype=a.dtype)
    return mm


def addmm_decomposition(max_rows: int):
    def addmm(bias, a, b, *, beta=1, alpha=1):
        if beta != 1 or alpha != 1 or not eligible(a, b, max_rows) or bias.dtype != a.dtype:
            return NotImplemented
        acc = aten.add.Tensor(_gemv(a, b), bias)     # float32 + half: added in float32, rounded once
        return aten._to_copy.default(acc, dtype=a.dtype)
    return addmm
