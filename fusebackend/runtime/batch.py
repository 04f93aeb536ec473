"""A horizontal batch: several launches of one kernel (different operands and sizes) as a single launch.

The launcher protocol, the same for both targets: `launch.batch_plan(metas, tensors)` once (the problems'
static part: sizes and strides packed or uploaded, launch shapes), then every call `launch.batch(plan, addrs)`
with each problem's operand addresses in problem order (member 0's inputs then outputs, member 1's, ...).
Per call the step only resolves inputs, allocates the outputs (one allocation) and gathers addresses.
"""
from __future__ import annotations

import operator
import warnings

import torch

from ..graph.fusion_graph import Ref
from .steps import KernelStep, LayoutMismatch

ALIGN = 16      # bytes: every output of a batch starts here, so 16-byte vector accesses stay valid


class BatchKernelStep:
    """Runs member KernelSteps that share one kernel through its batch entry point."""
    kind = "batch"

    def __init__(self, members: list, launch, own_storage=frozenset()):
        self.members = members
        self.launch = launch
        self.device = members[0].device
        self.group_nodes = [n for m in members for n in m.group_nodes]
        n, self.nin, self.nout = len(members), len(members[0].ins), len(members[0].out_names)
        self.nptr = self.nin + self.nout
        # operands slot by slot (slot j of every member, then slot j + 1): the call gathers them with a few
        # C-level slice copies into problem order instead of a Python loop over every pointer
        refs = [members[q].spec.inputs[j] for j in range(self.nin) for q in range(n)]
        if len(refs) >= 2 and all(isinstance(r, Ref) and r.item is None for r in refs):
            get = operator.itemgetter(*[r.name for r in refs])      # one C call for every input
        else:
            resolvers = [members[q].ins[j] for j in range(self.nin) for q in range(n)]
            get = lambda env: [r(env) for r in resolvers]
        self.get_inputs = get
        self.in_refs = [members[q].spec.inputs[j] for j in range(self.nin) for q in range(n)]   # that order
        self.out_names = [members[q].out_names[j] for j in range(self.nout) for q in range(n)]
        # graph outputs get storages of their own, as eager's do (Dynamo guards on aliasing and offsets);
        # intermediates share one allocation
        own = [k for k, name in enumerate(self.out_names) if name in own_storage]
        self.outputs = Outputs([members[q].out_alloc[j] for j in range(self.nout) for q in range(n)], self.device,
                               own)
        self.plan = None

    def __call__(self, env):
        if self.plan is False:               # no batch entry could be built: the members, one by one
            for m in self.members:
                m(env)
            return
        ins = self.get_inputs(env)
        outs, out_addrs = self.outputs()
        env.update(zip(self.out_names, outs))
        if self.plan is None:
            self.plan = self._plan(list(ins) + list(outs))
            if self.plan is False:
                return self(env)
        self._launch(ins, out_addrs)

    def run(self, ins) -> list:
        """A planned batch (plan neither None nor False): `ins` in get_inputs' order -> the outputs in
        out_names' order (the generated code's call: wrapper.py)."""
        outs, out_addrs = self.outputs()
        self._launch(ins, out_addrs)
        return outs

    def _launch(self, ins, out_addrs):
        by_slot = [t.data_ptr() for t in ins] + out_addrs
        n, k = len(self.members), self.nptr
        addrs = [0] * (n * k)
        for j in range(k):
            addrs[j::k] = by_slot[j * n:(j + 1) * n]
        self.launch.batch(self.plan, addrs)

    def _plan(self, by_slot):
        n, metas, tensors = len(self.members), [], []
        for q, m in enumerate(self.members):
            ts = by_slot[q::n]
            metas.append(m.build_meta(ts))
            tensors += ts
        try:
            return self.launch.batch_plan(metas, tensors)
        except LayoutMismatch:
            raise
        except Exception as e:       # e.g. the batch entry does not compile: correct, only slower
            warnings.warn("fusebackend: a horizontal batch runs as %d launches (%s: %s)"
                          % (len(self.members), type(e).__name__, str(e).splitlines()[0] if str(e) else ""))
            return False


class Outputs:
    """Every member's outputs. Contiguous outputs of one dtype come from one allocation, each at an ALIGN-byte
    offset; when they also share their trailing dims, one split along dim 0 makes them all (no view per
    output). Outputs listed in `own` (the graph's outputs: eager returns them as separate tensors, at offset
    0, and Dynamo's guards on the next call see the difference) and any other layout are allocated each on
    their own. Calling returns (tensors, their addresses), in `allocs` order."""

    def __init__(self, allocs: list, device, own=()):
        self.allocs, self.device = allocs, device
        own = set(own)
        self.own = [k for k in range(len(allocs)) if k in own]
        self.shared = [k for k in range(len(allocs)) if k not in own]
        self.pool = _Shared([allocs[k] for k in self.shared], device) if len(self.shared) >= 2 else None
        if self.pool is None or self.pool.mode == "each":
            self.pool, self.own, self.shared = None, list(range(len(allocs))), []
        self.mode = self.pool.mode if self.pool is not None and not self.own else ("each" if self.pool is None
                                                                                      else "mixed")

    def __call__(self):
        if self.pool is None:
            outs = [torch.empty_strided(s, st, dtype=dt, device=self.device) for s, st, dt in self.allocs]
            return outs, [t.data_ptr() for t in outs]
        shared, addrs = self.pool()
        if not self.own:
            return shared, addrs
        outs, ptrs = [None] * len(self.allocs), [0] * len(self.allocs)
        for k, t, a in zip(self.shared, shared, addrs):
            outs[k], ptrs[k] = t, a
        for k in self.own:
            s, st, dt = self.allocs[k]
            t = outs[k] = torch.empty_strided(s, st, dtype=dt, device=self.device)
            ptrs[k] = t.data_ptr()
        return outs, ptrs


class _Shared:
    """Outputs from one allocation (mode "rows" or "flat"), or "each" where their layouts do not allow it."""

    def __init__(self, allocs: list, device):
        self.allocs, self.device = allocs, device
        self.mode = "each"
        if not allocs or len({dt for _, _, dt in allocs}) != 1:
            return
        if not all(_is_contiguous(s, st) for s, st, _ in allocs):
            return
        self.dtype = allocs[0][2]
        size = self.dtype.itemsize
        align = max(1, ALIGN // size)
        shapes = [tuple(s) for s, _, _ in allocs]
        numels = [_numel(s) for s in shapes]
        if all(len(s) >= 1 for s in shapes) and len({s[1:] for s in shapes}) == 1 and \
                all(n % align == 0 for n in numels):
            self.mode = "rows"
            self.shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
            self.rows = [s[0] for s in shapes]
            pads = [0] * len(numels)
        else:
            self.mode = "flat"
            pads = [-n % align for n in numels]
            self.pieces = [v for n, p in zip(numels, pads) for v in (n, p)]
            self.total = sum(self.pieces)
            self.shapes = shapes
        self.offsets, off = [], 0
        for n, p in zip(numels, pads):
            self.offsets.append(off * size)
            off += n + p

    def __call__(self):
        if self.mode == "rows":
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            outs = buf.unsafe_split_with_sizes(self.rows)    # not autograd views: cheaper, and disjoint
        else:
            buf = torch.empty(self.total, dtype=self.dtype, device=self.device)
            parts = buf.unsafe_split_with_sizes(self.pieces)
            outs = [parts[2 * k].view(s) for k, s in enumerate(self.shapes)]
        base = buf.data_ptr()
        return outs, [base + o for o in self.offsets]


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _is_contiguous(shape, stride):
    expected = 1
    for s, st in reversed(list(zip(shape, stride))):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def batchable(step) -> bool:
    return type(step) is KernelStep and bool(step.spec.batch_name) and hasattr(step.launch, "batch")
