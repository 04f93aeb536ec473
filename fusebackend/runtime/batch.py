"""A horizontal batch: several launches of one kernel (different operands and sizes) as a single launch."""
from __future__ import annotations

import torch

from .steps import KernelStep


class BatchKernelStep:
    """Runs member KernelSteps that share one kernel through its batch entry point.

    Outputs of one dtype are carved from a single allocation (one allocator call instead of one per member);
    pointers and the concatenated size/stride arrays are packed once where possible."""
    kind = "batch"

    def __init__(self, members: list, launch):
        self.members = members
        self.launch = launch
        self.nptr = members[0].spec.num_operands
        self.meta = None
        self.nmeta = 0
        first = members[0]
        self.device = first.device
        outs = [alloc for m in members for alloc in m.out_alloc]
        self.flat_ok = all(_is_contiguous(s, st) for s, st, _ in outs) and len({dt for _, _, dt in outs}) == 1
        self.sizes = [_numel(s) for s, _, _ in outs]
        self.shapes = [s for s, _, _ in outs]
        self.dtype = outs[0][2]
        self.total = sum(self.sizes)
        self.group_nodes = [n for m in members for n in m.group_nodes]

    def __call__(self, env):
        ins_all = [[r(env) for r in m.ins] for m in self.members]
        outs = self.allocate()
        k = 0
        tensors = []
        per_member = []
        for m, ins in zip(self.members, ins_all):
            mo = outs[k:k + len(m.out_names)]
            k += len(m.out_names)
            tensors.extend(ins)
            tensors.extend(mo)
            per_member.append(ins + mo)
            for name, t in zip(m.out_names, mo):
                env[name] = t
        if self.meta is None:
            values = []
            for m, ts in zip(self.members, per_member):
                mv = m.build_meta(ts)
                self.nmeta = len(mv)
                values.extend(mv)
            self.meta = self.launch.pack(values)
        ptrs = self.launch.batch_pointers([t.data_ptr() for t in tensors])
        self.launch.batch(ptrs, self.meta, len(self.members), self.nptr, self.nmeta)

    def allocate(self):
        if self.flat_ok:
            flat = torch.empty(self.total, dtype=self.dtype, device=self.device)
            return [p.view(s) for p, s in zip(flat.split(self.sizes), self.shapes)]
        return [torch.empty_strided(s, st, dtype=dt, device=self.device)
                for m in self.members for s, st, dt in m.out_alloc]


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
    return type(step) is KernelStep and hasattr(step.launch, "batch")
