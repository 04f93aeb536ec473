"""Wiring: the Dynamo entry point `fuse`, AOT autograd capture, and graph -> passes -> emit -> runtime."""
from __future__ import annotations

import contextlib
import functools
import gc
import warnings

import torch
from torch._dynamo.backends.common import aot_autograd

from . import decompositions, moe_layers, records as report_mod
from ..graph import lower
from ..graph.fusion_graph import FusionGraph
from ..options import FuseOptions
from ..passes import plan_groups
from ..runtime import build_program, program_cache
from .kernels import finish_kernels, start_kernels


def fuse(gm: torch.fx.GraphModule, example_inputs, options=None, **kwargs):
    """torch.compile(model, backend="fuse", options={...})."""
    if kwargs.get("mode") not in (None, "default"):
        warnings.warn("fusebackend: mode=%r is ignored; use options={...}" % kwargs["mode"])
    opts = FuseOptions.from_dict(options)
    with _old_objects_frozen():
        return _fuse(gm, example_inputs, opts, options)


def _fuse(gm, example_inputs, opts: FuseOptions, options):
    if opts.gpu_memory_budget is not None:
        from .placement import fuse_placed
        placed = fuse_placed(gm, example_inputs, opts, options)
        if placed is not None:
            return placed
    compiler = functools.partial(compile_graph, opts)
    return aot_autograd(
        fw_compiler=functools.partial(compiler, "forward"),
        bw_compiler=functools.partial(compiler, "backward"),
        inference_compiler=functools.partial(compiler, "inference"),
        decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul),
        **_mutation_kwargs(opts),
    )(gm, example_inputs)


def _mutation_kwargs(opts: FuseOptions) -> dict:
    """Input mutations stay in the graph as trailing copy_(input, value) nodes, which the passes turn into
    kernel stores (passes/inplace.py: a kernel writes the parameter or buffer in place). Without it AOT's
    runtime wrapper copies every mutated input back after the graph, one ATen copy_ each per call (66% of a
    200-tensor AdamW step), from fresh outputs the graph has to return.

    Not under `cudagraphs`: CudaGraphProgram copies an input whose storage changes between calls into a static
    buffer, and an in-graph write would land there, not in the caller's tensor; AOT's copy-back after the
    replay writes the caller's tensor. Only where this torch's AOT autograd takes the option."""
    if opts.cudagraphs or "keep_inference_input_mutations" not in _aot_parameters():
        return {}
    return {"keep_inference_input_mutations": True}


@functools.lru_cache(maxsize=None)
def _aot_parameters() -> frozenset:
    import inspect
    from torch._functorch.aot_autograd import aot_module_simplified
    try:
        return frozenset(inspect.signature(aot_module_simplified).parameters)
    except (TypeError, ValueError):
        return frozenset()


@contextlib.contextmanager
def _old_objects_frozen():
    """Python's full collections walk every live object; a compile allocates enough to run several, and each
    walks the whole process (Dynamo's state, the model): 0.66 s of a 200-tensor AdamW compile, four of them.
    Frozen, the objects that existed before are skipped -- still freed by their reference counts, a cycle
    among them found at a collection after the compile; what the compile allocates is collected as usual.
    Not when someone else has frozen objects (a server that forks) or turned the collector off: we leave
    theirs as they are."""
    if _freezing[0] or not gc.isenabled() or gc.get_freeze_count():   # (the count walks the frozen objects)
        yield
        return
    gc.freeze()
    _freezing[0] = True
    try:
        yield
    finally:
        _freezing[0] = False
        gc.unfreeze()


_freezing = [False]      # inside _old_objects_frozen: compile_graph runs inside fuse()


def compile_graph(opts: FuseOptions, kind: str, gm: torch.fx.GraphModule, example_inputs):
    with _old_objects_frozen():          # a backward graph compiles at the first backward, outside fuse()
        return _compile_graph(opts, kind, gm, example_inputs)


def _compile_graph(opts: FuseOptions, kind: str, gm: torch.fx.GraphModule, example_inputs):
    key = program_cache.key(opts, kind, gm)
    warm = program_cache.load(key, opts, gm) if key is not None else None
    if warm is not None:                 # a warm start: lowering, passes and emission were done before
        return _warm_program(opts, kind, warm)
    try:
        fg = lower(gm)
    except NotImplementedError as e:     # a graph construct we do not lower: the whole graph runs as ATen
        rep = report_mod.GraphReport(kind=kind, graph=FusionGraph())
        rep.fallbacks.append(("graph", str(e)))
        report_mod.record(rep, opts)
        warnings.warn("fusebackend: %s; this graph runs as ATen calls" % e)
        return _boxed(gm)
    rep = report_mod.GraphReport(kind=kind, graph=fg)
    moe_layers.rewrite(fg, opts, kind, rep)      # whole MoE layers as one op: one host sync, not one per expert
    if not _sizes_evaluable(fg):
        rep.fallbacks.append(("graph", "symbolic sizes we cannot evaluate at run time: the graph runs as ATen"))
        report_mod.record(rep, opts)
        warnings.warn("fusebackend: this graph's symbolic sizes are not supported; it runs as ATen calls")
        return _boxed(gm)
    groups, batches = plan_groups(fg, opts.max_group_nodes, opts.conv_layout, kind)
    pending = start_kernels(fg, groups, opts, rep, batches)
    try:    # encoded while the kernels compile (the graph and groups are final once emitted) and before
        # build_program, which is what a warm start runs again on the decoded state; the built set is
        # checked below, once known (rep.specs stands in for it here)
        entry = program_cache.encode(key, gm, fg, groups, batches, rep.specs, rep.specs, rep.fallbacks) if key else None
    finally:
        kernels = finish_kernels(pending)
    if any(gid not in kernels for gid in rep.specs):
        entry = None                     # a kernel failed to build: not cached, the next compile may do better
    program = build_program(fg, groups, kernels, opts, batches)
    rep.groups, rep.batches, rep.program = groups, batches, program
    report_mod.record(rep, opts)
    if entry is not None:
        program_cache.store(key, opts, entry)
    return _boxed_program(program)


def _warm_program(opts, kind, warm):
    rep = report_mod.GraphReport(kind=kind, graph=warm.fg, sources=warm.sources, fallbacks=warm.fallbacks)
    rep.specs = warm.specs
    program = build_program(warm.fg, warm.groups, warm.kernels, opts, warm.batches)
    rep.groups, rep.batches, rep.program = warm.groups, warm.batches, program
    report_mod.record(rep, opts)
    return _boxed_program(program)


def _boxed_program(program):
    """AOT autograd recognises boxed callables by a function attribute."""
    def run(args):
        return program(args)
    run._boxed_call = True
    run.program = program
    return run


def _sizes_evaluable(fg) -> bool:
    """Every symbolic dim is plain arithmetic on symbols the graph receives as inputs."""
    from ..runtime.symbols import SymbolEval
    sym = SymbolEval(fg.symbols, fg.symbol_sources)
    metas = [n.meta for n in fg.nodes() if n.meta is not None]
    return all(sym.can_eval(d) for m in metas for d in tuple(m.shape) + tuple(m.stride))


def _boxed(gm):
    def run(args):
        out = gm(*args)
        if isinstance(args, list):
            args.clear()
        return out
    run._boxed_call = True
    return run
