"""Scalar code for one fusion group: each node's value at an index, as flat C statements.

The builder is shared by every target and kernel shape. A value is requested as `value(name, idx)`, where
`idx` holds one C index expression per dim of that value's shape; pointwise ops project the index onto
their (broadcast) operands, views remap it, external values are loaded through run-time strides.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..graph import indexing, registry
from ..graph.fusion_graph import FusionGraph, Ref, TensorMeta
from . import ctypes_map as C
from .errors import EmitError
from .exprs_index import index_value

COMPARE = {"Eq", "Ne", "Lt", "Le", "Gt", "Ge", "IsNan", "IsInf", "LogicalNot", "LogicalAnd", "LogicalOr",
           "LogicalXor"}
HALF = (torch.float16, torch.bfloat16)


def project(idx: tuple, shape: tuple) -> tuple:
    """Index of a broadcast operand: right-aligned, size-1 dims pinned at 0."""
    off = len(idx) - len(shape)
    if off < 0:
        raise EmitError("operand rank %d exceeds value rank %d" % (len(shape), len(idx)))
    return tuple("0" if s == 1 else idx[off + d] for d, s in enumerate(shape))


class Operand:
    """One pointer argument: an external input (Ref) or a written output (node name)."""

    def __init__(self, slot: int, key, meta, is_output: bool):
        self.slot, self.key, self.meta, self.is_output = slot, key, meta, is_output
        self.unit_dims = set()        # dims assumed to have stride 1 (checked by the runtime once)
        self.flat = False             # accessed through the linear index: assumed contiguous
        self.written = False          # an input a store node writes (passes/inplace.py): its pointer is not const

    @property
    def ptr(self) -> str:
        return "p%d" % self.slot

    def stride(self, d: int) -> str:
        return "s%d_%d" % (self.slot, d)


class ExprBuilder:
    def __init__(self, fg: FusionGraph, group, flat_index: Optional[str] = None):
        self.fg, self.group = fg, group
        self.members = set(group.nodes)
        self.flat_index = flat_index          # a linear index variable when every access is contiguous
        self.operands: list[Operand] = []
        self.by_key: dict = {}
        self.scalars: list = []                     # symbolic-int inputs (Refs), read as sym<k> after the strides
        self.scalar_var: dict = {}
        for ref in group.inputs:
            if self.is_scalar(ref):
                self.scalar_var[(ref.name, ref.item)] = "sym%d" % len(self.scalars)
                self.scalars.append(ref)
            else:
                self._operand(ref, self.meta_of(ref), False)
        for name in group.outputs:
            self._operand(name, fg.node(name).meta, True)
        self.store_of: dict = {}                    # store node -> the input operand it writes
        for name in getattr(group, "stores", ()):
            op = self.by_key.get(registry.store_target(fg.node(name)))
            if op is None:
                raise EmitError("store %s: its input is no operand of the kernel" % name)
            op.written = True
            self.store_of[name] = op
        self.lines: list[str] = []
        self.memo: dict = {}
        self.counter = 0
        self.reduction_value: dict[str, str] = {}   # reduction node -> finished accumulator variable
        self.hook: Optional[Callable] = None        # ((name, item), idx) -> variable or None: caches, rows
        self.row_reciprocal: Optional[Callable] = None   # variable -> its per-row reciprocal or None (rowdriver)
        # hoist: values at an index that names no loop variable go to `pre`, code the kernel runs once before
        # its loop (pointwise kernels set it; `pre_memo` outlives the memo, which a CUDA kernel resets between
        # its vector and scalar loops)
        self.hoist = False
        self.pre: list[str] = []
        self.pre_memo: dict = {}
        self.in_pre = False
        self.takes = False                          # an index tensor is read: the kernel checks its range

    # ---- operands
    def _operand(self, key, meta, is_output):
        if meta is None or meta.dtype not in C.SUPPORTED:
            what = "a non-tensor value" if meta is None else "dtype %s" % str(meta.dtype).replace("torch.", "")
            raise EmitError("input %s is %s (not a tensor type or symbolic int a kernel takes)"
                            % (getattr(key, "name", key), what))
        op = Operand(len(self.operands), key, meta, is_output)
        self.operands.append(op)
        self.by_key[key] = op
        return op

    def is_scalar(self, ref) -> bool:
        """A symbolic int from outside the group (a SymInt input, a size read as a value): a kernel argument."""
        if not isinstance(ref, Ref) or ref.item is not None or ref.name in self.members:
            return False
        node = self.fg.node(ref.name)
        return node.meta is None and node.multi_meta is None and node.sym_expr is not None

    def meta_of(self, ref):
        if isinstance(ref, str):
            return self.fg.node(ref).meta
        node = self.fg.node(ref.name)
        if self.is_scalar(ref):           # read as a 0-dim int64 value
            return TensorMeta((), torch.int64, (), node.device)
        return node.meta if ref.item is None else (node.multi_meta or (None,) * (ref.item + 1))[ref.item]

    def offset(self, op: Operand, idx: tuple) -> str:
        # the linear index only addresses an operand spanning the whole domain at the un-remapped index
        # (a broadcast operand, e.g. a 0-dim tensor, or one read through a slice view is indexed by strides)
        if (self.flat_index is not None and op.meta.contiguous and tuple(op.meta.shape) == tuple(self.group.domain)
                and all(e == "i%d" % d or (e == "0" and s == 1) for d, (e, s) in enumerate(zip(idx, op.meta.shape)))):
            op.flat = True
            return self.flat_index
        terms = []
        for d, e in enumerate(idx):
            if e == "0" or op.meta.shape[d] == 1:
                continue
            if op.meta.stride[d] == 1:
                op.unit_dims.add(d)
                terms.append(e)
            else:
                terms.append("%s*%s" % (e, op.stride(d)))
        return " + ".join(terms) if terms else "0"

    # ---- values
    def fresh(self, prefix="v") -> str:
        self.counter += 1
        return "%s%d" % (prefix, self.counter)

    def emit(self, line: str):
        self.lines.append(line)

    def value(self, ref, idx: tuple) -> str:
        """C variable holding `ref` (a node name or Ref) at index idx (in the compute type of its dtype)."""
        key = (ref.name, ref.item) if isinstance(ref, Ref) else (ref, None)
        name = key[0]
        memo_key = (key, idx)
        if memo_key in self.memo:
            return self.memo[memo_key]
        if memo_key in self.pre_memo:
            return self.pre_memo[memo_key]
        if key in self.scalar_var:
            return self.scalar_var[key]
        if self.hook is not None:
            hooked = self.hook(key, idx)
            if hooked is not None:
                return hooked
        if not self.in_pre and self.hoist and _invariant(idx) and not self._one_point_domain():
            # the same at every index: computed once before the loop (an optimizer's bias corrections from its
            # step counter, passes/remat_scalar.py), with everything it reads
            saved, self.lines, self.in_pre = self.lines, self.pre, True
            try:
                var = self._value(name, key, ref, idx)
            finally:
                self.lines, self.in_pre = saved, False
            self.pre_memo[memo_key] = var
            return var
        var = self._value(name, key, ref, idx)
        (self.pre_memo if self.in_pre else self.memo)[memo_key] = var
        return var

    def _value(self, name, key, ref, idx) -> str:
        if name not in self.members:
            return self.load(Ref(name, key[1]) if key[1] is not None or isinstance(ref, Ref) else Ref(name), idx)
        return self.compute(name, idx)

    def _one_point_domain(self) -> bool:
        dom = tuple(self.group.domain)
        return all(isinstance(d, int) and d == 1 for d in dom)

    @property
    def written_values(self) -> list:
        """What the kernel writes at each index of its domain: its outputs, then its stores into inputs."""
        return list(self.group.outputs) + list(self.store_of)

    def out_operand(self, name: str) -> Operand:
        """The operand a written value goes to: its own output, or the input a store node writes."""
        op = self.by_key.get(name)
        return op if op is not None else self.store_of[name]

    def check_written_read(self, op: Operand, idx: tuple) -> None:
        """An input the kernel writes is read only at the index the kernel writes (passes/inplace.py makes it
        so; this is the emitter's own check): another thread may already have written any other element."""
        shape = tuple(op.meta.shape)
        if op.written and (shape != tuple(self.group.domain) or len(idx) != len(shape) or not all(
                e == "i%d" % d or (e == "0" and s == 1) for d, (e, s) in enumerate(zip(idx, shape)))):
            raise EmitError("input %s is written by this kernel and read at another index (%s)"
                            % (op.key.name, ", ".join(idx)))

    def load(self, ref: Ref, idx: tuple) -> str:
        op = self.by_key.get(ref) or self.by_key.get(Ref(ref.name))
        if op is None:
            raise EmitError("no operand for %s" % (ref,))
        self.check_written_read(op, idx)
        ct, st = C.compute(op.meta.dtype), C.storage(op.meta.dtype)
        var = self.fresh()
        self.emit("%s %s = fb::ld<%s>(%s[%s]);" % (ct, var, ct, op.ptr, self.offset(op, idx)))
        return var

    def store(self, name: str, idx: tuple, var: str) -> None:
        op = self.out_operand(name)
        st = C.storage(op.meta.dtype)
        self.emit("%s[%s] = fb::st<%s>(%s);" % (op.ptr, self.offset(op, idx), st, var))

    def compute(self, name: str, idx: tuple) -> str:
        node = self.fg.node(name)
        if node.kind == "reduction":
            if name not in self.reduction_value:
                raise EmitError("reduction %s used before it is complete" % name)
            return self.reduction_value[name]
        if node.kind == "view":
            return self.view(node, idx)
        if indexing.is_index_op(node.target):
            return index_value(self, node, idx)
        return self.pointwise(node, idx)

    def pointwise(self, node, idx: tuple) -> str:
        pw = registry.normalize_pointwise(node.target, node.args, node.kwargs)
        if pw is None:
            raise EmitError("%s is not a pointwise op the templates cover" % node.op_name)
        out_dtype = node.meta.dtype
        out_ct = C.compute(out_dtype)
        op_ct = self.operand_type(pw, out_dtype)
        args = []
        for i, o in enumerate(pw.operands):
            want = "bool" if (pw.template == "Where" and i == 0) else op_ct
            if isinstance(o, Ref):
                v = self.value(o, project(idx, self.meta_of(o).shape))
                have = self.ctype_of(o)
                if have == want:
                    args.append(v)
                elif have == "int64_t" and want in ("float", "double"):
                    # not a plain cast: g++ folds (float)(int64_t)x into trunc(x), keeping a zero's sign
                    # (x / x.to(int64) was +inf for x = -0.01; eager: -inf). See fb_core.h.
                    args.append("fb::i2%s(%s)" % (want[0], v))
                else:
                    args.append("(%s)%s" % (want, v))
            else:
                if pw.template in COMPARE and not isinstance(o, bool):
                    dt = self.operand_dtype(pw, out_dtype)
                    if dt in HALF:      # eager compares with the scalar rounded to the tensor's type (h < 0.1)
                        o = torch.tensor(o, dtype=dt).item()
                args.append(C.literal(o, want))
        expr = "fb::%s::exec(%s)" % (_exact_mul(pw, op_ct), ", ".join(args))
        if pw.template == "Div" and op_ct == "float" and len(args) == 2 and self.row_reciprocal is not None:
            rcp = self.row_reciprocal(args[1])
            if rcp is not None:
                expr = "fb::Mul::exec(%s, %s)" % (args[0], rcp)
        if pw.template == "Identity" and pw.operands and isinstance(pw.operands[0], Ref):
            src = self.meta_of(pw.operands[0]).dtype
            if out_dtype in HALF and src != out_dtype:        # an explicit narrowing cast rounds
                expr = _round(out_dtype, expr)
            elif src in HALF and out_dtype.is_floating_point and out_dtype not in HALF \
                    and pw.operands[0].name in self.members:
                # widening a half value computed here: eager widens the rounded value, and so does any other
                # consumer that reads it back from memory (where(m, h, h.float()) was not constant)
                expr = _round(src, expr)
        elif out_dtype == torch.float16 and pw.template not in ("Identity", "Where"):
            expr = "fb::half_range(%s)" % expr     # overflow where eager's float16 does (fuzz seed 14)
        var = self.fresh()
        self.emit("%s %s = (%s)(%s);" % (out_ct, var, out_ct, expr))
        return var

    def ctype_of(self, ref) -> str:
        return C.compute(self.meta_of(ref).dtype)

    def operand_type(self, pw, out_dtype) -> str:
        return C.compute(self.operand_dtype(pw, out_dtype))

    def operand_dtype(self, pw, out_dtype):
        if pw.template not in COMPARE:
            return out_dtype
        tensors = [o for o in pw.operands if isinstance(o, Ref) and not self.is_scalar(o)]
        dts = [self.meta_of(o).dtype for o in tensors] or [torch.int64 for o in pw.operands if isinstance(o, Ref)]
        dt = dts[0] if dts else torch.float32
        for d in dts[1:]:
            dt = torch.promote_types(dt, d)
        # a symbolic int compares as a Python int does: it does not widen the tensor's type
        scalars = [0 if isinstance(o, Ref) else o for o in pw.operands if not isinstance(o, Ref) or self.is_scalar(o)]
        if any(isinstance(s, float) for s in scalars) and not dt.is_floating_point:
            dt = torch.float32
        elif any(isinstance(s, int) and not isinstance(s, bool) for s in scalars) and dt == torch.bool:
            dt = torch.int64
        return dt

    def view(self, node, idx: tuple) -> str:
        src = node.args[0]
        src_shape = self.meta_of(src).shape
        op = node.op_name.split(".")[0]
        args = node.args
        if op == "permute":
            perm = [p % len(src_shape) for p in args[1]]
            new = [None] * len(src_shape)
            for k, p in enumerate(perm):
                new[p] = idx[k]
            return self.value(src, tuple(new))
        if op in ("transpose", "t"):
            d0, d1 = (args[1], args[2]) if op == "transpose" else (0, 1)
            if len(src_shape) < 2 and op == "t":
                return self.value(src, idx)
            d0, d1 = d0 % len(src_shape), d1 % len(src_shape)
            new = list(idx)
            new[d0], new[d1] = idx[d1], idx[d0]
            return self.value(src, tuple(new))
        if op == "expand":
            return self.value(src, project(idx, src_shape))
        if op == "slice":
            dim = args[1] % len(src_shape) if len(args) > 1 else 0
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            step = args[4] if len(args) > 4 else 1
            start = start + src_shape[dim] if start < 0 else min(start, src_shape[dim]) if isinstance(src_shape[dim], int) else start
            new = list(idx)
            new[dim] = "(%s + %s*%d)" % (start, idx[dim], step) if (start or step != 1) else idx[dim]
            return self.value(src, tuple(new))
        if op == "select":
            dim, i = args[1] % len(src_shape), args[2]
            i = i + src_shape[dim] if i < 0 else i
            new = list(idx[:dim]) + [str(i)] + list(idx[dim:])
            return self.value(src, tuple(new))
        # a reshape that only adds or drops size-1 dims (the fusion pass allows no other in a group)
        kept = [e for e, s in zip(idx, node.meta.shape) if s != 1]
        new, k = [], 0
        for s in src_shape:
            if s == 1:
                new.append("0")
            else:
                new.append(kept[k])
                k += 1
        return self.value(src, tuple(new))


def _invariant(idx: tuple) -> bool:
    """An index of constants only (a one-element operand broadcast over the domain is read at 0, ..., 0)."""
    return all(isinstance(e, str) and e.isdigit() for e in idx)


def _round(dtype, expr: str) -> str:
    """expr rounded to the half type `dtype` (kept in float)."""
    return "fb::round_%s(%s)" % ("bf16" if dtype == torch.bfloat16 else "half", expr)


def _exact_mul(pw, op_ct) -> str:
    """MulExact for a float product by a power-of-two constant (x * 0.125, attention's scale at head size 64):
    the product is exact, so a following add may contract with it (fb_ops.h); any other Mul rounds first."""
    if pw.template != "Mul" or op_ct not in ("float", "double"):
        return pw.template
    for o in pw.operands:
        if isinstance(o, (int, float)) and not isinstance(o, bool) and o != 0 and math.isfinite(o) \
                and math.frexp(o)[0] in (0.5, -0.5) and 2.0 ** -100 < abs(o) < 2.0 ** 100:
            return "MulExact"
    return pw.template
