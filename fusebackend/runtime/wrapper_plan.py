"""What the generated function (wrapper.py) does differently from the step list, decided before any text.

Two things make tensors the step list makes, where the generated code needs none:
- a view that only kernels read: the kernels are handed its address (base address + offset), no tensor is made
  (`elided`);
- a kernel output that is only read through views of one dense layout (mm's 2-d view of a 3-d activation): it
  is allocated in that layout, the first such view is that tensor, and others of the same layout are that tensor
  too (`alloc_as`).
Each changes which local keeps which storage alive, so the reads and the last uses (`frees`) are computed here
over the values that really hold the memory. A call that ends interpreted (Program._resume) gets back the
values the function never made (`rebuild`).
"""
from __future__ import annotations

from ..graph import registry
from ..graph.fusion_graph import Ref
from .batch import BatchKernelStep
from .steps import AtenStep, KernelStep
from .views import ViewStep


class Plan:
    def __init__(self, program, keep: set):
        self.p, self.keep = program, keep
        steps = program.steps
        self.readers: dict = {}
        for i, r in enumerate(program.reads):
            for n in r:
                self.readers.setdefault(n, []).append(i)
        self.view_of = {s.name: s for s in steps if type(s) is ViewStep}
        self.elided: dict = {}       # view name -> its ViewStep
        self.alloc_as: dict = {}     # kernel output -> the view (name) whose layout and local it takes
        self.same: dict = {}         # view name -> the view whose tensor it is (one layout of one output)
        for s in reversed(steps):     # readers first: a view read only by kernels and such views
            if self._plain_view(s) and s.name not in keep and self.readers.get(s.name) and \
                    all(self.inline_kernel(steps[i]) or self._address_of(steps[i], s.name)
                        for i in self.readers[s.name]):
                self.elided[s.name] = s
        self.elided = dict(reversed(list(self.elided.items())))        # step order: bases first
        for s in steps:
            if type(s) is KernelStep and s.meta is not None:
                for name, alloc in zip(s.out_names, s.out_alloc):
                    self._take_view_layout(name, alloc)
        self.reads = [{self.holder(n) for n in r} for r in program.reads]
        last = {}
        for i, r in enumerate(self.reads):
            for n in r:
                last[n] = i
        fg = program.fg
        self.frees = [[] for _ in steps]
        for n, i in last.items():
            if n not in keep and n in fg.g and fg.node(n).kind != "symbol":
                self.frees[i].append(n)

    @staticmethod
    def inline_kernel(s) -> bool:
        """A settled static kernel launched from its operands' addresses (the CPU's: launch_ext or ctypes)."""
        return type(s) is KernelStep and s.meta is not None and hasattr(s.launch, "fast_call")

    def _address_of(self, s, base) -> bool:
        return type(s) is ViewStep and s.name in self.elided and s.base_name == base and s.base_item is None

    @staticmethod
    def _plain_view(s) -> bool:
        return type(s) is ViewStep and s.planned and s.plan is not None

    def holder(self, name) -> str:
        """The value whose local keeps `name`'s storage alive in the generated function."""
        while True:
            if name in self.elided:
                name = self.elided[name].base_name
            elif name in self.alloc_as:
                name = self.alloc_as[name]
            elif name in self.same:
                name = self.same[name]
            else:
                return name

    def _take_view_layout(self, name, alloc):
        if name in self.keep:
            return
        shape, stride, _ = alloc
        steps = self.p.steps
        views = []
        for i in self.readers.get(name, []):
            s = steps[i]
            if self.inline_kernel(s) or self._address_of(s, name):
                continue
            if not (self._plain_view(s) and s.base_name == name and s.base_item is None):
                return                            # another tensor reader: the output keeps its own layout
            views.append(s)
        first = next((v for v in views if v.name not in self.keep and v.plan[4] == 0 and _dense(v.plan[2], v.plan[3])
                      and _numel(v.plan[2]) == _numel(shape)), None)
        if first is None or not _dense(shape, stride):
            return
        self.alloc_as[name] = first.name
        for v in views:
            if v is not first and v.name not in self.keep and v.plan[2:] == first.plan[2:] and \
                    all(self._reads_only(steps[i]) for i in self.readers.get(v.name, [])):
                self.same[v.name] = first.name

    def internal(self, name) -> bool:
        """A value no one outside sees and no reader writes through: it need not be a view in autograd's
        sense (its own version counter, no _base), only the same storage, sizes and strides."""
        return name not in self.keep and all(self._reads_only(self.p.steps[i]) for i in self.readers.get(name, []))

    def _reads_only(self, s) -> bool:
        """A reader that cannot tell two names of one tensor object apart (it writes no argument): our kernels,
        a batch of them included, read and write through addresses, never through autograd's view metadata."""
        return (self.inline_kernel(s) or type(s) is BatchKernelStep
                or (isinstance(s, AtenStep) and not registry.is_ordered(s.target)))

    def rebuild(self) -> list:
        """(name, make(env) -> value or None), in order: the values a resumed call needs that the generated
        function never made -- outputs allocated as one of their views, then views passed as addresses."""
        out = []
        for name, view in self.alloc_as.items():
            meta = self.p.fg.node(name).meta
            out.append((name, _as_strided_of(view, tuple(meta.shape), tuple(meta.stride))))
        for name, view in self.same.items():
            out.append((name, lambda env, v=view: env.get(v)))
        for name, step in self.elided.items():
            out.append((name, lambda env, s=step: s.run(env[s.base_name]) if s.base_name in env else None))
        return out


def _as_strided_of(view, shape, stride):
    return lambda env: env[view].as_strided(shape, stride, 0) if view in env else None


def kernel_input(plan, ref):
    """('address', view) for a view passed as an address, ('tensor', holder) for a plain Ref, None otherwise."""
    if not isinstance(ref, Ref) or ref.item is not None:
        return None
    if ref.name in plan.elided:
        return "address", ref.name
    return "tensor", plan.holder(ref.name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dense(shape, stride) -> bool:
    """Every element of the extent once: strides, smallest first, are the products of the sizes below them."""
    expect = 1
    for st, sz in sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True
