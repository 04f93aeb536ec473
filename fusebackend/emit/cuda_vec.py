"""Vector accesses of the CUDA kernels: loads and stores of one chunk of V elements as 16-byte vectors.

A chunk loop (a j loop over V consecutive elements) runs the scalar code of ExprBuilder once per lane; an
operand read or written through the chunk's index becomes one `fb::Vec` load hoisted before the loop (or one
store after it) whose lanes the scalar code uses. The kernel checks at run time that every such pointer (and
stride) is aligned (`VecState.conds`) and otherwise takes a scalar path.
"""
from __future__ import annotations

import re

import torch

from ..graph.fusion_graph import FusionGraph, Ref
from . import ctypes_map as C
from .exprs import ExprBuilder


def _align_elems(dtype: torch.dtype, n: int) -> int:
    """Elements per alignment unit of a Vec<T, n> (its alignment is min(16, n * itemsize) bytes)."""
    size = dtype.itemsize
    b = n * size
    a = 16 if b >= 16 else (8 if b >= 8 else (4 if b >= 4 else (2 if b >= 2 else 1)))
    return max(1, a // size)


class VecState:
    """Vector accesses of one chunk loop: loads hoisted before the unrolled j loop, stores after it."""

    def __init__(self, n: int, var: str | None = None, base: str | None = None, flat_base: str | None = None):
        self.n, self.var, self.base, self.flat_base = n, var, base, flat_base
        self.token = re.compile(r"\b%s\b" % re.escape(var)) if var else None
        self.pre, self.post, self.conds = [], [], []
        self.vin, self.vout = {}, {}

    def _cond(self, c: str):
        if c not in self.conds:
            self.conds.append(c)

    def base_offset(self, b: ExprBuilder, op, idx: tuple):
        """Offset of the chunk's first element for op at idx, or None when the access cannot be a vector."""
        if self.flat_base is not None:
            if b.flat_index is not None and op.meta.contiguous:
                op.flat = True
                self._cond("fb::vec_aligned<%d>(%s)" % (self.n, op.ptr))
                return self.flat_base
            return None
        hits = [d for d, e in enumerate(idx) if self.token.search(e)]
        if len(hits) != 1 or idx[hits[0]] != self.var:
            return None
        d = hits[0]
        if op.meta.shape[d] == 1 or op.meta.stride[d] != 1:
            return None
        q = _align_elems(op.meta.dtype, self.n)
        conds = []
        for d2, e in enumerate(idx):
            if d2 == d or e == "0" or op.meta.shape[d2] == 1:
                continue
            if op.meta.stride[d2] == 1:      # a second unit-stride dim: its term is not a multiple of a stride
                return None
            if q > 1:
                conds.append("%s %% %d == 0" % (op.stride(d2), q))
        for c in conds:
            self._cond(c)
        self._cond("fb::vec_aligned<%d>(%s)" % (self.n, op.ptr))
        return b.offset(op, idx[:d] + (self.base,) + idx[d + 1:])


class CudaBuilder(ExprBuilder):
    """ExprBuilder whose loads and stores become lanes of 16-byte vectors inside a vector chunk loop."""

    def __init__(self, fg: FusionGraph, group, flat_index=None):
        super().__init__(fg, group, flat_index)
        self.vec: VecState | None = None

    def _op(self, ref):
        return self.by_key.get(ref) or self.by_key.get(Ref(ref.name))

    def emit(self, line: str):
        # float -> bf16 through the chip's conversion instruction (fb_cuda.h), not fb_core.h's bit arithmetic
        self.lines.append(line.replace("fb::st<fb::bf16>(", "fb::cu_st_bf16(")
                          .replace("fb::round_bf16(", "fb::cu_round_bf16("))

    def load(self, ref: Ref, idx: tuple) -> str:
        v = self.vec if not self.in_pre else None       # code before the loop reads no chunk
        op = self._op(ref) if v is not None else None
        base = v.base_offset(self, op, idx) if op is not None else None
        if base is None:
            return super().load(ref, idx)
        st, ct = C.storage(op.meta.dtype), C.compute(op.meta.dtype)
        key = (op.slot, base)
        self.check_written_read(op, idx)
        if key not in v.vin:
            t = self.fresh("t")
            v.pre.append("const fb::Vec<%s, %d> %s = fb::%s<%d>(%s + %s);"
                         % (st, v.n, t, "ldv_rw" if op.written else "ldv", v.n, op.ptr, base))
            v.vin[key] = t
        var = self.fresh()
        self.emit("const %s %s = fb::ld<%s>(%s.v[j]);" % (ct, var, ct, v.vin[key]))
        return var

    def store(self, name: str, idx: tuple, var: str) -> None:
        v = self.vec
        op = self.out_operand(name)
        base = v.base_offset(self, op, idx) if v is not None else None
        if base is None:
            return super().store(name, idx, var)
        st = C.storage(op.meta.dtype)
        key = (op.slot, base)
        if key not in v.vout:
            u = self.fresh("u")
            v.pre.append("fb::Vec<%s, %d> %s;" % (st, v.n, u))
            v.post.append("fb::stv<%d>(%s + %s, %s);" % (v.n, op.ptr, base, u))
            v.vout[key] = u
        self.emit("%s.v[j] = fb::st<%s>(%s);" % (v.vout[key], st, var))

    @property
    def vectorised(self) -> bool:
        return self.vec is not None and bool(self.vec.vin or self.vec.vout)
