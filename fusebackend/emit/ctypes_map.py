"""dtype -> C type names: the storage type in memory and the compute type in registers."""
from __future__ import annotations

import math

import torch

STORAGE = {
    torch.float32: "float", torch.float64: "double", torch.float16: "fb::half", torch.bfloat16: "fb::bf16",
    torch.int64: "int64_t", torch.int32: "int32_t", torch.int16: "int16_t", torch.int8: "int8_t",
    torch.uint8: "uint8_t", torch.bool: "bool",
}
SUPPORTED = frozenset(STORAGE)


def storage(dtype: torch.dtype) -> str:
    return STORAGE[dtype]


def compute(dtype: torch.dtype) -> str:
    """Half types compute in float (accumulate in float32); integers in int64; bool stays bool."""
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "float"
    if dtype == torch.float64:
        return "double"
    if dtype == torch.bool:
        return "bool"
    return "int64_t"


def literal(value, ctype: str) -> str:
    """A python scalar as a C literal of the compute type (double -> float rounding as ATen does)."""
    if ctype == "bool":
        return "true" if value else "false"
    if ctype == "int64_t":
        if isinstance(value, float) and math.isinf(value):
            return "(int64_t)9223372036854775807LL" if value > 0 else "(int64_t)(-9223372036854775807LL - 1)"
        if isinstance(value, float) and math.isnan(value):
            return "(int64_t)0"
        return "(int64_t)%dLL" % int(value)
    v = float(value)
    if math.isnan(v):
        return "(%s)fb::nan_f()" % ctype
    if math.isinf(v):
        return "(%s)fb::inf_f()" % ctype if v > 0 else "(-(%s)fb::inf_f())" % ctype
    return "(%s)%r" % (ctype, v)
