"""Channels-last convolutions: a graph's 2-D convolutions read and write NHWC memory, and so does the work
between them.

cuDNN runs half-type (and many float32) convolutions much faster on channels-last tensors; in NCHW it transposes
internally or picks slower kernels (small_cnn at bench size, bf16 on the H200: 2.32x slower than TorchInductor,
which runs them channels-last). A pass: FusionGraph -> FusionGraph (in place); it decides and rewrites metadata,
nothing runs.

Whether: `decide` follows the heuristic of TorchInductor's layout optimisation (torch/_inductor/graph.py,
GraphLowering.decide_layout_opt, torch 2.13), which does not look at the dtype:
- no 2-D convolution, symbolic conv sizes, or a graph of 300 or more nodes per convolution: no;
- inference graphs: each convolution's FLOPs weighted by the channels-last speedup PyTorch benchmarked for
  its class (grouped 1.358, few channels 0.783, in-channels >= 2x out-channels 0.725, other 0.823); yes
  when the weighted sum does not exceed the plain one;
- training graphs: no if any convolution is grouped (groups > 1, more than one in-channel per group) or
  has at least twice as many in- as out-channels (kernel > 1x1), or if every convolution has <= 64 in- and
  out-channels; else yes.
Only on CUDA under `conv_layout="auto"`. Inductor also goes channels-last on the CPU whenever oneDNN is
available, but its CPU kernels are its own oneDNN-fused convolutions and C++ loops vectorised over channels;
ours walk the logical NCHW order, so an NHWC epilogue loses its unit-stride inner loop there. Unmeasured,
so auto leaves CPU graphs as they are; `conv_layout="channels_last"` forces the rewrite on any device (and
"contiguous" turns it off).

How: values are given channels-last strides (their TensorMeta), which every kernel reads through (run-time
strides, unit-stride dims checked once by the runtime) and allocates its outputs with:
- a convolution's input and weight: the pointwise node computing them writes NHWC directly; any other value
  (a graph input, a weight, a view) gets a clone(memory_format=channels_last) node, a copy kernel;
- a convolution's output, and from there forward every pointwise node with a channels-last operand of its
  own shape, and the first output of the ATen ops that keep their input's memory format on CPU and CUDA
  (batch norm, max/avg pooling): what ATen itself would return for NHWC input, so a group that falls back to
  ATen agrees with the metadata;
- strided views (slice, select, permute, ...) of a channels-last value whose readers are all kernels (or
  more such views): their strides are re-derived from the channels-last base, so the kernels read NHWC memory
  through them (a max pool rewritten to slices, graph/pools.py: no NCHW copy before it);
- where a channels-last value reaches a graph output, another view or another ATen call, a
  clone(memory_format=contiguous_format) node restores eager's layout (outputs keep eager's strides: Dynamo
  and the backward graph were traced with them). Reductions read any layout and keep their outputs'.
"""
from __future__ import annotations

import torch

from ..graph import registry
from ..graph.fusion_graph import FusionGraph, OpNode, Ref, TensorMeta, ref_names_in
from .pattern_types import tensor_args

aten = torch.ops.aten
CONV = aten.convolution.default
CLONE = aten.clone.default
MODES = ("auto", "channels_last", "contiguous")

# ATen ops whose first output (and, for max pooling, its indices) takes the memory format of the first
# input on both the CPU and CUDA (native batch norm and pooling allocate with suggest_memory_format)
FOLLOWS = {"_native_batch_norm_legit_no_training": (0,), "_native_batch_norm_legit_functional": (0,),
           "_native_batch_norm_legit": (0,), "native_batch_norm": (0,), "max_pool2d_with_indices": (0, 1),
           "avg_pool2d": (None,)}
# ATen calls that read any layout and whose output layout does not come from it (copy_ writes its destination)
AGNOSTIC = {"copy_"}

# channels-last / NCHW time of a convolution class, as benchmarked for Inductor (torchbench conv inputs)
_MULTIPLIER = {"grouped": 1.358, "small": 0.783, "in_out": 0.725, "default": 0.823}
_MAX_NODES_PER_CONV = 300
# views whose output strides follow from any input strides (no reshape, which may need a copy)
STRIDE_VIEWS = {"slice", "select", "permute", "transpose", "unsqueeze", "squeeze", "expand", "alias"}


def _op(node) -> str:
    return getattr(node.target, "__name__", "").split(".")[0]


def convolutions(fg: FusionGraph) -> list:
    """The 2-D convolutions (4-D activation and weight) of the graph, in order."""
    out = []
    for n in fg.nodes():
        if n.kind == "opaque" and n.target is CONV and n.meta is not None and n.meta.rank == 4:
            x, w = (fg.meta_of(a) if isinstance(a, Ref) else None for a in n.args[:2])
            if x is not None and w is not None and x.rank == 4 and w.rank == 4:
                out.append(n)
    return out


def conv_class(fg: FusionGraph, conv) -> str:
    """grouped | small | in_out | default: the classes whose channels-last speedup differs."""
    w = fg.meta_of(conv.args[1]).shape
    if conv.args[8] > 1 and w[1] > 1:
        return "grouped"
    if w[0] <= 64 and w[1] <= 64:
        return "small"
    if w[0] * 2 <= w[1] and w[2] > 1:
        return "in_out"
    return "default"


def _flops(fg: FusionGraph, conv) -> int:
    # multiply-adds per output element: in-channels per group x kernel area (a transposed conv per input element)
    w = fg.meta_of(conv.args[1]).shape
    per = w[1] * w[2] * w[3]
    elems = fg.meta_of(conv.args[0]).numel if conv.args[6] else conv.meta.numel
    return 2 * per * elems


def decide(fg: FusionGraph, mode: str = "auto", training: bool = False) -> bool:
    """Whether the graph's convolutions should run channels-last (see the module docstring for the rule)."""
    if mode not in MODES:
        raise ValueError("conv_layout must be one of %s, got %r" % (", ".join(MODES), mode))
    if mode == "contiguous":
        return False
    convs = convolutions(fg)
    if not convs:
        return False
    if any(not fg.meta_of(a).is_static for c in convs for a in c.args[:2]) or not all(c.meta.is_static for c in convs):
        return False                          # the runtime checks layouts once: symbolic strides stay NCHW
    if mode == "channels_last":
        return True
    if any(c.device != "cuda" for c in convs):
        return False
    if len(fg) >= _MAX_NODES_PER_CONV * len(convs):
        return False                          # a few convolutions in a large graph: copies would outweigh them
    classes = [conv_class(fg, c) for c in convs]
    if not training:
        flops = [_flops(fg, c) for c in convs]
        return sum(f * _MULTIPLIER[k] for f, k in zip(flops, classes)) <= sum(flops)
    if "grouped" in classes or "in_out" in classes:
        return False
    return not all(k == "small" for k in classes)


def channels_last_meta(meta: TensorMeta) -> TensorMeta:
    """meta with the strides torch gives a channels-last tensor of its shape."""
    t = torch.empty(meta.shape, dtype=meta.dtype, device="meta").to(memory_format=torch.channels_last)
    return TensorMeta(tuple(meta.shape), meta.dtype, tuple(t.stride()), meta.device, bool(t.is_contiguous()))


def is_channels_last(meta: TensorMeta) -> bool:
    t = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
    return t.is_contiguous(memory_format=torch.channels_last)


def _eligible(meta) -> bool:
    # a plain NCHW value: the only layout this pass converts, and the one it restores
    return meta is not None and meta.rank == 4 and meta.is_static and meta.contiguous


def to_channels_last(fg: FusionGraph, mode: str = "auto", training: bool = False) -> FusionGraph:
    """The rewrite, where `decide` says so: returns fg (changed in place)."""
    if not decide(fg, mode, training):
        return fg
    convs = convolutions(fg)
    conv_names = {c.name for c in convs}
    # conv inputs that a pointwise kernel computes: that kernel writes them NHWC (no copy)
    seeds = set()
    for c in convs:
        for a in c.args[:2]:
            p = fg.node(a.name)
            if (a.item is None and p.kind == "pointwise" and not registry.is_store(p) and _eligible(p.meta)
                    and not is_channels_last(p.meta)):
                seeds.add(p.name)
    cl = _propagate(fg, conv_names, seeds, _kernel_read_views(fg))
    order = {n.name: float(n.index) for n in fg.nodes()}
    made = {}
    for c in convs:                           # remaining conv inputs: a copy into channels-last
        for pos in (0, 1):
            a = c.args[pos]
            meta = fg.meta_of(a)
            if (a.name, a.item) in cl or is_channels_last(meta):
                continue
            if (a.name, a.item) not in made:
                made[(a.name, a.item)] = _clone(fg, a, channels_last_meta(meta), torch.channels_last, "cl",
                                                order, order[c.name] - 0.5)
            _redirect(fg, c, a, made[(a.name, a.item)])
    _restore(fg, cl, order)
    for i, name in enumerate(sorted(order, key=lambda n: (order[n], n))):
        fg.node(name).index = i
    return fg


def _kernel_read_views(fg: FusionGraph) -> set:
    """Names of the STRIDE_VIEWS nodes read only by kernels (pointwise, reductions) or by other such views, and
    not graph outputs: where their base goes channels-last, they can follow it (nothing outside our kernels
    sees their strides)."""
    outs = {o.name for o in fg.outputs if isinstance(o, Ref)}
    ok = {}

    def check(name):
        if name not in ok:
            n = fg.node(name)
            ok[name] = False                  # (no cycles in a DAG; a guard all the same)
            users = [fg.node(u) for u in fg.g.successors(name)]
            ok[name] = (n.kind == "view" and _op(n) in STRIDE_VIEWS and name not in outs and bool(users)
                        and all(u.kind in ("pointwise", "reduction") and not registry.is_store(u)
                                or (u.kind == "view" and check(u.name)) for u in users))
        return ok[name]
    return {n.name for n in fg.nodes() if n.kind == "view" and check(n.name)}


def _derived_view_meta(fg: FusionGraph, n) -> TensorMeta:
    """The view's meta with its strides re-derived from its (now channels-last) base: the op run on meta."""
    base = fg.meta_of(n.args[0])
    t = torch.empty_strided(base.shape, base.stride, dtype=base.dtype, device="meta")
    out = n.target(t, *n.args[1:], **n.kwargs)
    return TensorMeta(tuple(out.shape), out.dtype, tuple(out.stride()), n.meta.device, bool(out.is_contiguous()))


def _propagate(fg: FusionGraph, conv_names: set, seeds: set, views: set = frozenset()) -> set:
    """Give channels-last metas to the convs' outputs, the seeds and what follows them (views: the kernel-read
    views that may follow their base); the (name, item) keys of the channels-last values."""
    cl = set()
    for n in fg.nodes():
        if n.name in views and isinstance(n.args[0], Ref) and (n.args[0].name, n.args[0].item) in cl:
            derived = _derived_view_meta(fg, n)
            if tuple(derived.shape) == tuple(n.meta.shape):
                n.meta = derived
                cl.add((n.name, None))
        elif n.name in conv_names:
            if _eligible(n.meta):             # (traced NHWC already: the model's own layout, left as it is)
                n.meta = channels_last_meta(n.meta)
                cl.add((n.name, None))
        elif n.kind == "pointwise" and not registry.is_store(n) and _eligible(n.meta) and (
                n.name in seeds or any((r.name, r.item) in cl and fg.meta_of(r).shape == n.meta.shape
                                       for r in tensor_args(fg, n.name))):
            n.meta = channels_last_meta(n.meta)
            cl.add((n.name, None))
        elif n.kind == "opaque" and _op(n) in FOLLOWS and n.args and isinstance(n.args[0], Ref) \
                and (n.args[0].name, n.args[0].item) in cl:
            multi = n.multi_meta or ()
            for item in FOLLOWS[_op(n)]:
                meta = n.meta if item is None else multi[item] if item < len(multi) else None
                if not _eligible(meta):
                    continue
                if item is None:
                    n.meta = channels_last_meta(meta)
                else:
                    n.multi_meta = multi = multi[:item] + (channels_last_meta(meta),) + multi[item + 1:]
                cl.add((n.name, item))
    return cl


def _reads_any_layout(user, conv_names: set, followers: set = frozenset()) -> bool:
    """A reader that takes a channels-last value as it is: kernels (pointwise, reductions), convolutions,
    the views that follow their base's layout, the layout-following and layout-agnostic ATen ops."""
    if user.kind in ("pointwise", "reduction") or user.name in conv_names or user.name in followers:
        return True
    return user.kind == "opaque" and (_op(user) in FOLLOWS or _op(user) in AGNOSTIC)


def _restore(fg: FusionGraph, cl: set, order: dict) -> None:
    """Eager's NCHW layout back for the graph outputs, views and other ATen calls reading a channels-last value."""
    conv_names = {c.name for c in convolutions(fg)}
    followers = {n for n, _ in cl if fg.node(n).kind == "view"}      # views whose strides follow their base
    made = {}

    def restored(key):
        if key not in made:
            ref = Ref(*key)
            meta = fg.meta_of(ref)
            nchw = torch.empty(meta.shape, dtype=meta.dtype, device="meta").stride()
            made[key] = _clone(fg, ref, TensorMeta(meta.shape, meta.dtype, tuple(nchw), meta.device, True),
                               torch.contiguous_format, "nchw", order, order[key[0]] + 0.5)
        return made[key]

    for name in list(order):
        user = fg.node(name)
        if user.name in made.values() or _reads_any_layout(user, conv_names, followers):
            continue
        for r in {r for r in tensor_args(fg, user.name) if (r.name, r.item) in cl}:
            _redirect(fg, user, r, restored((r.name, r.item)))
    fg.outputs = [Ref(restored((o.name, o.item))) if isinstance(o, Ref) and (o.name, o.item) in cl else o
                  for o in fg.outputs]


def _clone(fg: FusionGraph, src: Ref, meta: TensorMeta, fmt, tag: str, order: dict, at: float) -> str:
    """A clone of src with memory format fmt (meta: its strides), placed at `at` in the node order."""
    base = "%s%s_%s" % (src.name, "" if src.item is None else "_%d" % src.item, tag)
    name, k = base, 0
    while name in fg.g:
        k += 1
        name = "%s%d" % (base, k)
    producer = fg.node(src.name)
    node = OpNode(name, registry.classify(CLONE, (src,), {"memory_format": fmt}), CLONE, (src,),
                  {"memory_format": fmt}, meta, device=meta.device, stack_trace=producer.stack_trace)
    node.bytes = meta.numel * meta.dtype.itemsize
    node.flops = meta.numel
    fg.add(node, [src.name])
    order[name] = at + 1e-6 * len(fg)      # unique, and between the producer and the readers
    return name


def _redirect(fg: FusionGraph, user, old: Ref, new: str) -> None:
    """user reads `new` where it read `old`; the data edge follows (an ordering edge stays)."""
    def sub(v):
        if isinstance(v, Ref):
            return Ref(new) if v == old else v
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x) for x in v)
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v
    user.args, user.kwargs = sub(user.args), sub(user.kwargs)
    fg.g.add_edge(new, user.name)
    still = old.name in ref_names_in(user.args, []) + ref_names_in(user.kwargs, [])
    if not still and not fg.g.edges[old.name, user.name].get("order"):
        fg.g.remove_edge(old.name, user.name)
