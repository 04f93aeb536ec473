"""Program steps: a fused-kernel launch, an ATen call (opaque ops, views, fallback groups)."""
from __future__ import annotations

import ctypes
import functools

import torch

from ..graph.fusion_graph import Ref
from .alloc import empty_strided_for
from .symbols import names_in


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


# Ops whose generated Python binding (torch.<op> or Tensor.<op>) runs exactly this overload for the args the
# graph passes (the schema's own, in its order): unboxed, it skips the OpOverload's C++ callable's conversion of
# every argument through the schema (on the loaded 2-core box: a view 3.4 vs 6.1 us, a 32x64 @ 64x64 mm 7.4 vs 9.7)
_BINDINGS = {"mm.default", "bmm.default", "addmm.default", "baddbmm.default", "mv.default", "addmv.default",
             "convolution.default", "cat.default", "embedding.default", "index_select.default", "topk.default",
             "_scaled_dot_product_flash_attention_for_cpu.default", "_scaled_dot_product_flash_attention.default",
             "_scaled_dot_product_efficient_attention.default", "_scaled_dot_product_cudnn_attention.default",
             "view.default", "permute.default", "expand.default", "t.default", "unsqueeze.default",
             "transpose.int", "select.int", "clone.default"}


def direct_callable(target):
    """(fastest callable, the OpOverload's own C++ callable) for an FX target."""
    if not isinstance(target, torch._ops.OpOverload):
        return target, target
    op = target._op          # an OpOverload's __call__ only forwards to its C++ callable: that one directly
    name = "%s.%s" % (target._schema.name.split("::")[-1], target._overloadname)
    if target.namespace == "aten" and name in _BINDINGS:
        base = name.split(".")[0]
        binding = getattr(torch._C._VariableFunctions, base, None) or getattr(torch.Tensor, base, None)
        if binding is not None:
            return binding, op
    return op, op


class AtenStep:
    """Runs one FusionGraph node as its ATen op."""
    kind = "aten"

    def __init__(self, node):
        self.name, self.target = node.name, node.target
        self.call, self.op_call = direct_callable(node.target)
        self.args, self.kwargs = resolver(node.args), resolver(node.kwargs)
        self.node_args, self.node_kwargs = node.args, node.kwargs      # for the generated code (wrapper.py)
        self.reads = ref_names((node.args, node.kwargs))

    def __call__(self, env):
        env[self.name] = self.invoke(self.args(env), self.kwargs(env))

    def invoke(self, args, kwargs):
        try:
            return self.call(*args, **kwargs)
        except TypeError:        # the binding's parser refused these args (nothing ran): the overload's own
            if self.call is self.op_call:
                raise
            self.call = self.op_call
            return self.call(*args, **kwargs)


class LayoutMismatch(RuntimeError):
    """A run-time tensor does not have the layout the kernel was specialised for."""


class KernelStep:
    """Launches a compiled kernel: allocates its outputs, packs pointers and the size/stride array."""
    kind = "kernel"

    def __init__(self, spec, launch, out_metas, device):
        self.spec, self.launch = spec, launch
        self.ins = [resolver(r) for r in spec.inputs]
        self.out_names = list(spec.outputs)
        # what each output is: (sizes, strides, dtype) of a fresh tensor. The interpreter (new_outputs) and the
        # generated code (wrapper.py: _Writer.outputs) both allocate from this list and nothing else
        self.out_alloc = [(tuple(m.shape), tuple(m.stride), m.dtype) for m in out_metas]
        self.device = torch.device(device)
        self.meta = None          # built on the first call: shapes are static, strides are guarded

    def __call__(self, env):
        tensors = [r(env) for r in self.ins] + self.new_outputs()
        meta = self.meta
        if meta is None:
            meta = self.settle(tensors)
        self.launch(tensors, meta)
        env.update(zip(self.out_names, tensors[len(self.ins):]))

    def new_outputs(self) -> list:
        dev = self.device
        return [torch.empty_strided(s, st, dtype=dt, device=dev) for s, st, dt in self.out_alloc]

    def settle(self, tensors):
        """First call: check the layout the kernel assumed and pack its meta array (kept for later calls)."""
        values = self.build_meta(tensors)
        pack = getattr(self.launch, "pack", None)
        self.meta = pack(values) if pack else values
        return self.meta

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

    MEMO = 64         # settled launches kept per step (token counts of an MoE expert: a few dozen at most)

    def __init__(self, spec, launch, out_metas, device, symbol_eval):
        super().__init__(spec, launch, out_metas, device)
        self.sym = symbol_eval
        self.scalars = [resolver(r) for r in getattr(spec, "scalars", ())]
        # the symbols the output layouts and the domain read: with the inputs' sizes and strides and the
        # scalars they determine everything build_meta computes, so a call that repeats them reuses its result
        dims = [d for shape, stride, _ in self.out_alloc for d in (*shape, *stride)] + list(spec.domain)
        self.needed = sorted(set().union(*map(names_in, dims)))
        self.memo: dict = {}      # key -> (output allocs, packed meta, fast launch or None)

    def __call__(self, env):
        values = self.sym.values(env)
        ins = [r(env) for r in self.ins]
        scalars = tuple(int(r(env)) for r in self.scalars)
        key = (tuple(values[n] for n in self.needed), tuple((t.shape, t.stride()) for t in ins), scalars)
        hit = self.memo.get(key)
        if hit is None:
            hit = self._settle_call(ins, values, scalars)
            if len(self.memo) >= self.MEMO:
                self.memo.clear()
            self.memo[key] = hit
        allocs, meta, fast = hit
        empty = empty_strided_for(self.device)
        outs = [empty(s, st, dt) for s, st, dt in allocs]
        if fast is None:
            self.launch(ins + outs, meta)
        else:                    # launch_ext's C call: it reads the operands' pointers itself
            fast[1](fast[2], fast[3], *ins, *outs)
            if fast[4] is not None:
                fast[5]()
        for name, t in zip(self.out_names, outs):
            env[name] = t

    def key_sources(self) -> list:
        """Where each of `needed` comes from, for the generated code's memo key (wrapper.py): ("int",
        placeholder) for a SymInt input, ("dim", value, item, dim) for a size read off a tensor."""
        return [("int", self.sym.symbols[n]) if n in self.sym.symbols else ("dim",) + tuple(self.sym.sources[n])
                for n in self.needed]

    def _settle_call(self, ins, values, scalars):
        """A call of sizes not seen before: output layouts, the checked and packed meta, how to launch."""
        dims = self.sym.dims
        allocs = [(dims(shape, values), dims(stride, values), dt) for shape, stride, dt in self.out_alloc]
        outs = [torch.empty_strided(s, st, dtype=dt, device=self.device) for s, st, dt in allocs]
        meta = self.build_meta(ins + outs, dims(self.spec.domain, values), list(scalars))
        pack = getattr(self.launch, "pack", None)
        meta = pack(meta) if pack else meta
        fast = getattr(self.launch, "fast_call", None)
        fast = fast(meta, len(ins) + len(outs)) if fast is not None and pack else None
        return allocs, meta, fast if fast is not None and fast[0] == "ext" else None


def cpu_launcher(lib, spec, ext=None):
    """ctypes call of a C++ kernel: void k(void** ptrs, const int64_t* meta).

    `launch.pack` turns the meta list into the ctypes array once; KernelStep keeps the packed form.
    `launch.fast_call(meta, n)`: how the generated code (wrapper.py) launches it with n operands:
    ("ext", launch, kernel address, meta address, flag, check): one call of launch_ext's C function, which
    reads the operands' pointers itself (`ext`: that module, where it could be built); else ("ctypes",
    pointer array, fn, meta, flag, check): an array of that call site's own, filled with data_ptr() reads.
    A horizontal batch (runtime/batch.py) calls `launch.batch_plan(metas, tensors)` once, then
    `launch.batch(plan, addrs)`: the kernel's batch entry, batch(P, M, nprob, nptr, nmeta).
    The functions have no argtypes: they are only ever passed ctypes arrays (by address), which skips
    ctypes' per-argument conversion; a Python int would go as a C int, so none is passed."""
    fn = lib[spec.name]
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
        fn(_pointer_array(len(tensors))(*map(_data_ptr, tensors)), meta)
        if flag is not None:
            check()

    def pack(values):
        return (ctypes.c_int64 * max(1, len(values)))(*values)

    def fast_call(meta, n):
        if ext is not None:
            return "ext", ext.launch, ctypes.cast(fn, ctypes.c_void_p).value, ctypes.addressof(meta), flag, check
        return "ctypes", _pointer_array(n)(), fn, meta, flag, check
    launch.pack, launch.fast_call = pack, fast_call
    if spec.batch_name:
        bfn = lib[spec.batch_name]
        bfn.restype = None

        def batch_plan(metas, tensors):
            nmeta = max(len(m) for m in metas)
            values = pack([v for m in metas for v in list(m) + [0] * (nmeta - len(m))])
            nptr = len(tensors) // len(metas)
            return values, ctypes.c_int64(len(metas)), ctypes.c_int64(nptr), ctypes.c_int64(nmeta)

        def batch(plan, addrs):
            meta, nprob, nptr, nmeta = plan
            bfn(_addr_array(len(addrs))(*addrs), meta, nprob, nptr, nmeta)
            if flag is not None:
                check()
        launch.batch_plan, launch.batch = batch_plan, batch
    return launch


_data_ptr = torch.Tensor.data_ptr


@functools.lru_cache(maxsize=None)
def _pointer_array(n):
    return ctypes.c_void_p * n


@functools.lru_cache(maxsize=None)
def _addr_array(n):
    return ctypes.c_uint64 * n
