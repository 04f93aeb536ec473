"""options={"cudagraphs": True}: the whole Program (fused kernels and ATen calls) replayed as one CUDA graph.

Call 1 runs the Program as is (warm-up: kernels load, launch shapes and layouts are fixed, lazy ATen state is
made). Call 2 captures it into a torch.cuda.CUDAGraph; every later call with the same input shapes, strides
and dtypes copies the inputs into the captured (static) buffers and replays the graph.

Inputs: an input passed with the same storage on calls 1 and 2 (a parameter, a buffer, a KV cache) is
captured in place and never copied; if a later call passes other storage for it, it gets a static buffer of
its own and the graph is captured again (once). Every other input is copied into its static buffer before
each replay, unless the caller passes that buffer itself. A change of shape, stride or dtype captures anew
(the earlier graph and its pool are dropped).

Outputs: the static output tensors of the graph are returned, not copies, as Inductor's CUDA graphs do: the
next call of the same compiled graph overwrites them. Clone what must outlive the next call (set
`clone_outputs = True` on the program to have every output cloned). Each capture has its own private
memory pool (a pool shared with a graph that is later dropped trips an allocator assertion in PyTorch).

A program that cannot be captured (CPU work, host synchronisation) runs uncaptured from then on, with one
warning.
"""
from __future__ import annotations

import warnings

import torch


def _sig(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
    return ("V", type(v).__name__, v if isinstance(v, (int, float, bool, str, type(None))) else id(v))


def _copyable(t: torch.Tensor) -> bool:
    """A static buffer of the same strides can be filled with copy_ (a CUDA tensor, no overlapping elements)."""
    if not t.is_cuda:
        return False
    dense = getattr(torch._C, "_is_non_overlapping_and_dense", None)
    try:
        return bool(dense(t)) if dense is not None else t.is_contiguous()
    except Exception:
        return False


class CudaGraphProgram:
    """Wraps a Program; called boxed (a list of inputs that it clears), like the Program itself."""
    _boxed_call = True

    def __init__(self, program):
        self.program = program
        self.clone_outputs = False
        self.disabled = False
        self._reset(None)

    # state of one input signature
    def _reset(self, sig):
        self.sig = sig
        self.calls = 0
        self.first_ptrs = None
        self.in_place = set()        # input positions captured in place (same storage on calls 1 and 2)
        self.demoted = set()         # positions that changed storage after capture: always copied
        self.graph = None
        self.static_in = None
        self.static_out = None
        self.in_place_ptrs = {}

    def __getattr__(self, name):     # steps, fg, outputs ... of the wrapped program (dump, explain)
        program = self.__dict__.get("program")
        if program is None:
            raise AttributeError(name)
        return getattr(program, name)

    def __call__(self, args):
        inputs = list(args)
        if isinstance(args, list):      # boxed: the caller's list is ours to clear
            args.clear()
        return self._call(inputs)

    def _call(self, args):
        if self.disabled:
            return self.program(args)
        sig = tuple(_sig(a) for a in args)
        if sig != self.sig:
            self._reset(sig)
        if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return self.program(args)
        self.calls += 1
        if self.calls == 1:                       # warm-up, uncaptured
            self.first_ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
            return self.program(list(args))
        if self.graph is None:
            return self._capture(args)
        return self._replay(args)

    def _capture(self, args):
        self.in_place = set()
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            same = self.first_ptrs is not None and a.data_ptr() == self.first_ptrs[i]
            if (same and i not in self.demoted) or not _copyable(a):
                self.in_place.add(i)
        static = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in self.in_place:
                buf = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                buf.copy_(a)
                static.append(buf)
            else:
                static.append(a)
        self.in_place_ptrs = {i: args[i].data_ptr() for i in self.in_place}
        graph = torch.cuda.CUDAGraph()
        self.graph = None               # the previous graph (if any) goes with its own private pool
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                outs = self.program(list(static))
        except torch.OutOfMemoryError:  # not a property of the program: raised as is, the next call captures
            self.graph, self.calls = None, 1
            raise
        except Exception as e:
            warnings.warn("fusebackend: CUDA graph capture failed (%s: %s); this graph runs uncaptured"
                          % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""))
            self.disabled = True
            self.graph = None
            return self.program(list(args))
        self.graph, self.static_in, self.static_out = graph, static, outs
        graph.replay()                           # the capture itself computed nothing
        return self._outputs()

    def _replay(self, args):
        static = self.static_in
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            if i in self.in_place:
                if a.data_ptr() != self.in_place_ptrs[i]:     # other storage now: copy it from now on
                    self.demoted.add(i)
                    self.graph = None
                    return self._capture(args)
                continue
            buf = static[i]
            if a.data_ptr() != buf.data_ptr():
                buf.copy_(a)
        self.graph.replay()
        return self._outputs()

    def _outputs(self):
        outs = self.static_out
        if self.clone_outputs:
            return [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return list(outs)
