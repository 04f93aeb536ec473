"""The op registry: which ATen ops are pointwise, reduction, view or opaque, and their component template.

A pointwise op is normalised to `Pointwise(template, operands)`: `template` names a struct in
emit/include/fb_ops.h; each operand is a Ref to a tensor value or a python scalar. Everything not
listed here is opaque and runs as an ATen call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import indexing
from .fusion_graph import Ref

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass(frozen=True)
class Pointwise:
    template: str
    operands: tuple          # Ref | int | float | bool


@dataclass(frozen=True)
class Reduction:
    op: str                  # sum | mean | max | min | prod | any | all
    input: Ref
    dims: tuple              # normalised: non-negative, sorted, never empty (all dims when the op says [])
    keepdim: bool


UNARY = {
    "neg": "Neg", "abs": "Abs", "exp": "Exp", "exp2": "Exp2", "log": "Log", "log2": "Log2", "log10": "Log10",
    "log1p": "Log1p", "expm1": "Expm1", "sqrt": "Sqrt", "rsqrt": "Rsqrt", "reciprocal": "Reciprocal",
    "sin": "Sin", "cos": "Cos", "tan": "Tan", "tanh": "Tanh", "sigmoid": "Sigmoid", "erf": "Erf",
    "relu": "Relu", "silu": "Silu", "floor": "Floor", "ceil": "Ceil", "round": "Round", "trunc": "Trunc",
    "sign": "Sign", "logical_not": "LogicalNot", "bitwise_not": "BitwiseNot", "isnan": "IsNan",
    "isinf": "IsInf", "clone": "Identity", "lift_fresh_copy": "Identity", "atan": "Atan", "asin": "Asin",
    "acos": "Acos", "sinh": "Sinh", "cosh": "Cosh", "erfc": "Erfc", "sgn": "Sign", "square": "Square",
}
BINARY = {
    "mul": "Mul", "div": "Div", "maximum": "Maximum", "minimum": "Minimum", "eq": "Eq", "ne": "Ne",
    "lt": "Lt", "le": "Le", "gt": "Gt", "ge": "Ge", "logical_and": "LogicalAnd", "logical_or": "LogicalOr",
    "logical_xor": "LogicalXor", "bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr",
    "bitwise_xor": "BitwiseXor", "remainder": "Remainder", "fmod": "Fmod", "atan2": "Atan2",
    "pow": "Pow", "fmax": "Fmax", "fmin": "Fmin",
}
CASTS = {"_to_copy", "convert_element_type", "to"}
VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze",
         "slice", "select", "alias", "broadcast_in_dim", "detach"}
REDUCTIONS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min", "prod": "prod", "any": "any",
              "all": "all"}


def _packet(target) -> str:
    name = getattr(target, "__name__", "")
    return name.split(".")[0]


def _operand(a):
    return a if isinstance(a, (Ref, bool, int, float)) else None


def classify(target, args, kwargs, meta_of=None, meta=None) -> str:
    """'pointwise' | 'reduction' | 'view' | 'opaque' for one ATen call (args already hold Refs).

    meta_of(ref) and meta (the call's output) let index ops (cat, arange: graph/indexing.py) check their
    sizes; without them those stay opaque."""
    if not isinstance(target, torch._ops.OpOverload):
        return "opaque"
    if written_args(target):
        return "opaque"        # writes an argument (copy_): passes/inplace.py may make a copy_ a store
    name = _packet(target)
    if indexing.is_index_op(target):
        ok = meta_of is not None and indexing.normalize(target, args, kwargs, meta_of, meta) is not None
        return "pointwise" if ok else "opaque"
    if name in VIEWS:
        return "view"
    if name in REDUCTIONS:
        return "reduction" if normalize_reduction(target, args, kwargs) else "opaque"
    return "pointwise" if normalize_pointwise(target, args, kwargs) else "opaque"


def normalize_pointwise(target, args, kwargs) -> Optional[Pointwise]:
    name = _packet(target)
    ops = tuple(_operand(a) for a in args)
    if any(o is None for o in ops) and name not in ("full", "clamp", "clamp_min", "clamp_max", "where"):
        return None
    fn = _SPECIAL.get(name)
    if fn is not None:
        return fn(args, kwargs)
    if kwargs and name not in CASTS and not (name == "div" and "rounding_mode" in kwargs):
        return None
    if name in UNARY and len(args) == 1:
        return Pointwise(UNARY[name], ops)
    if name in BINARY and len(args) == 2:
        return Pointwise(BINARY[name], ops)
    return None


def _addsub(sign):
    def norm(args, kwargs):
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        a, b = _operand(args[0]), _operand(args[1])
        if a is None or b is None or not isinstance(alpha, (int, float)):
            return None
        if alpha != 1:
            return Pointwise("AddAlpha", (a, b, alpha * sign))
        return Pointwise("Add" if sign > 0 else "Sub", (a, b))
    return norm


def _div(args, kwargs):
    mode = kwargs.get("rounding_mode")
    tmpl = {None: "Div", "trunc": "DivTrunc", "floor": "DivFloor"}.get(mode)
    return Pointwise(tmpl, (args[0], args[1])) if tmpl else None


def _pow(args, kwargs):
    base, exp = args[0], args[1]
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        special = {2: "Square", 0.5: "Sqrt", -0.5: "Rsqrt", 1: "Identity", -1: "Reciprocal", 3: "Cube"}
        if exp in special:
            return Pointwise(special[exp], (base,))
    return Pointwise("Pow", (base, exp))


def _gelu(args, kwargs):
    approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return Pointwise("GeluTanh" if approx == "tanh" else "Gelu", (args[0],))


def _clamp(lo_default, hi_default, lo_pos, hi_pos):
    def norm(args, kwargs):
        def get(pos, key, default):
            v = args[pos] if pos is not None and len(args) > pos else kwargs.get(key)
            return default if v is None else v
        lo = get(lo_pos, "min", lo_default)
        hi = get(hi_pos, "max", hi_default)
        if not all(isinstance(v, (int, float, Ref)) for v in (lo, hi)):
            return None
        return Pointwise("Clamp", (args[0], lo, hi))
    return norm


def _where(args, kwargs):
    ops = tuple(_operand(a) for a in args)
    return Pointwise("Where", ops) if len(ops) == 3 and None not in ops else None


def _full(args, kwargs):
    value = args[1]
    return Pointwise("Const", (value,)) if isinstance(value, (int, float, bool)) else None


def _copy_(args, kwargs):
    # only for a store node (is_store): its value is the source, cast and broadcast to the written input
    if set(kwargs) - {"non_blocking"} or len(args) != 2 or not isinstance(args[1], Ref):
        return None
    return Pointwise("Identity", (args[1],))


def _clone(args, kwargs):
    # any memory format: the written copy gets the strides eager gives it (its TensorMeta)
    if set(kwargs) - {"memory_format"} or len(args) != 1 or not isinstance(args[0], Ref):
        return None
    return Pointwise("Identity", (args[0],))


def _full_like(args, kwargs):
    # the value only: the input gives the shape (known from the node's meta), never data
    if set(kwargs) - {"dtype", "layout", "device", "pin_memory", "memory_format"} or len(args) != 2:
        return None
    if kwargs.get("layout") not in (None, torch.strided):
        return None
    return _full(args, kwargs)


def _scalar_tensor(args, kwargs):
    return Pointwise("Const", (args[0],)) if isinstance(args[0], (int, float, bool)) else None


def _cast(args, kwargs):
    # any memory format: a written value is allocated with the strides eager gives it (its TensorMeta)
    extra = set(kwargs) - {"dtype", "layout", "device", "pin_memory", "memory_format", "non_blocking"}
    if extra or kwargs.get("layout") not in (None, torch.strided):
        return None
    if kwargs.get("device") is not None and len(args) == 1:
        return None   # device moves are transfers, not compute
    return Pointwise("Identity", (args[0],))


def _threshold_backward(args, kwargs):
    return Pointwise("ThresholdBackward", (args[0], args[1], args[2]))


def _leaky_relu(args, kwargs):
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return Pointwise("LeakyRelu", (args[0], slope))


def _hardtanh(args, kwargs):
    lo = args[1] if len(args) > 1 else -1.0
    hi = args[2] if len(args) > 2 else 1.0
    return Pointwise("Clamp", (args[0], lo, hi))


_SPECIAL: dict[str, Callable] = {
    "add": _addsub(1), "sub": _addsub(-1), "rsub": None, "div": _div, "pow": _pow, "gelu": _gelu,
    "clamp": _clamp(-math.inf, math.inf, 1, 2), "clamp_min": _clamp(None, math.inf, 1, None),
    "clamp_max": _clamp(-math.inf, None, None, 1), "where": _where, "full": _full,
    "scalar_tensor": _scalar_tensor, "_to_copy": _cast, "convert_element_type": _cast,
    "threshold_backward": _threshold_backward, "leaky_relu": _leaky_relu, "hardtanh": _hardtanh,
    "clone": _clone, "full_like": _full_like, "copy_": _copy_,
}
_SPECIAL = {k: v for k, v in _SPECIAL.items() if v is not None}
_SPECIAL["clamp_min"] = lambda a, k: Pointwise("Clamp", (a[0], a[1], math.inf)) if _operand(a[1]) is not None else None
_SPECIAL["clamp_max"] = lambda a, k: Pointwise("Clamp", (a[0], -math.inf, a[1])) if _operand(a[1]) is not None else None


def normalize_reduction(target, args, kwargs) -> Optional[Reduction]:
    name = _packet(target)
    op = REDUCTIONS.get(name)
    if op is None or not isinstance(args[0], Ref):
        return None
    overload = target._overloadname
    dims, keepdim = None, False
    if overload in ("default",) and name in ("sum", "mean", "prod", "any", "all"):
        dims = ()
    elif overload in ("dim_IntList", "dim", "dims", "default", "int", "dim_int"):
        raw = args[1] if len(args) > 1 else kwargs.get("dim", ())
        dims = (raw,) if isinstance(raw, int) else tuple(raw or ())
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    else:
        return None
    if not all(isinstance(d, int) for d in dims):
        return None
    if set(kwargs) - {"dtype", "dim", "keepdim"}:
        return None
    return Reduction(op, args[0], tuple(dims), keepdim)


def finish_reduction(red: Reduction, rank: int) -> Reduction:
    """Normalise dims against the input rank: negative -> positive; empty -> all dims."""
    dims = tuple(sorted({d % rank for d in red.dims})) if rank else ()
    if not red.dims:
        dims = tuple(range(rank))
    return Reduction(red.op, red.input, dims, red.keepdim)


def pointwise_flops(template: str) -> int:
    heavy = {"Exp", "Log", "Tanh", "Sigmoid", "Erf", "Gelu", "GeluTanh", "Silu", "Pow", "Sin", "Cos"}
    return 8 if template in heavy else 1


# Ops whose place in the graph's order matters beyond their data edges: collectives and their waits (every
# rank must issue them in one order), and ops that write an argument (copy_, set_, resize_, in-place
# collectives, FSDP's storage ops). They stay opaque ATen calls; graph/effects.py adds the order edges.
ORDERED_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d", "_dtensor", "fsdp")


def is_ordered(target) -> bool:
    """An op that must run in the graph's order relative to the other ordered ops."""
    if not isinstance(target, torch._ops.OpOverload):
        return target in torch.fx.node._side_effectful_functions
    return (target.namespace in ORDERED_NAMESPACES or target in torch.fx.node._side_effectful_functions
            or bool(written_args(target)))


def written_args(target) -> tuple:
    """Positions (int) and keyword names (str) of the arguments an op writes, from its schema (Tensor(a!));
    an effectful op that writes storage without saying so (inductor.resize_storage_bytes_) writes its first."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return ()
    out = tuple(a.name if a.kwarg_only else i for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write)
    if not out and target in torch.fx.node._side_effectful_functions and "resize" in schema.name:
        return (0,)
    return out


def chained(target) -> bool:
    """An ordered op kept in one order with all the other chained ones (collectives, waits, storage ops). A
    plain copy_ is not: it is ordered against the readers and writers of the buffer it writes alone."""
    return is_ordered(target) and target is not STORE_OP


STORE_OP = aten.copy_.default


def is_store(node) -> bool:
    """A copy_ into a graph input turned into a kernel's store (passes/inplace.py): a pointwise node whose value
    (its source, cast and broadcast) is written into its first argument's storage, not into an allocation."""
    return node.kind == "pointwise" and node.target is STORE_OP


def store_target(node) -> Ref:
    """The input a store node writes."""
    return node.args[0]


def aliased_arg(target):
    """The position or keyword of the argument an op's (first) output aliases (views, copy_, set_), else None."""
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.name.endswith("::wait_tensor"):
        return 0                 # returns its input (the collective's result buffer), unannotated
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    sets = schema.returns[0].alias_info.before_set
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.before_set & sets:
            return a.name if a.kwarg_only else i
    return None
