"""Emitting and compiling a graph's kernel groups; a group that fails runs as ATen calls (one warning)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..emit import EmitError, emit_kernel
from ..runtime import compile_kernel, progress


def build_kernels(fg, groups, opts, rep) -> dict:
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
