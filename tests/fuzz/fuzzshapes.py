"""Op families of the fuzz builder that change shapes or call ATen: reductions, row patterns, views, takes,
opaque ops, repeats. A mixin of graphgen's Builder (fuzzbuilder.py), which gives it new/pick/partner."""
from __future__ import annotations

import math
import re

import torch
from hypothesis import strategies as st

from fuzzcase import DTYPE_NAME, FLOAT, INT, _isfloat
from fuzzops import _summable


class ShapeOps:
    def op_opaque(self):
        """Ops the templates do not cover (ATen calls inside the program, between fused groups)."""
        a = self.pick(lambda v: v.meta.dim() >= 1 and v.dtype != torch.bool)
        if a is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("cumsum", "argmax", "sort", "matmul", "cummax"))
        dim = self.d(st.integers(-rank, rank - 1))
        n = a.shape[dim]
        if kind == "cumsum":
            if not _summable(a, n):
                return False
            return self.new("torch.cumsum(%s, %d)" % (a.name, dim), [a], not _isfloat(a) and a.exact,
                            a.bound * max(n, 1), half_op=True, sums=True)
        if kind == "argmax":
            if not a.exact or n == 0:
                return False
            return self.new("torch.argmax(%s, %d, keepdim=%r)" % (a.name, dim, self.d(st.booleans())), [a], True,
                            float(n))
        if kind == "sort":
            return self.new("torch.sort(%s, %d, descending=%r).values" % (a.name, dim, self.d(st.booleans())),
                            [a], a.exact, a.bound)
        if kind == "cummax":
            return self.new("torch.cummax(%s, %d).values" % (a.name, dim), [a], a.exact, a.bound)
        if a.dtype != torch.float32 or rank < 2:
            return False
        b = self.pick(lambda v: v.dtype == torch.float32 and v.meta.dim() == 2 and v.shape[0] == a.shape[-1],
                      prefer_recent=False)
        if b is None or not _summable(a, a.shape[-1]) or b.bound is None:
            return False
        return self.new("%s @ %s" % (a.name, b.name), [a, b], False, a.bound * b.bound * max(1, a.shape[-1]),
                        sums=True)

    def op_take(self):
        """gather / index_select / x[idx] / x[i, j] / embedding with indices computed in the graph (an integer
        value brought into range by remainder; x[idx] and x[i, j] also with negative indices)."""
        a = self.pick(lambda v: v.meta.dim() >= 1 and 0 not in v.shape)
        b = self.pick(lambda v: v.exact and v.meta.numel() > 0 and (v.dtype in INT or (
            v.dtype in FLOAT and not v.nonfinite and v.bound is not None and v.bound < 1e9)), prefer_recent=False)
        if a is None or b is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("gather", "index_select", "index", "embedding", "index2"))
        if kind == "index2" and rank < 2:
            return False
        d = self.d(st.integers(0, rank - 1)) if kind in ("gather", "index_select") else 0
        iv = b.name if b.dtype in INT else "%s.to(torch.int64)" % b.name
        idx = "torch.remainder(%s, %d)" % (iv, a.shape[d])
        if kind == "gather":
            if b.meta.dim() > rank:
                return False
            idx = "%s.long().expand(%r)" % (idx, tuple(a.shape))
            expr = "torch.gather(%s, %d, %s)" % (a.name, d, idx)
        elif kind == "index_select":
            expr = "torch.index_select(%s, %d, %s.flatten())" % (a.name, d, idx)
        elif kind == "index":
            expr = "%s[%s%s]" % (a.name, idx, " - %d" % a.shape[0] if self.d(st.booleans()) else "")
        elif kind == "index2":         # two index tensors, broadcast together (one may be a column)
            idx2 = "torch.remainder(%s * 7 + 3, %d)" % (iv, a.shape[1])
            if self.d(st.booleans()) and b.meta.dim() >= 1:
                idx = "%s.flatten()[:, None]" % idx
                idx2 = "%s.flatten()" % idx2
            expr = "%s[%s, %s%s]" % (a.name, idx, idx2, " - %d" % a.shape[1] if self.d(st.booleans()) else "")
        else:
            if rank != 2 or a.dtype not in FLOAT:
                return False
            expr = "F.embedding(%s, %s)" % (idx, a.name)
        return self.new(expr, [a, b], a.exact, a.bound)

    def op_repeat(self):
        """An earlier one-operand op again on another value of the same dtype and rank: identical kernels on
        different tensors (the horizontal batch path)."""
        done = [h for h in self.history if len(h[1]) == 1]
        if not done:
            return False
        expr, (a,), exact, bound, half_op, n_out, mk, sums = self.choice(done)
        b = self.pick(lambda v: v is not a and v.dtype == a.dtype and v.meta.dim() == a.meta.dim(),
                      prefer_recent=False)
        if b is None or (a.bound is not None and (b.bound is None or b.bound > a.bound)) or \
                (b.nonfinite and not a.nonfinite) or (a.exact and not b.exact) or (b.half_path and not a.half_path):
            return False
        if sums and b.shape != a.shape:      # the summability check was for a's sizes
            return False
        new_expr = re.sub(r"\b%s\b" % a.name, b.name, expr)
        return self.new(new_expr, [b], exact, bound, half_op, n_out, mk, sums)

    def op_reduce(self):
        a = self.pick(lambda v: v.meta.dim() >= 1)
        if a is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("sum", "sum", "mean", "amax", "amin", "any", "all", "var", "var_mean", "std", "prod"))
        ndims = self.d(st.integers(1, rank))
        dims = sorted(self.d(st.permutations(list(range(rank))))[:ndims])
        if self.d(st.booleans()):
            dims = [d - rank for d in dims]
        keep = self.d(st.booleans())
        dim_arg = dims[0] if len(dims) == 1 and self.d(st.booleans()) else tuple(dims)
        if kind == "sum" and ndims == rank and self.d(st.booleans()):
            expr, dims_txt = "torch.sum(%s)" % a.name, None
        else:
            dims_txt = "%r, keepdim=%r" % (dim_arg, keep)
        n = math.prod(a.shape[d] for d in dims) if dims else 1
        if kind in ("sum", "mean"):
            if kind == "mean" and not _isfloat(a):
                return False
            if dims_txt is not None:
                expr = "torch.%s(%s, %s)" % (kind, a.name, dims_txt)
            intres = not _isfloat(a)
            if not _summable(a, n):
                return False
            bound = a.bound * max(n, 1) if kind == "sum" else a.bound
            return self.new(expr, [a], intres and a.exact, bound, half_op=True, makes_nonfinite=n == 0, sums=True)
        if kind == "prod":
            if a.bound is None or n > 12 or (a.bound > 1 and a.bound ** n > (1e30 if _isfloat(a) else 2 ** 60)):
                return False
            if dims_txt is None or len(dims) != 1:
                return False
            return self.new("torch.prod(%s, %d, keepdim=%r)" % (a.name, dims[0], keep), [a],
                            not _isfloat(a) and a.exact, max(1.0, a.bound) ** max(n, 1), half_op=True, sums=True)
        if kind in ("amax", "amin"):
            return self.new("torch.%s(%s, %s)" % (kind, a.name, dims_txt), [a], a.exact, a.bound)
        if kind in ("any", "all"):
            if not a.exact:
                return False
            d0 = dims[0] if isinstance(dim_arg, int) else dim_arg
            return self.new("torch.%s(%s, %r, keepdim=%r)" % (kind, a.name, d0, keep), [a], True, 1.0)
        if not _isfloat(a):
            return False
        corr = self.choice((1, 0))
        if not _summable(a, n, squares=True):
            return False
        if kind == "var_mean":
            if a.nonfinite:     # eager's Welford mean is NaN or Inf depending on where an Inf sits in the row
                return False
            return self.new("torch.var_mean(%s, %r, correction=%d, keepdim=%r)" % (a.name, dim_arg, corr, keep),
                            [a], False, a.bound * a.bound, half_op=True, n_out=2, makes_nonfinite=True,
                            sums=True)
        return self.new("torch.%s(%s, %r, correction=%d, keepdim=%r)" % (kind, a.name, dim_arg, corr, keep),
                        [a], False, a.bound * a.bound, half_op=True, makes_nonfinite=True, sums=True)

    def op_rowwise(self):
        a = self.pick(lambda v: _isfloat(v) and v.meta.dim() >= 1)
        if a is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("softmax", "log_softmax", "layer_norm", "rms"))
        if kind in ("softmax", "log_softmax"):
            dim = self.d(st.integers(-rank, rank - 1))
            bound = 1.0 if kind == "softmax" else None
            return self.new("torch.%s(%s, %d)" % (kind, a.name, dim), [a], False, bound, half_op=True, sums=True)
        k = self.d(st.integers(1, min(rank, 2)))
        norm = a.shape[rank - k:]
        if not _summable(a, math.prod(norm), squares=True):
            return False
        nb = math.sqrt(max(1, math.prod(norm))) + 1
        if kind == "rms":
            dims = tuple(range(-k, 0))
            expr = ("(%s.float() * torch.rsqrt(%s.float().pow(2).mean(%r, keepdim=True) + 1e-6)).to(%s)"
                    % (a.name, a.name, dims, DTYPE_NAME[a.dtype]))
            return self.new(expr, [a], False, nb, half_op=True, sums=True)
        w = b = "None"
        operands = [a]
        wv = bv = None
        if self.d(st.booleans()):
            wv = self.pick(lambda v: v.shape == norm and v.dtype == a.dtype and v is not a, prefer_recent=False)
            if wv is not None:
                w = wv.name
                operands.append(wv)
        if self.d(st.booleans()):
            bv = self.pick(lambda v: v.shape == norm and v.dtype == a.dtype and v is not a, prefer_recent=False)
            if bv is not None:
                b = bv.name
                operands.append(bv)
        eps = self.choice((1e-5, 1e-3))
        wb = 1.0 if wv is None else wv.bound
        bb = 0.0 if bv is None else bv.bound
        bound = None if wb is None or bb is None else nb * wb + bb
        return self.new("F.layer_norm(%s, %r, %s, %s, %r)" % (a.name, tuple(norm), w, b, eps), operands, False,
                        bound, half_op=True, sums=True)

    def op_view(self):
        a = self.pick(lambda v: True)
        if a is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "expand",
                            "flatten", "contiguous", "t"))
        if kind == "transpose" and rank >= 2:
            i, j = self.d(st.integers(0, rank - 1)), self.d(st.integers(-rank, rank - 1))
            expr = "%s.transpose(%d, %d)" % (a.name, i, j)
        elif kind == "t" and rank == 2:
            expr = "%s.t()" % a.name
        elif kind == "permute" and rank >= 2:
            expr = "%s.permute(%r)" % (a.name, tuple(self.d(st.permutations(list(range(rank))))))
        elif kind == "unsqueeze":
            expr = "%s.unsqueeze(%d)" % (a.name, self.d(st.integers(-rank - 1, rank)))
        elif kind == "squeeze" and 1 in a.shape:
            expr = "%s.squeeze(%d)" % (a.name, a.shape.index(1))
        elif kind == "slice" and rank >= 1:
            d = self.d(st.integers(0, rank - 1))
            start, step = self.choice((0, 1, -2)), self.choice((1, 2))
            stop = self.choice((None, -1))
            idx = ", ".join([":"] * d + ["%s:%s:%d" % (start, "" if stop is None else stop, step)])
            expr = "%s[%s]" % (a.name, idx)
        elif kind == "select" and rank >= 1:
            d = self.d(st.integers(0, rank - 1))
            if a.shape[d] == 0:
                return False
            i = self.d(st.integers(-a.shape[d], a.shape[d] - 1))
            expr = "%s.select(%d, %d)" % (a.name, d, i)
        elif kind == "expand":
            extra = self.choice((2, 3))
            shape = [extra] + [s if s != 1 or not self.d(st.booleans()) else 3 for s in a.shape]
            expr = "%s.expand(%r)" % (a.name, tuple(shape))
        elif kind == "flatten" and rank >= 2:
            i = self.d(st.integers(0, rank - 2))
            expr = "%s.flatten(%d, %d)" % (a.name, i, i + 1)
        elif kind == "contiguous":
            expr = "%s.contiguous()" % a.name
        else:
            return False
        return self.new(expr, [a], a.exact, a.bound)
