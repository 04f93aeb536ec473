"""The device the fuzzer runs its cases on: FUSEBACKEND_FUZZ_DEVICE (cpu, the default, or cuda).

Inputs are made on the CPU from the case's seeded generator (the same data on every device), then moved with
their layout kept: the whole storage is copied and the view (sizes, strides, offset: permuted, sliced, offset
and expanded layouts) is rebuilt on the device. On a GPU eager on that device is the reference; the float64
CPU run is the tie-breaker (fuzzcheck.py).
"""
from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("FUSEBACKEND_FUZZ_DEVICE", "cpu"))


def to_device(t, device=None):
    device = torch.device(device or DEVICE)
    if not isinstance(t, torch.Tensor) or t.device == device:
        return t
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def to_cpu(values):
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [v.cpu() if isinstance(v, torch.Tensor) else v for v in values]
