"""Large half-type matrix products whose sizes are not multiples of 8, padded so cuBLAS takes its fast path.

A [M, K] x [K, N] product with N (or K) not a multiple of 8 has a row pitch that is not 16-byte aligned:
cuBLAS falls back to an align1 kernel. GPT-2's LM head (N = 50257) ran in 6.6 ms there on an H100 where the
padded product takes 0.9 ms (Inductor pads too). We pad the weight with zeros to the next multiple of 8
(a copy of the weight per call: ~80 us for GPT-2's 77 MB), multiply, and return the [M, N] slice of the
padded product: its rows are N + pad apart, not N as in eager. Copying it out contiguous cost 1.0 ms of
the 2.0 at GPT-2's size; Inductor returns the same strided slice (strides (50264, 1), measured with
bench/lm_head_layouts.py). A `view` in the same graph that these strides cannot serve reads a contiguous
copy instead (`view` below); user code that views the returned logits across rows needs `.reshape`, as
with Inductor. Zeros along K add nothing; padded columns of N are dropped. (H100 times measured in 2026-11;
re-check them on the H200.)
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
    return aten.slice.Tensor(out, 1, 0, n) if pn else out


def _view_strides(shape, strides, new_shape):
    """The strides of new_shape viewing a tensor of (shape, strides), or None where no view exists (static
    sizes; ATen's computeStride: each run of dims merged must be contiguous within itself)."""
    new_strides = [0] * len(new_shape)
    vd, chunk_base, tensor_numel, view_numel = len(new_shape) - 1, strides[-1] if strides else 1, 1, 1
    for td in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[td]
        if td == 0 or (shape[td - 1] != 1 and strides[td - 1] != tensor_numel * chunk_base):
            while vd >= 0 and (view_numel < tensor_numel or new_shape[vd] == 1):
                new_strides[vd] = view_numel * chunk_base
                view_numel *= new_shape[vd]
                vd -= 1
            if view_numel != tensor_numel:
                return None
            if td > 0:
                chunk_base, tensor_numel, view_numel = strides[td - 1], 1, 1
    return new_strides if vd == -1 else None


def view_decomposition():
    """aten.view of a tensor whose strides cannot be viewed (a padded product's slice): a contiguous copy
    viewed, as reshape does. Every other view is left to ATen."""
    def view(x, size):
        if x.is_contiguous() or not all(isinstance(s, int) for s in list(x.shape) + list(size)) or x.numel() == 0:
            return NotImplemented
        size = list(size)
        if -1 in size:
            known = 1
            for s in size:
                known *= s if s != -1 else 1
            size[size.index(-1)] = x.numel() // known
        if _view_strides(list(x.shape), list(x.stride()), size) is not None:
            return NotImplemented
        return aten._unsafe_view.default(aten.clone.default(x, memory_format=torch.contiguous_format), size)
    return view


def decomposition():
    def mm(a, b):
        return padded_mm(a, b) if eligible(a, b) else NotImplemented
    return mm
