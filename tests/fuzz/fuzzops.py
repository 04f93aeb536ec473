"""What the fuzz builder knows about ops: expressions, bounds of their results, which make NaN/Inf, which
flip a zero's sign; and the bound arithmetic it checks before it draws an op."""
from __future__ import annotations

import math
import re

import torch

from fuzzcase import Val, _isfloat

SMOOTH = {   # name -> (expression, bound of finite results given the input's bound)
    "exp": ("torch.exp({0})", lambda b: math.exp(b) if b < 80 else None),
    "log": ("torch.log({0})", lambda b: 104.0),
    "sin": ("torch.sin({0})", lambda b: 1.0),
    "cos": ("torch.cos({0})", lambda b: 1.0),
    "tanh": ("torch.tanh({0})", lambda b: 1.0),
    "sigmoid": ("torch.sigmoid({0})", lambda b: 1.0),
    "erf": ("torch.erf({0})", lambda b: 1.0),
    "log1p": ("torch.log1p({0})", lambda b: 104.0),
    "expm1": ("torch.expm1({0})", lambda b: math.exp(b) if b < 80 else None),
    "atan": ("torch.atan({0})", lambda b: 1.6),
    "silu": ("F.silu({0})", lambda b: b + 1),
    "gelu": ("F.gelu({0})", lambda b: b + 1),
    "gelu_tanh": ("F.gelu({0}, approximate='tanh')", lambda b: b + 1),
    "rsqrt": ("torch.rsqrt({0})", None),
    "reciprocal": ("torch.reciprocal({0})", None),
    "pow3": ("torch.pow({0}, 3)", lambda b: b ** 3 if b < 1e12 else None),
    "pow_half": ("({0}) ** 0.5", lambda b: math.sqrt(b)),
    # not exact: ATen's AVX2 float sqrt (torch 2.13 CPU) is off by one ulp on ~20% of inputs; ours is rounded
    # correctly (vsqrtps), so the two differ and the difference must not reach an ill-conditioned op
    "sqrt": ("torch.sqrt({0})", lambda b: math.sqrt(b)),
    "softplus": ("F.softplus({0})", lambda b: b + 1),
    "elu": ("F.elu({0})", lambda b: b + 1),
    "leaky_relu": ("F.leaky_relu({0}, 0.2)", lambda b: b),
    "hardtanh": ("F.hardtanh({0})", lambda b: 1.0),
    "mish_like": ("({0}) * torch.tanh(F.softplus({0}))", lambda b: b + 1),
    "mish": ("F.mish({0})", lambda b: b + 1),
    "log2": ("torch.log2({0})", lambda b: 150.0),
    "log10": ("torch.log10({0})", lambda b: 46.0),
    "exp2": ("torch.exp2({0})", lambda b: 2.0 ** b if b < 120 else None),
    "sinh": ("torch.sinh({0})", lambda b: math.sinh(b) if b < 80 else None),
    "cosh": ("torch.cosh({0})", lambda b: math.cosh(b) if b < 80 else None),
    "asin": ("torch.asin({0})", lambda b: 1.6),
    "acos": ("torch.acos({0})", lambda b: 3.2),
    "tan": ("torch.tan({0})", None),
    "hardswish": ("F.hardswish({0})", lambda b: b + 3),
    "hardsigmoid": ("F.hardsigmoid({0})", lambda b: 1.0),
    "logsigmoid": ("F.logsigmoid({0})", lambda b: b + 1),
    "selu": ("F.selu({0})", lambda b: 1.1 * b + 2),
    "softsign": ("F.softsign({0})", lambda b: 1.0),
}
# exact (correctly rounded or value-preserving) unary ops; 'disc' ones are discontinuous
EXACT_UNARY = {
    "neg": ("-{0}", lambda b: b, False),
    "abs": ("torch.abs({0})", lambda b: b, False),
    "relu": ("torch.relu({0})", lambda b: b, False),
    "square": ("{0} * {0}", lambda b: b * b if b < 1e15 else None, False),
    "floor": ("torch.floor({0})", lambda b: b + 1, True),
    "ceil": ("torch.ceil({0})", lambda b: b + 1, True),
    "round": ("torch.round({0})", lambda b: b + 1, True),
    "trunc": ("torch.trunc({0})", lambda b: b, True),
    "sign": ("torch.sign({0})", lambda b: 1.0, True),
    "frac": ("torch.frac({0})", lambda b: 1.0, True),
    "nan_to_num": ("torch.nan_to_num({0}, 0.0, 100.0, -100.0)", lambda b: max(b, 100.0), False),
}
MAKES_NONFINITE = {"log", "log1p", "rsqrt", "reciprocal", "pow_half", "sqrt", "log2", "log10", "asin", "acos",
                   "tan"}
DOMAIN_EDGE = {"sqrt": "torch.abs(%s)", "log": "torch.abs(%s)", "log1p": "torch.abs(%s)", "log2": "torch.abs(%s)", "log10": "torch.abs(%s)",
               "pow_half": "torch.abs(%s)", "rsqrt": "torch.abs(%s)",
               # asin/acos are ill-conditioned next to +-1 (acos(1 - d) ~ sqrt(2d)): one ulp of an inexact
               # argument at 1 - 1e-4 moves acos by 3e-4 relative; keep inexact arguments away from the edge
               "asin": "torch.clamp(%s, -0.9, 0.9)", "acos": "torch.clamp(%s, -0.9, 0.9)"}
TRANSPARENT = {"neg", "abs", "relu", "floor", "ceil", "round", "trunc", "sign"}   # results stay representable
BINARY_ARITH = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
                "add_alpha": "torch.add({0}, {1}, alpha=2)", "sub_alpha": "torch.sub({0}, {1}, alpha=-1)"}
BINARY_SMOOTH = {"atan2": "torch.atan2({0}, {1})", "pow": "torch.pow(torch.abs({0}) + 0.5, {1})",
                 "lerp": "torch.lerp({0}, {1}, 0.3)", "addcmul": "torch.addcmul({0}, {1}, {1}, value=0.5)",
                 "hypot": "torch.hypot({0}, {1})"}
BINARY_SELECT = {"maximum": "torch.maximum({0}, {1})", "minimum": "torch.minimum({0}, {1})",
                 "fmax": "torch.fmax({0}, {1})", "fmin": "torch.fmin({0}, {1})",
                 "copysign": "torch.copysign({0}, {1})"}
CLASSIFY = {"isnan": "torch.isnan({0})", "isinf": "torch.isinf({0})", "isfinite": "torch.isfinite({0})",
            "signbit": "torch.signbit({0})", "isposinf": "torch.isposinf({0})"}
BINARY_DISC = {"remainder": "torch.remainder({0}, {1})", "fmod": "torch.fmod({0}, {1})",
               "floordiv": "torch.div({0}, {1}, rounding_mode='floor')",
               "truncdiv": "torch.div({0}, {1}, rounding_mode='trunc')"}
COMPARE = {"eq": "{0} == {1}", "ne": "{0} != {1}", "lt": "{0} < {1}", "le": "{0} <= {1}", "gt": "{0} > {1}",
           "ge": "{0} >= {1}"}
LOGICAL = {"and": "torch.logical_and({0}, {1})", "or": "torch.logical_or({0}, {1})",
           "xor": "torch.logical_xor({0}, {1})"}
BITWISE = {"band": "{0} & {1}", "bor": "{0} | {1}", "bxor": "{0} ^ {1}"}


ZAMB_OPS = re.compile(r"\b(maximum|minimum|fmax|fmin|amax|amin|clamp|clamp_min|relu|hardtanh|leaky_relu|"
                      r"cummax|sort|elu|selu|hardswish|hardsigmoid)\(")


def broadcastable(a: tuple, b: tuple) -> bool:
    for x, y in zip(reversed(a), reversed(b)):
        if x != y and x != 1 and y != 1:
            return False
    return True


def _max(*bs):
    if any(b is None for b in bs):
        return None
    return max(bs)


def _summable(v: Val, n: int, squares=False) -> bool:
    """The finite elements of v (or their squares) can be added n at a time without overflowing float32."""
    if not _isfloat(v):
        return v.bound is not None and v.bound * max(n, 1) < 2 ** 60
    if v.bound is None:
        return False
    b = v.bound * v.bound if squares else v.bound
    return b * max(n, 1) < (6e4 if v.dtype == torch.float16 and not squares else 1e30)


def _arith_bound(name, a, b):
    if a is None or b is None:
        return None
    if name in ("add", "sub"):
        return a + b
    if name == "mul":
        return a * b
    return None
