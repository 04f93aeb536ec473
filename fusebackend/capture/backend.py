"""Wiring: the Dynamo entry point `fuse`, AOT autograd capture, and graph -> passes -> emit -> runtime."""
from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch._dynamo.backends.common import aot_autograd

from . import decompositions, records as report_mod
from ..emit import EmitError, emit_kernel
from ..graph import lower
from ..graph.fusion_graph import FusionGraph
from ..options import FuseOptions
from ..passes import plan_groups
from ..runtime import build_program, compile_kernel, progress


def fuse(gm: torch.fx.GraphModule, example_inputs, options=None, **kwargs):
    """torch.compile(model, backend="fuse", options={...})."""
    if kwargs.get("mode") not in (None, "default"):
        warnings.warn("fusebackend: mode=%r is ignored; use options={...}" % kwargs["mode"])
    opts = FuseOptions.from_dict(options)
    compiler = functools.partial(compile_graph, opts)
    return aot_autograd(
        fw_compiler=functools.partial(compiler, "forward"),
        bw_compiler=functools.partial(compiler, "backward"),
        inference_compiler=functools.partial(compiler, "inference"),
        decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul),
    )(gm, example_inputs)


def compile_graph(opts: FuseOptions, kind: str, gm: torch.fx.GraphModule, example_inputs):
    try:
        fg = lower(gm)
    except NotImplementedError as e:     # a graph construct we do not lower: the whole graph runs as ATen
        rep = report_mod.GraphReport(kind=kind, graph=FusionGraph())
        rep.fallbacks.append(("graph", str(e)))
        report_mod.record(rep, opts)
        warnings.warn("fusebackend: %s; this graph runs as ATen calls" % e)
        return _boxed(gm)
    rep = report_mod.GraphReport(kind=kind, graph=fg)
    if not _sizes_evaluable(fg):
        rep.fallbacks.append(("graph", "symbolic sizes we cannot evaluate at run time: the graph runs as ATen"))
        report_mod.record(rep, opts)
        warnings.warn("fusebackend: this graph's symbolic sizes are not supported; it runs as ATen calls")
        return _boxed(gm)
    groups, batches = plan_groups(fg, opts.max_group_nodes)
    kernels = _build_kernels(fg, groups, opts, rep)
    program = build_program(fg, groups, kernels, opts, batches)
    rep.groups, rep.batches, rep.program = groups, batches, program
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


def _build_kernels(fg, groups, opts, rep) -> dict:
    """Emit and compile every kernel group (distinct sources compile once, in parallel); failures fall back."""
    specs = {}
    for g in groups:
        if not g.is_kernel:
            continue
        try:
            specs[g.id] = emit_kernel(fg, g)
        except EmitError as e:
            _fail(g, "emit: %s" % e, opts, rep)
        except Exception as e:         # an emitter bug: that group runs as ATen, the reason says so
            _fail(g, "emit (internal error, please report): %s: %s" % (type(e).__name__, e), opts, rep)
    rep.specs = specs
    unique = {}
    for spec in specs.values():
        unique.setdefault(spec.source, spec)
    threads = opts.compile_threads or os.cpu_count() or 1

    def build(spec):
        try:
            return spec.source, compile_kernel(spec, opts), None
        except Exception as e:     # a compiler error or a missing compiler: those groups run as ATen
            return spec.source, None, e

    built = {}
    progress.start(len(unique))
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique) or 1))) as pool:
            for source, launch, err in pool.map(build, unique.values()):
                built[source] = (launch, err)
                rep.sources.append(source)
                progress.step()
    finally:
        progress.done()
    kernels = {}
    for gid, spec in specs.items():
        launch, err = built[spec.source]
        if err is not None:
            _fail(next(g for g in groups if g.id == gid), "compile: %s" % err, opts, rep)
        else:
            kernels[gid] = (spec, launch)
    return kernels


def _fail(group, reason, opts, rep):
    if opts.fallback == "error":
        raise RuntimeError("fusebackend: group g%d failed: %s" % (group.id, reason))
    group.fallback_reason = reason
    rep.fallbacks.append(("g%d" % group.id, reason))


def _boxed(gm):
    def run(args):
        out = gm(*args)
        if isinstance(args, list):
            args.clear()
        return out
    run._boxed_call = True
    return run
