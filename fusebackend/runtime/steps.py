"""Program steps: a fused-kernel launch, an ATen call (opaque ops, views, fallback groups)."""
from __future__ import annotations

import ctypes

import torch

from ..graph.fusion_graph import Ref


def resolver(value):
    """A function env -> python value for an arg that may hold Refs (built once, called per step)."""
    if isinstance(value, Ref):
        name, item = value.name, value.item
        if item is None:
            return lambda env: env[name]
        return lambda env: env[name][item]
    if isinstance(value, (list, tuple)):
        parts = [resolver(v) for v in value]
        if all(getattr(p, "const", False) for p in parts):
            return _const(value)
        if all(isinstance(v, Ref) and v.item is None or getattr(p, "const", False) for v, p in zip(value, parts)):
            return _flat(value)
        kind = type(value)
        return lambda env: kind(p(env) for p in parts)
    if isinstance(value, dict):
        parts = {k: resolver(v) for k, v in value.items()}
        return lambda env: {k: p(env) for k, p in parts.items()}
    return _const(value)


def _flat(value):
    """A list/tuple of plain Refs and constants (most ATen calls' args): one template copy per call."""
    template, slots, kind = list(value), [(i, v.name) for i, v in enumerate(value) if isinstance(v, Ref)], type(value)
    if len(slots) == len(template):
        names = [n for _, n in slots]
        return lambda env: kind([env[n] for n in names])

    def resolve(env):
        out = template.copy()
        for i, name in slots:
            out[i] = env[name]
        return kind(out)
    return resolve


def ref_names(value) -> set:
    """Names of the values an arg structure refers to."""
    if isinstance(value, Ref):
        return {value.name}
    if isinstance(value, (list, tuple)):
        return set().union(*(ref_names(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return ref_names(list(value.values()))
    return set()


def _const(v):
    f = lambda env: v
    f.const = True
    return f


class AtenStep:
    """Runs one FusionGraph node as its ATen op."""
    kind = "aten"

    def __init__(self, node):
        self.name, self.target = node.name, node.target
        # an OpOverload's __call__ only forwards to its C++ callable: call that one directly
        self.call = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
        self.args, self.kwargs = resolver(node.args), resolver(node.kwargs)
        self.reads = ref_names((node.args, node.kwargs))

    def __call__(self, env):
        env[self.name] = self.call(*self.args(env), **self.kwargs(env))


class LayoutMismatch(RuntimeError):
    """A run-time tensor does not have the layout the kernel was specialised for."""


class KernelStep:
    """Launches a compiled kernel: allocates its outputs, packs pointers and the size/stride array."""
    kind = "kernel"

    def __init__(self, spec, launch, out_metas, device):
        self.spec, self.launch = spec, launch
        self.ins = [resolver(r) for r in spec.inputs]
        self.out_names = list(spec.outputs)
        self.out_alloc = [(tuple(m.shape), tuple(m.stride), m.dtype) for m in out_metas]
        self.device = torch.device(device)
        self.meta = None          # built on the first call: shapes are static, strides are guarded

    def __call__(self, env):
        ins = [r(env) for r in self.ins]
        outs = [torch.empty_strided(s, st, dtype=dt, device=self.device) for s, st, dt in self.out_alloc]
        tensors = ins + outs
        meta = self.meta
        if meta is None:
            values = self.build_meta(tensors)
            pack = getattr(self.launch, "pack", None)
            meta = self.meta = pack(values) if pack else values
        self.launch(tensors, meta)
        for name, t in zip(self.out_names, outs):
            env[name] = t

    def build_meta(self, tensors, domain=None, scalars=()):
        spec = self.spec
        for slot, d in spec.unit_strides:
            t = tensors[slot]
            if t.shape[d] != 1 and t.stride(d) != 1:
                raise LayoutMismatch("operand %d dim %d has stride %d, kernel assumes 1" % (slot, d, t.stride(d)))
        for slot in spec.contiguous_slots:
            if not tensors[slot].is_contiguous():
                raise LayoutMismatch("operand %d is not contiguous" % slot)
        values = [int(s) for s in (spec.domain if domain is None else domain)]
        for t in tensors:
            values.extend(0 if sz == 1 else st for sz, st in zip(t.shape, t.stride()))
        values.extend(scalars)
        return values


class DynamicKernelStep(KernelStep):
    """A kernel over symbolic sizes, or reading symbolic ints: sizes, output shapes, the scalar arguments and
    the meta array are evaluated every call."""

    def __init__(self, spec, launch, out_metas, device, symbol_eval):
        super().__init__(spec, launch, out_metas, device)
        self.sym = symbol_eval
        self.scalars = [resolver(r) for r in getattr(spec, "scalars", ())]

    def __call__(self, env):
        values = self.sym.values(env)
        ins = [r(env) for r in self.ins]
        outs = []
        for shape, stride, dt in self.out_alloc:
            shape = self.sym.dims(shape, values)
            outs.append(torch.empty_strided(shape, self.sym.dims(stride, values), dtype=dt, device=self.device))
        scalars = [int(r(env)) for r in self.scalars]
        meta = self.build_meta(ins + outs, self.sym.dims(self.spec.domain, values), scalars)
        self.launch(ins + outs, meta)
        for name, t in zip(self.out_names, outs):
            env[name] = t


def cpu_launcher(lib, spec):
    """ctypes call of a C++ kernel: void k(void** ptrs, const int64_t* meta).

    `launch.pack` turns the meta list into the ctypes array once; KernelStep keeps the packed form.
    A horizontal batch (runtime/batch.py) calls `launch.batch_plan(metas, tensors)` once, then
    `launch.batch(plan, addrs)`: the kernel's batch entry, batch(P, M, nprob, nptr, nmeta)."""
    fn = getattr(lib, spec.name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = None
    flag = ctypes.c_int.in_dll(lib, "fb_index_error") if spec.checks_index else None

    def check():
        if flag.value:
            flag.value = 0
            raise IndexError("fusebackend: index out of range in self (an index tensor read by kernel %s "
                             "points outside its source, as eager reports)" % spec.name)

    def launch(tensors, meta):
        if isinstance(meta, list):
            meta = pack(meta)
        ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        fn(ptrs, meta)
        if flag is not None:
            check()

    def pack(values):
        return (ctypes.c_int64 * max(1, len(values)))(*values)
    launch.pack = pack
    if spec.batch_name:
        bfn = getattr(lib, spec.batch_name)
        bfn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        bfn.restype = None

        def batch_plan(metas, tensors):
            nmeta = max(len(m) for m in metas)
            return pack([v for m in metas for v in list(m) + [0] * (nmeta - len(m))]), len(metas), nmeta

        def batch(plan, addrs):
            meta, nprob, nmeta = plan
            bfn((ctypes.c_uint64 * len(addrs))(*addrs), meta, nprob, len(addrs) // nprob, nmeta)
            if flag is not None:
                check()
        launch.batch_plan, launch.batch = batch_plan, batch
    return launch
