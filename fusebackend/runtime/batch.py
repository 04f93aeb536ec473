"""A horizontal batch: several kernel launches (different operands and sizes, the same code or not) as one.

The step gathers its members' inputs (member 0's, then member 1's, ...), allocates their outputs (one
allocation where it can) and hands both to its plan, settled on the first call: on the CPU a `CpuBatch`
(runtime/cpu_batch.py: one parallel region, problems dealt to threads by bytes, each problem calling its own
kernel), on CUDA a `cuda_batch.BatchPlan` (one launch of the kernel's batch entry, or of a divergent kernel
holding every member kernel's body, with the pointer table cached across calls). `merge_batches` turns the
passes' batches into these steps.
"""
from __future__ import annotations

import operator
import warnings

import torch

from ..graph.fusion_graph import Ref
from .alloc import empty_strided_for
from .steps import KernelStep, LayoutMismatch

ALIGN = 16      # bytes: every output of a batch starts here, so 16-byte vector accesses stay valid


class BatchKernelStep:
    """Runs member KernelSteps (of one kernel or several) as one launch."""
    kind = "batch"

    def __init__(self, members: list, launch=None, own_storage=frozenset()):
        self.members = members
        self.launch = launch if launch is not None else members[0].launch
        self.device = members[0].device
        self.group_nodes = [n for m in members for n in m.group_nodes]
        self.nins = [len(m.ins) for m in members]
        self.chains = len({m.spec.source for m in members})
        self.in_refs = [r for m in members for r in m.spec.inputs]
        self.out_names = [name for m in members for name in m.out_names]
        if len(self.in_refs) >= 2 and all(isinstance(r, Ref) and r.item is None for r in self.in_refs):
            get = operator.itemgetter(*[r.name for r in self.in_refs])      # one C call for every input
        else:
            resolvers = [r for m in members for r in m.ins]
            get = lambda env: [r(env) for r in resolvers]
        self.get_inputs = get
        # graph outputs get storages of their own, as eager's do (Dynamo guards on aliasing and offsets);
        # intermediates share one allocation
        own = [k for k, name in enumerate(self.out_names) if name in own_storage]
        self.outputs = Outputs([a for m in members for a in m.out_alloc], self.device, own)
        self.plan = None
        self.batch_id = None      # the passes' Batch it runs (merge_batches)

    def describe(self) -> str:
        """How the batch runs, once planned (explain prints it under the batch)."""
        head = "%d problems of %d chain%s" % (len(self.members), self.chains, "s" * (self.chains > 1))
        if self.plan is None:
            return head + ": not run yet"
        if self.plan is False:
            return head + ": run one by one (no batch entry)"
        return head + ": " + self.plan.describe()

    def __call__(self, env):
        if self.plan is False:               # no batch entry could be built: the members, one by one
            for m in self.members:
                m(env)
            return
        ins = self.get_inputs(env)
        outs, out_addrs = self.outputs()
        env.update(zip(self.out_names, outs))
        if self.plan is None:
            self.plan = self._plan(list(ins), list(outs))
            if self.plan is False:
                return self(env)
        self.plan(ins, out_addrs)

    def run(self, ins) -> list:
        """A planned batch (plan neither None nor False): `ins` in in_refs' order -> the outputs in
        out_names' order (the generated code's call: wrapper.py)."""
        outs, out_addrs = self.outputs()
        self.plan(ins, out_addrs)
        return outs

    def _plan(self, ins, outs):
        metas, tensors, i, o = [], [], 0, 0
        for m in self.members:
            ts = ins[i:i + len(m.ins)] + outs[o:o + len(m.out_names)]
            i, o = i + len(m.ins), o + len(m.out_names)
            metas.append(m.build_meta(ts))
            tensors.append(ts)
        try:
            if self.members[0].spec.target == "cpu":
                from .cpu_batch import CpuBatch
                return CpuBatch([m.launch for m in self.members], metas, tensors, self.nins)
            from .cuda_batch import plan_batch
            from .cuda_compiler import compile_image
            return plan_batch([m.launch for m in self.members], metas, tensors, self.nins, compile_image)
        except LayoutMismatch:
            raise
        except Exception as e:       # e.g. the batch entry does not compile: correct, only slower
            warnings.warn("fusebackend: a horizontal batch runs as %d launches (%s: %s)"
                          % (len(self.members), type(e).__name__, str(e).splitlines()[0] if str(e) else ""))
            return False


def merge_batches(steps, batches, graph_outputs=frozenset()):
    """Replace the member steps of each horizontal batch by BatchKernelSteps (graph outputs keep storages of
    their own): one per batch on the CPU; on CUDA one per launch class of the members' kernels
    (emit/cuda_batch.launch_class), at most MAX_CHAINS kernels each. A batch that takes more than one step
    says why in its `launches` notes (explain prints them)."""
    from ..passes.horizontal_cost import MAX_CHAINS
    by_group = {getattr(s, "group_id", None): s for s in steps}
    replace = {}
    for b in batches:
        members = [by_group.get(gid) for gid in b.groups]
        members = [m for m in members if m is not None and batchable(m)]
        sets = launch_sets(members, MAX_CHAINS)
        made = [same for same in sets if len(same) >= 2]
        for same in made:
            step = BatchKernelStep(same, same[0].launch, graph_outputs)
            step.batch_id = getattr(b, "id", None)
            replace[id(same[0])] = step
            for m in same[1:]:
                replace[id(m)] = None
        if hasattr(b, "launches"):
            b.launches = ["%d launches: %s" % (len(sets), "; ".join(
                "%s: g%s" % (_class_label(same[0]), ", g".join(str(m.group_id) for m in same)) for same in sets))
                ] if len(sets) > 1 else []
    out = []
    for s in steps:
        r = replace.get(id(s), s)
        if r is not None:
            out.append(r)
    return out


def launch_sets(members: list, max_chains: int) -> list:
    """Members that can share one launch, in order: all of them on the CPU; on CUDA those of one launch class,
    at most max_chains distinct kernels a set."""
    if not members or members[0].spec.target != "cuda":
        return [members] if members else []
    from ..emit.cuda_batch import launch_class
    classes: dict = {}
    for m in members:
        classes.setdefault(launch_class(m.spec), []).append(m)
    sets = []
    for same in classes.values():
        cur, sources = [], set()
        for m in same:
            if m.spec.source not in sources and len(sources) >= max_chains:
                sets.append(cur)
                cur, sources = [], set()
            cur.append(m)
            sources.add(m.spec.source)
        sets.append(cur)
    return sets


def _class_label(step) -> str:
    shape, bound = step.spec.launch.get("shape"), step.spec.launch.get("bound")
    return "%s kernels (bound %s)" % (shape, bound)


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

    def layouts(self) -> list:
        """(sizes, strides) of each output, as every call makes them: read off one call's tensors."""
        return [(tuple(t.shape), t.stride()) for t in self()[0]]

    def __call__(self):
        if self.pool is None:
            empty = empty_strided_for(self.device)
            outs = [empty(s, st, dt) for s, st, dt in self.allocs]
            return outs, [t.data_ptr() for t in outs]
        shared, addrs = self.pool()
        if not self.own:
            return shared, addrs
        outs, ptrs = [None] * len(self.allocs), [0] * len(self.allocs)
        for k, t, a in zip(self.shared, shared, addrs):
            outs[k], ptrs[k] = t, a
        empty = empty_strided_for(self.device)
        for k in self.own:
            s, st, dt = self.allocs[k]
            t = outs[k] = empty(s, st, dt)
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
    """A static kernel step a batch can run: on the CPU any (cpu_batch calls its function), on CUDA one with a
    batch entry."""
    if type(step) is not KernelStep:
        return False
    if step.spec.target == "cpu":
        return hasattr(step.launch, "fast_call") and hasattr(step.launch, "pack")
    return bool(step.spec.batch_name) and hasattr(step.launch, "upload")
