"""Fuzz cases (graphgen.py draws them): the input recipes, the values a case computes, and the case itself.

A case is Python source text (`def f(a0, a1, ...): ...; return (v3, v7)`) plus a recipe for its inputs (shape,
dtype, memory layout, fill, special values, seed); tensor data come from a seeded torch.Generator, so a failing
case prints as text that can be pasted into test_regressions.py.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

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



def _isfloat(v):
    return v.dtype in FLOAT


def _fmt(x):
    if isinstance(x, float):
        if x == 1.0 / 3.0:
            return "(1.0 / 3.0)"
        return repr(x)
    return repr(x)


