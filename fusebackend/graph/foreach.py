"""`_foreach_*` ops as per-tensor pointwise nodes.

A foreach op (`_foreach_mul.Scalar(xs, 0.9)`, `_foreach_addcdiv.ScalarList(xs, ys, zs, cs)`, ...) computes the
same elementwise function over a list of tensors. AOT autograd hands us the functional forms (an optimizer's
`_foreach_mul_` becomes `_foreach_mul` plus a copy back of its result). Lowered as one opaque call per op, an
optimizer step is a dozen ATen launches per op list; lowered here, item i of every foreach op is an ordinary
pointwise node over tensor i, so vertical fusion makes each tensor's whole update one chain and horizontal
batching runs the chains of all tensors together.

`expand(...)` returns the node names of the items (item i of the op's result is node `names[i]`), or None when
some item would not be a pointwise node: the op then stays one opaque ATen call.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import registry
from .fusion_graph import Ref, TensorMeta

aten = torch.ops.aten
PREFIX = "_foreach_"
SEP = "__t"          # item i of foreach node N is node N__t<i>; its intermediates N__t<i>_<k>

# foreach binary op -> (single-tensor op for a tensor operand, for a scalar operand)
BINARY = {
    "add": (aten.add.Tensor, aten.add.Tensor), "sub": (aten.sub.Tensor, aten.sub.Tensor),
    "mul": (aten.mul.Tensor, aten.mul.Tensor), "div": (aten.div.Tensor, aten.div.Tensor),
    "maximum": (aten.maximum.default, aten.clamp_min.default),
    "minimum": (aten.minimum.default, aten.clamp_max.default),
    "clamp_min": (aten.clamp_min.Tensor, aten.clamp_min.default),
    "clamp_max": (aten.clamp_max.Tensor, aten.clamp_max.default),
    "pow": (aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar),
}


def is_foreach(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.__name__.startswith(PREFIX)


def _op_name(target) -> tuple:
    packet, overload = target.__name__.split(".")[0], target._overloadname
    return packet[len(PREFIX):], overload


_META_MEMO: dict = {}     # (target, operand signature, kwargs) -> output meta, over a graph's items


def _signature(a):
    """What an operand contributes to an op's output meta: a tensor's shape, strides and dtype; a number's
    type (type promotion looks at a scalar's kind, never its value)."""
    if isinstance(a, TensorMeta):
        return ("t", a.shape, a.stride, a.dtype)
    return ("s", type(a).__name__) if _scalar(a) or isinstance(a, bool) else ("v", repr(a))


class _Items:
    """The nodes of one item under construction: metadata by meta-tensor evaluation, committed together."""

    def __init__(self, base: str, meta_of: Callable, device: str):
        self.base, self.meta_of, self.device = base, meta_of, device
        self.pending: list = []          # (name, target, args, kwargs, meta)
        self.metas: dict = {}
        self.count = 0

    def meta(self, ref) -> Optional[TensorMeta]:
        if isinstance(ref, Ref) and ref.item is None and ref.name in self.metas:
            return self.metas[ref.name]
        return self.meta_of(ref)

    def _fake(self, a):
        if not isinstance(a, Ref):
            return a
        m = self.meta(a)
        if m is None or not m.is_static:
            raise _NotPointwise()
        return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

    def _evaluate(self, target, args, kwargs) -> TensorMeta:
        """The op's output meta by meta-tensor evaluation, once per operand signature: an optimizer over 200
        tensors of five shapes asks for the same few thousands of times (1.4 s of a 5 s compile)."""
        metas = []
        for a in args:
            if isinstance(a, Ref):
                m = self.meta(a)
                if m is None or not m.is_static:
                    raise _NotPointwise()
                metas.append(m)
            else:
                metas.append(a)
        key = (target, self.device, tuple(_signature(m) for m in metas),
               tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
        meta = _META_MEMO.get(key)
        if meta is None:
            out = target(*[self._fake(a) for a in args], **kwargs)
            m = TensorMeta.of(out)
            meta = TensorMeta(m.shape, m.dtype, m.stride, self.device, m.contiguous)
            if len(_META_MEMO) > 4096:
                _META_MEMO.clear()
            _META_MEMO[key] = meta
        return meta

    def op(self, i: int, target, args: tuple, kwargs=None, meta: Optional[TensorMeta] = None) -> Ref:
        kwargs = kwargs or {}
        name = "%s%s%d_%d" % (self.base, SEP, i, self.count)
        self.count += 1
        if meta is None:
            meta = self._evaluate(target, args, kwargs)
        if registry.classify(target, args, kwargs, self.meta, meta) != "pointwise":
            raise _NotPointwise()
        self.pending.append((name, target, args, kwargs, meta))
        self.metas[name] = meta
        return Ref(name)

    def finish(self, i: int, ref: Ref, meta: TensorMeta) -> str:
        """The item's last node takes the item's name and the metadata the graph promised for it."""
        final = "%s%s%d" % (self.base, SEP, i)
        for k, (name, target, args, kwargs, _) in enumerate(self.pending):
            if name == ref.name:
                self.pending[k] = (final, target, args, kwargs, meta)
                self.metas[final] = meta
                return final
        # the item is an input value itself (alpha-free copy): write it through an identity
        self.pending.append((final, aten.clone.default, (ref,), {}, meta))
        self.metas[final] = meta
        return final


class _NotPointwise(Exception):
    pass


def _scalar(s):
    return isinstance(s, (int, float)) and not isinstance(s, bool)


def _item(b: _Items, i: int, name: str, overload: str, args: tuple, kwargs: dict) -> Ref:
    """Item i of one foreach op, as single-tensor ops (the ATen formulas of the per-tensor kernels)."""
    def pick(a):           # operand i of a list argument; a scalar or a single tensor as is
        return a[i] if isinstance(a, (list, tuple)) else a

    if name in registry.UNARY and overload == "default":
        return b.op(i, getattr(aten, name).default, (args[0][i],))
    if name in BINARY:
        tensor_op, scalar_op = BINARY[name]
        if overload == "ScalarAndTensor" and name == "pow":
            return b.op(i, aten.pow.Scalar, (args[0], args[1][i]))
        x, other = args[0][i], pick(args[1])
        alpha = kwargs.get("alpha", 1)
        op = scalar_op if _scalar(other) else tensor_op
        if name in ("add", "sub") and alpha != 1:
            return b.op(i, op, (x, other), {"alpha": alpha})
        return b.op(i, op, (x, other))
    if name in ("addcmul", "addcdiv") and overload in ("Scalar", "ScalarList"):
        x, t1, t2 = args[0][i], args[1][i], args[2][i]
        value = pick(args[3]) if len(args) > 3 else kwargs.get("value", kwargs.get("scalars", 1))
        if not _scalar(value):
            raise _NotPointwise()
        if name == "addcmul":          # self + value * t1 * t2, in that order
            scaled = b.op(i, aten.mul.Tensor, (t1, value)) if value != 1 else t1
            return b.op(i, aten.add.Tensor, (x, b.op(i, aten.mul.Tensor, (scaled, t2))))
        quot = b.op(i, aten.div.Tensor, (t1, t2))   # self + value * (t1 / t2)
        return b.op(i, aten.add.Tensor, (x, b.op(i, aten.mul.Tensor, (quot, value)) if value != 1 else quot))
    if name == "lerp":                 # self + weight * (end - self)
        x, end, w = args[0][i], args[1][i], pick(args[2])
        diff = b.op(i, aten.sub.Tensor, (end, x))
        return b.op(i, aten.add.Tensor, (x, b.op(i, aten.mul.Tensor, (diff, w))))
    if name == "copy" and overload == "default":
        return b.op(i, aten.clone.default, (args[1][i],))
    if name == "zero" and overload == "default":
        return b.op(i, aten.full_like.default, (args[0][i], 0))
    raise _NotPointwise()


def expand(name: str, target, args: tuple, kwargs: dict, val, meta_of: Callable, add: Callable) -> Optional[list]:
    """Lower foreach node `name` (args hold Refs) into per-item nodes through `add(name, target, args, kwargs,
    meta)`; returns the items' node names in order, or None (nothing added) when the op stays opaque."""
    if not is_foreach(target) or not isinstance(val, (list, tuple)):
        return None
    if not all(isinstance(v, torch.Tensor) for v in val):
        return None
    op, overload = _op_name(target)
    metas = [TensorMeta.of(v) for v in val]
    if not all(m.is_static for m in metas):
        return None
    built = []
    try:
        for i, m in enumerate(metas):
            b = _Items(name, meta_of, m.device)
            ref = _item(b, i, op, overload, args, kwargs)
            out = b.meta(ref)
            if out is None or out.shape != m.shape or out.dtype != m.dtype:
                return None            # the single-tensor formula does not give what the foreach op gives
            built.append((b, b.finish(i, ref, m)))
    except (_NotPointwise, RuntimeError, TypeError, IndexError):
        return None
    for b, _ in built:
        for node in b.pending:
            add(*node)
    return [final for _, final in built]
