"""The fuzz builder: a pool of values and the op families that add one statement each (shape-changing ones in
fuzzshapes.py). Every op is tried on meta tensors first; exactness, bounds and NaN/Inf are tracked per value
(see graphgen.py)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fuzzcase import DTYPE_NAME, FLOAT, HALF, INT, MAX_NUMEL, SCALARS_F, SCALARS_I, Val, _fmt, _isfloat
from fuzzops import (BINARY_ARITH, BINARY_DISC, BINARY_SELECT, BINARY_SMOOTH, BITWISE, CLASSIFY, COMPARE,
                     DOMAIN_EDGE, EXACT_UNARY, LOGICAL, MAKES_NONFINITE, SMOOTH, TRANSPARENT, ZAMB_OPS,
                     _arith_bound, _max, broadcastable)
from fuzzshapes import ShapeOps

class Builder(ShapeOps):
    """Draws one case: inputs, then ops over a pool of values (each op's shape/dtype checked on meta tensors)."""

    def __init__(self, draw):
        self.draw = draw
        self.vals: list[Val] = []
        self.lines: list[str] = []
        self.counter = 0
        self.history: list = []

    # -- helpers
    def d(self, strategy):
        return self.draw(strategy)

    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def new(self, expr: str, operands, exact, bound, half_op=False, n_out=1, makes_nonfinite=False, sums=False):
        ns = {"torch": torch, "F": F}
        ns.update({v.name: v.meta for v in self.vals})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = eval(expr, ns)
            except Exception:
                return None
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != n_out or not all(isinstance(o, torch.Tensor) for o in outs):
            return None
        if any(o.numel() > MAX_NUMEL for o in outs):
            return None
        half_path = any(v.half_path for v in operands)
        made = []
        for o in outs:
            self.counter += 1
            # half_op="inner": the expression has half-type intermediates of its own (abs(h) + 0.5 in pow)
            inner = half_op == "inner" and any(v.dtype in HALF for v in operands)
            hp = half_path or inner or (half_op and o.dtype in HALF)
            ob = self._bound(o.dtype, bound)
            nonfinite = o.dtype in FLOAT and (makes_nonfinite or ob is None or any(v.nonfinite for v in operands))
            reassoc = any(v.reassoc for v in operands) or (sums and any(_isfloat(v) for v in operands))
            zamb = o.dtype in FLOAT and (any(v.zamb for v in operands) or ZAMB_OPS.search(expr) is not None)
            v = Val("v%d" % self.counter, o, exact and not hp, ob, hp, nonfinite, reassoc, zamb)
            made.append(v)
        for v in operands:
            v.uses += 1
        lhs = ", ".join(v.name for v in made)
        self.lines.append("%s = %s" % (lhs, expr))
        self.history.append((expr, list(operands), exact, bound, half_op, n_out, makes_nonfinite, sums))
        self.vals.extend(made)
        return made

    @staticmethod
    def _bound(dtype, bound):
        if bound is None or math.isnan(bound):
            return None
        if dtype == torch.bool:
            return 1.0
        if dtype == torch.float16 and bound > 6e4:
            return None
        if dtype in FLOAT and bound > 1e30:
            return None
        return float(bound)

    @staticmethod
    def zs(v: Val) -> str:
        """v's name, or `(v + 0.0)` for an inexact float: a zero whose sign differs between two correct formulas
        (x - mean is +0 in one, -0 in the other) must not reach 1/x, rsqrt or atan2, which turn the sign into
        -inf vs inf or -pi vs pi. Adding +0.0 makes every zero +0 in eager and in the kernel alike."""
        return v.name if (v.exact and not v.zamb) or not _isfloat(v) else "(%s + 0.0)" % v.name

    @staticmethod
    def divisor(v: Val) -> str:
        """A divisor: zero-sign-safe (zs); one that went through a float sum is also kept away from 0, where
        1/x turns the sum's rounding (another order than ATen's) into any relative error at all."""
        if v.reassoc and _isfloat(v):
            return "(torch.abs(%s) + 0.5)" % v.name
        return Builder.zs(v)

    def pick(self, pred=lambda v: True, prefer_recent=True):
        cands = [v for v in self.vals if pred(v)]
        if not cands:
            return None
        if prefer_recent and self.d(st.booleans()):
            cands = cands[-3:]
        return self.choice(cands)

    def partner(self, a: Val, pred=lambda v: True):
        return self.pick(lambda v: v is not a and broadcastable(v.shape, a.shape) and pred(v), prefer_recent=False)

    # -- op families; each returns True when it added a statement

    def op_smooth(self):
        a = self.pick(_isfloat)
        if a is None:
            return False
        name = self.choice(sorted(SMOOTH))
        expr, bfn = SMOOTH[name]
        if name in ("sin", "cos", "tan") and not (a.exact or (a.bound is not None and a.bound <= 100)):
            return False    # cos(1e8 +- one ulp) is any number in [-1, 1]: no kernel can match that
        if name == "tan" and not (a.exact or (a.bound is not None and a.bound < 1.5)):
            return False    # next to a pole (atan2(y, 0) = pi/2) the argument's last bit picks the sign of a
            # huge result: eager rounds pi/2 to bfloat16 below the pole, float32 lands above it (fuzz seed 21)
        bound = bfn(a.bound) if (bfn and a.bound is not None) else None
        arg = self.divisor(a) if name in ("rsqrt", "reciprocal") else a.name
        if not a.exact and name in DOMAIN_EDGE:    # log(-1e-9) is NaN, log(+1e-9) is not: keep inexact
            arg = DOMAIN_EDGE[name] % arg            # arguments off the edge of the op's domain
        return self.new(expr.format(arg), [a], False, bound, half_op="inner" if name == "mish_like" else True,
                        makes_nonfinite=name in MAKES_NONFINITE)

    def op_exact_unary(self):
        name = self.choice(sorted(EXACT_UNARY))
        expr, bfn, disc = EXACT_UNARY[name]
        ok = (lambda v: v.exact and v.dtype != torch.bool) if disc else (lambda v: v.dtype != torch.bool)
        a = self.pick(ok)
        if a is None:
            return False
        if a.dtype in INT and name in ("floor", "ceil", "round", "trunc"):
            return False
        bound = bfn(a.bound) if a.bound is not None else None
        if a.dtype in INT and (bound is None or bound > 2 ** 30):
            return False
        transparent = name in TRANSPARENT
        made = self.new(expr.format(a.name), [a], a.exact, bound, half_op=not transparent and name != "nan_to_num",
                        makes_nonfinite=name in MAKES_NONFINITE)
        if made and name == "nan_to_num" and made[0].bound is not None:
            made[0].nonfinite = False
        return made

    def op_clamp(self):
        a = self.pick(lambda v: v.dtype != torch.bool)
        if a is None:
            return False
        isint = a.dtype in INT
        lo = self.choice(SCALARS_I if isint else SCALARS_F)
        hi = self.choice(SCALARS_I if isint else SCALARS_F)
        form = self.choice(("both", "min", "max", "tensor"))
        if form == "tensor":
            b = self.partner(a, lambda v: v.dtype == a.dtype)
            if b is None:
                return False
            expr = "torch.clamp(%s, min=%s)" % (a.name, b.name)
            return self.new(expr, [a, b], a.exact and b.exact, _max(a.bound, b.bound))
        expr = {"both": "torch.clamp(%s, %s, %s)" % (a.name, _fmt(lo), _fmt(hi)),
                "min": "torch.clamp_min(%s, %s)" % (a.name, _fmt(lo)),
                "max": "torch.clamp(%s, max=%s)" % (a.name, _fmt(hi))}[form]
        bound = _max(a.bound, abs(lo), abs(hi)) if a.bound is not None else None
        simple = all(float(x) in (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0) for x in (lo, hi))
        return self.new(expr, [a], a.exact, bound, half_op=not simple)

    def op_binary(self):
        fam = self.choice(("arith", "arith", "arith", "select", "smooth", "disc", "scalar", "rscalar"))
        a = self.pick(lambda v: True)
        if a is None:
            return False
        if fam in ("scalar", "rscalar"):
            if a.dtype == torch.bool:
                return False
            name = self.choice(("add", "sub", "mul", "div"))
            isint = a.dtype in INT
            s = self.choice(SCALARS_I if isint and self.d(st.booleans()) else SCALARS_F)
            if name == "div" and s == 0:
                return False
            expr = BINARY_ARITH[name].format(*((a.name, _fmt(s)) if fam == "scalar" else
                                              (_fmt(s), self.divisor(a) if name == "div" else a.name)))
            exact = a.exact and not (name == "div")
            bound = _arith_bound(name, a.bound, abs(s)) if fam == "scalar" or name != "div" else None
            if isint and isinstance(s, int) and name != "div" and (bound is None or bound > 2 ** 30):
                return False
            return self.new(expr, [a], exact, bound, half_op=True, makes_nonfinite=name == "div")
        b = self.partner(a)
        if b is None:
            return False
        if a.dtype == torch.bool and b.dtype == torch.bool and fam != "select":
            return False
        if fam == "arith":
            name = self.choice(sorted(BINARY_ARITH))
            if name == "sub" and torch.bool in (a.dtype, b.dtype):
                return False
            intres = a.dtype in INT + (torch.bool,) and b.dtype in INT + (torch.bool,)
            if intres and name == "div":
                bound = None
            else:
                bound = _arith_bound(name.split("_")[0], a.bound, b.bound)
                if name.endswith("alpha") and bound is not None:
                    bound *= 2
                if intres and (bound is None or bound > 2 ** 30):
                    return False
            bname = self.divisor(b) if name == "div" else b.name
            return self.new(BINARY_ARITH[name].format(a.name, bname), [a, b], a.exact and b.exact, bound,
                            half_op=True, makes_nonfinite=name == "div")
        if fam == "select":
            name = self.choice(sorted(BINARY_SELECT))
            if name == "copysign":       # (the sign of a NaN is no one's to promise)
                # the sign of an inexact value is not promised either where it is a rounding from zero:
                # logsigmoid(103.6) is -1.4e-45 in the kernels (exp correctly rounded), 0 in eager (seed 13)
                if not (_isfloat(a) or _isfloat(b)) or b.nonfinite or (_isfloat(b) and not b.exact):
                    return False
                return self.new(BINARY_SELECT[name].format(a.name, self.zs(b)), [a, b], a.exact and b.exact, a.bound)
            return self.new(BINARY_SELECT[name].format(a.name, b.name), [a, b], a.exact and b.exact,
                            _max(a.bound, b.bound))
        if fam == "smooth":
            if not (_isfloat(a) or _isfloat(b)):
                return False
            name = self.choice(sorted(BINARY_SMOOTH))
            if name == "pow" and not a.exact and (b.bound is None or b.bound > 8):
                return False    # an inexact base to the power 1e6: its last ulp is worth 1e6 ulps
            bound = 3.2 if name == "atan2" else None
            # lerp and addcmul are multiply-adds that ATen's vector loops may contract into one FMA: a
            # rounding apart, amplified where the sum cancels -- compared like float sums (seed 13)
            return self.new(BINARY_SMOOTH[name].format(self.zs(a), self.zs(b)), [a, b], False, bound,
                            half_op="inner" if name == "pow" else True, sums=name in ("lerp", "addcmul"))
        # discontinuous: exact operands only; integer divisors are made non-zero
        if not (a.exact and b.exact) or torch.bool in (a.dtype, b.dtype):
            return False
        name = self.choice(sorted(BINARY_DISC))
        bname = self.zs(b)
        if b.dtype in INT:
            bname = "(torch.abs(%s) + 1)" % b.name
        bound = None
        if a.dtype in INT and b.dtype in INT:
            bound = a.bound
        elif a.bound is not None:
            bound = None if name in ("floordiv", "truncdiv") else _max(a.bound, b.bound)
        return self.new(BINARY_DISC[name].format(a.name, bname), [a, b], True, bound, makes_nonfinite=True)

    def op_compare(self):
        a = self.pick(lambda v: v.exact)
        if a is None:
            return False
        name = self.choice(sorted(COMPARE))
        if self.d(st.booleans()):
            b = self.partner(a, lambda v: v.exact)
            if b is None:
                return False
            return self.new(COMPARE[name].format(a.name, b.name), [a, b], True, 1.0)
        s = self.choice(SCALARS_I if a.dtype in INT + (torch.bool,) else SCALARS_F)
        return self.new(COMPARE[name].format(a.name, _fmt(s)), [a], True, 1.0)

    def op_classify(self):
        a = self.pick(lambda v: v.exact)
        if a is None:
            return False
        name = self.choice(sorted(CLASSIFY))
        if name == "signbit" and (a.zamb or a.nonfinite):
            return False
        return self.new(CLASSIFY[name].format(a.name), [a], True, 1.0)

    def op_logical(self):
        a = self.pick(lambda v: v.exact)
        if a is None:
            return False
        if self.d(st.booleans()):
            return self.new("torch.logical_not(%s)" % a.name, [a], True, 1.0)
        b = self.partner(a, lambda v: v.exact)
        if b is None:
            return False
        if a.dtype in (torch.bool,) + INT and b.dtype in (torch.bool,) + INT and self.d(st.booleans()):
            name = self.choice(sorted(BITWISE))
            if a.dtype != b.dtype and torch.bool in (a.dtype, b.dtype):
                return False
            bound = 2 * _max(a.bound, b.bound) + 1
            return self.new(BITWISE[name].format(a.name, b.name), [a, b], True, bound)
        name = self.choice(sorted(LOGICAL))
        return self.new(LOGICAL[name].format(a.name, b.name), [a, b], True, 1.0)

    def op_where(self):
        c = self.pick(lambda v: v.dtype == torch.bool)
        if c is None:
            return False
        a = self.partner(c, lambda v: v.dtype != torch.bool or self.d(st.booleans()))
        if a is None:
            return False
        if self.d(st.booleans()):
            b = self.partner(a, lambda v: broadcastable(v.shape, c.shape))
            if b is None:
                return False
            return self.new("torch.where(%s, %s, %s)" % (c.name, a.name, b.name), [c, a, b],
                            a.exact and b.exact, _max(a.bound, b.bound))
        s = self.choice(SCALARS_I if a.dtype in INT else SCALARS_F) if a.dtype != torch.bool else True
        s = s if a.dtype in INT or a.dtype == torch.bool else float(s)
        if self.d(st.booleans()) and broadcastable(c.shape, a.shape) and \
                torch.broadcast_shapes(c.shape, a.shape) == a.shape:
            return self.new("%s.masked_fill(%s, %s)" % (a.name, c.name, _fmt(s)), [c, a], a.exact,
                            _max(a.bound, abs(float(s))), half_op=a.dtype in HALF and s not in (0.0, 1.0, 2.0, -1.0))
        return self.new("torch.where(%s, %s, %s)" % (c.name, a.name, _fmt(s)), [c, a], a.exact,
                        _max(a.bound, abs(float(s))), half_op=a.dtype in HALF and s not in (0.0, 1.0, 2.0, -1.0))

    def op_cast(self):
        a = self.pick(lambda v: True)
        if a is None:
            return False
        to = self.choice(FLOAT + INT + (torch.bool,))
        if to == a.dtype:
            return False
        if a.dtype in FLOAT and to in INT + (torch.bool,):
            if not a.exact or (to != torch.bool and (a.nonfinite or a.bound is None or a.bound > 2 ** 30)):
                return False
        exact = a.exact
        return self.new("%s.to(%s)" % (a.name, DTYPE_NAME[to]), [a], exact, a.bound)
