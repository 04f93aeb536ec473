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

Files: fuzzcase.py (inputs, values, the case), fuzzops.py (op tables and bounds), fuzzbuilder.py (the value
pool and the arithmetic op families), fuzzshapes.py (reductions, views, takes, opaque ops), this file (the
hypothesis strategy).
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from fuzzbuilder import Builder
# Case and InputSpec are imported from here by the regression tests and replays
from fuzzcase import BIG_SIZES, FLOAT, HALF, MAX_NUMEL, SIZES, Case, InputSpec, Val  # noqa: F401

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
