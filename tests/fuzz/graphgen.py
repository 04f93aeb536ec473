"""Random tensor programs for fuzzing backend="fuse" against eager.

A case is Python source text (`def f(a0, a1, ...): ...; return (v3, v7)`) plus a recipe for its inputs (shape,
dtype, memory layout, fill, special values, seed). Hypothesis draws the structure; tensor data come from a
seeded torch.Generator, so a failing case prints as text that can be pasted into test_regressions.py.

The generator tracks, for every value, whether eager and a fused kernel must compute it bit for bit (`exact`):
basic float32 arithmetic is correctly rounded in both, but transcendental functions, reductions (summation
order) and half-type arithmetic (a fused chain keeps float intermediates, eager rounds after each op) are not.
Discontinuous ops (floor, round, sign, comparisons, casts to int/bool, remainder ...) only ever consume exact
values: a one-ulp difference upstream would otherwise flip their result and report a bug that isn't one.
It also tracks a bound on the magnitude of a value's finite elements (None: unknown, possibly huge) and whether it
may hold NaN/Inf, so that integer arithmetic never overflows (eager wraps in int32 while a kernel computes in
int64), float -> int casts never see NaN/Inf (undefined in both), and order-dependent reductions (sum, mean, var,
layer norm) never add finite values big enough to overflow in one summation order and not in another.
"""
from __future__ import annotations

import math
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

FLOAT = (torch.float32, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
INT = (torch.int32, torch.int64)
DTYPE_NAME = {torch.float32: "torch.float32", torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16",
              torch.int32: "torch.int32", torch.int64: "torch.int64", torch.bool: "torch.bool",
              torch.float64: "torch.float64"}
SIZES = (1, 1, 2, 3, 5, 7, 16, 33, 0)          # per-dim sizes (sampled_from shrinks towards the front)
BIG_SIZES = (129, 300, 1030)                    # occasionally: enough elements to take the OpenMP path
MAX_NUMEL = 160_000
RANDN_CLAMP = 4.0                               # randn fills are clamped: a known bound on |x|
GRID = (-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 0.1, 0.3, 1.0 / 3.0, 3.0)   # ties, signed zeros, 0.1 ...
SCALARS_F = (2.0, 0.5, -1.0, 0.1, 3.0, -0.5, 1.0 / 3.0, 0.0, 1e-3)
SCALARS_I = (2, 1, -1, 3, 0, 5)


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class InputSpec:
    shape: tuple
    dtype: torch.dtype
    layout: str = "contig"       # contig | permuted | sliced | expanded | offset
    layout_arg: tuple = ()       # permutation / sliced dim / expanded dim
    fill: str = "randn"          # randn | grid | wide
    scale: float = 1.0
    specials: bool = False       # sprinkle NaN, +-Inf, -0.0

    def expr(self) -> str:
        return "InputSpec(%r, %s, %r, %r, %r, %r, %r)" % (self.shape, DTYPE_NAME[self.dtype], self.layout,
                                                         self.layout_arg, self.fill, self.scale, self.specials)

    def bound(self) -> Optional[float]:
        if self.dtype == torch.bool:
            return 1.0
        if self.dtype in INT:
            return 8.0
        if self.fill == "grid":
            return 3.0
        if self.fill == "wide":
            return 1e4 if self.dtype == torch.float16 else 1e6
        return RANDN_CLAMP * self.scale


def _fill(spec: InputSpec, shape, gen) -> torch.Tensor:
    n = math.prod(shape)
    if spec.dtype == torch.bool:
        return (torch.rand(n, generator=gen) < 0.5).reshape(shape)
    if spec.dtype in INT:
        return torch.randint(-8, 9, (n,), generator=gen).to(spec.dtype).reshape(shape)
    if spec.fill == "grid":
        idx = torch.randint(0, len(GRID), (n,), generator=gen)
        x = torch.tensor(GRID, dtype=torch.float64)[idx]
    elif spec.fill == "wide":
        hi = 1e4 if spec.dtype == torch.float16 else 1e6
        x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-math.log(hi), math.log(hi), generator=gen))
        x = x * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    else:
        x = torch.randn(n, generator=gen, dtype=torch.float64).clamp(-RANDN_CLAMP, RANDN_CLAMP) * spec.scale
    if spec.specials and n:
        pick = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=torch.float64)
        mask = torch.rand(n, generator=gen) < 0.15
        which = torch.randint(0, len(pick), (n,), generator=gen)
        x = torch.where(mask, pick[which], x)
    return x.to(spec.dtype).reshape(shape)


def make_input(spec: InputSpec, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(spec.shape)
    if spec.layout == "permuted":                 # logical shape `shape`, memory order permuted
        perm = spec.layout_arg
        base = _fill(spec, tuple(shape[p] for p in perm), gen)
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        return base.permute(inv)
    if spec.layout == "sliced":                   # every other element along one dim
        d = spec.layout_arg[0]
        big = list(shape)
        big[d] = 2 * shape[d] + 1
        return _fill(spec, tuple(big), gen)[(slice(None),) * d + (slice(1, None, 2),)]
    if spec.layout == "offset":                   # a view starting inside a bigger buffer, padded rows
        last = shape[-1] if shape else 1
        padded = list(shape[:-1]) + [last + 3] if shape else [4]
        t = _fill(spec, tuple(padded), gen)
        return t[..., 2:2 + last] if shape else t[2]
    if spec.layout == "expanded":                 # stride 0 along one dim
        d = spec.layout_arg[0]
        small = list(shape)
        small[d] = 1
        return _fill(spec, tuple(small), gen).expand(shape)
    return _fill(spec, shape, gen)


# ---------------------------------------------------------------- values and cases

@dataclass
class Val:
    name: str
    meta: torch.Tensor              # a meta tensor: shape and dtype
    exact: bool                     # eager and a fused kernel agree bit for bit
    bound: Optional[float]          # |finite elements| <= bound; None: unknown (possibly huge)
    half_path: bool = False         # computed through half-type arithmetic somewhere upstream
    nonfinite: bool = False         # may hold NaN or +-Inf
    reassoc: bool = False           # computed through a float sum whose order may differ (sum, mean, var, norms)
    zamb: bool = False              # a zero's sign may differ: max/min/clamp of -0.0 vs 0.0 has no one eager
                                    # answer (ATen's vector loop returns one operand, its scalar loop the other)
    uses: int = 0

    @property
    def dtype(self):
        return self.meta.dtype

    @property
    def shape(self):
        return tuple(self.meta.shape)


@dataclass
class Case:
    inputs: list                    # InputSpec per argument
    lines: list                     # body statements
    outputs: list                   # variable names returned
    half_path: dict = field(default_factory=dict)    # output name -> compare with the half-type rule
    reassoc: dict = field(default_factory=dict)      # output name -> went through a float sum
    seed: int = 0

    @property
    def source(self) -> str:
        args = ", ".join("a%d" % i for i in range(len(self.inputs)))
        body = "\n".join(self.lines + ["return (%s,)" % ", ".join(self.outputs)])
        return "def f(%s):\n%s\n" % (args, textwrap.indent(body, "    "))

    def function(self, reference=False):
        """The case as a Python function; reference=True: every float type (casts included) becomes float64."""
        src = self.source
        if reference:
            for name in ("torch.float32", "torch.float16", "torch.bfloat16"):
                src = src.replace(name, "torch.float64")
            src = src.replace(".float()", ".double()")
        ns = {"torch": torch, "F": F}
        exec(compile(src, "<fuzz-case>", "exec"), ns)
        if not reference:
            return ns["f"]

        def f64(*args):
            # an int tensor times a Python float is of the default dtype: float64 too, or lerp/where would
            # see float32 next to float64 (the reference raised where eager did not; seed 13)
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                return ns["f"](*args)
            finally:
                torch.set_default_dtype(prev)
        return f64

    def make_inputs(self, seed: Optional[int] = None):
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return [make_input(s, gen) for s in self.inputs]

    def __repr__(self):
        ins = ",\n".join("        " + s.expr() for s in self.inputs)
        halves = sorted(k for k, v in self.half_path.items() if v)
        sums = sorted(k for k, v in self.reassoc.items() if v)
        return ("Case.from_source(inputs=[\n%s],\n    seed=%d, half_path=%r, reassoc=%r,\n    source='''\n%s''')"
                % (ins, self.seed, halves, sums, self.source))

    @classmethod
    def from_source(cls, inputs, seed, half_path, reassoc, source):
        """The inverse of repr(): a printed failing case, pasted back, is the same case."""
        lines = [l.strip() for l in source.strip().splitlines()[1:]]
        ret = lines.pop()
        assert ret.startswith("return (") and ret.endswith(",)"), ret
        outs = [o.strip() for o in ret[len("return ("):-2].split(",")]
        return cls(inputs=list(inputs), lines=lines, outputs=outs, half_path={o: o in half_path for o in outs},
                   reassoc={o: o in reassoc for o in outs}, seed=seed)


# ---------------------------------------------------------------- ops

def _isfloat(v):
    return v.dtype in FLOAT


def _fmt(x):
    if isinstance(x, float):
        if x == 1.0 / 3.0:
            return "(1.0 / 3.0)"
        return repr(x)
    return repr(x)


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


class Builder:
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
        """gather / index_select / x[idx] / embedding with an index computed in the graph (an integer value
        brought into range by remainder; x[idx] also with negative indices)."""
        a = self.pick(lambda v: v.meta.dim() >= 1 and 0 not in v.shape)
        b = self.pick(lambda v: v.exact and v.meta.numel() > 0 and (v.dtype in INT or (
            v.dtype in FLOAT and not v.nonfinite and v.bound is not None and v.bound < 1e9)), prefer_recent=False)
        if a is None or b is None:
            return False
        rank = a.meta.dim()
        kind = self.choice(("gather", "index_select", "index", "embedding"))
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


OP_FAMILIES = (("op_binary", 6), ("op_smooth", 3), ("op_exact_unary", 3), ("op_reduce", 3), ("op_rowwise", 2),
               ("op_compare", 2), ("op_where", 2), ("op_cast", 2), ("op_view", 2), ("op_clamp", 1),
               ("op_logical", 1), ("op_classify", 1), ("op_opaque", 1), ("op_repeat", 2), ("op_take", 2))
_WEIGHTED = tuple(name for name, w in OP_FAMILIES for _ in range(w))


def _dtype(draw):
    return draw(st.sampled_from((torch.float32,) * 4 + (torch.float16, torch.bfloat16, torch.int32, torch.int64,
                                                         torch.bool)))


def _input_spec(draw, shape):
    dtype = _dtype(draw)
    rank = len(shape)
    layout = draw(st.sampled_from(("contig", "contig", "permuted", "sliced", "offset", "expanded")))
    arg = ()
    if layout == "permuted":
        if rank < 2:
            layout = "contig"
        else:
            arg = tuple(draw(st.permutations(list(range(rank)))))
    elif layout in ("sliced", "expanded"):
        if rank == 0:
            layout = "contig"
        else:
            arg = (draw(st.integers(0, rank - 1)),)
    elif layout == "offset" and rank == 0:
        layout = "contig"
    fill, scale, specials = "randn", 1.0, False
    if dtype in FLOAT:
        fill = draw(st.sampled_from(("randn", "randn", "grid", "wide")))
        scale = draw(st.sampled_from((1.0, 3.0, 0.01))) if fill == "randn" else 1.0
        specials = draw(st.booleans()) and draw(st.booleans())
    return InputSpec(tuple(shape), dtype, layout, arg, fill, scale, specials)


@st.composite
def cases(draw, min_ops=2, max_ops=12):
    rank = draw(st.sampled_from((2, 1, 3, 0, 4, 2, 3)))
    base = [draw(st.sampled_from(SIZES)) for _ in range(rank)]
    if rank and draw(st.integers(0, 9)) == 0:                 # now and then a big one (OpenMP path)
        base[draw(st.integers(0, rank - 1))] = draw(st.sampled_from(BIG_SIZES))
    while math.prod(base) > MAX_NUMEL:
        base[base.index(max(base))] //= 4
    n_in = draw(st.integers(1, 4))
    specs = []
    for i in range(n_in):
        shape = list(base)
        if i and rank:
            mode = draw(st.sampled_from(("same", "same", "ones", "suffix")))
            if mode == "ones":
                shape = [1 if draw(st.booleans()) else s for s in shape]
            elif mode == "suffix":
                shape = shape[draw(st.integers(1, rank)):]
        specs.append(_input_spec(draw, tuple(shape)))
    b = Builder(draw)
    for i, s in enumerate(specs):
        b.vals.append(Val("a%d" % i, torch.empty(s.shape, dtype=s.dtype, device="meta"), True, s.bound(),
                          nonfinite=s.specials))
    n_ops = draw(st.integers(min_ops, max_ops))
    made, tries = 0, 0
    while made < n_ops and tries < 4 * n_ops:
        tries += 1
        fam = draw(st.sampled_from(_WEIGHTED))
        if getattr(b, fam)():
            made += 1
    computed = [v for v in b.vals if not v.name.startswith("a")]
    if not computed:                                           # nothing drawn fit: one plain op
        b.new("%s + %s" % (b.vals[0].name, b.vals[0].name), [b.vals[0]], b.vals[0].exact, None)
        computed = [v for v in b.vals if not v.name.startswith("a")]
    sinks = [v for v in computed if v.uses == 0]
    outs = sinks[-4:]
    extra = draw(st.sampled_from([None] + computed))
    if extra is not None and extra not in outs:
        outs.append(extra)
    return Case(inputs=specs, lines=b.lines, outputs=[v.name for v in outs],
                half_path={v.name: v.half_path or v.dtype in HALF for v in outs},
                reassoc={v.name: v.reassoc for v in outs},
                seed=draw(st.integers(0, 2 ** 16)))
