"""Emitting and compiling a graph's kernel groups; a group that fails runs as ATen calls (one warning)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..emit import EmitError, emit_kernel
from ..runtime import compile_kernel, first_call_builds, progress


def build_kernels(fg, groups, opts, rep, batches=()) -> dict:
    """Emit and compile every kernel group (distinct sources compile once, in parallel); failures fall back."""
    return finish_kernels(start_kernels(fg, groups, opts, rep, batches))


class PendingKernels:
    """Kernels emitted and compiling on a thread pool: the caller may work meanwhile (compile_graph encodes
    the program cache entry), then finish_kernels waits. rep.specs is already set."""

    def __init__(self, groups, opts, rep, specs, pool, futures):
        self.groups, self.opts, self.rep, self.specs = groups, opts, rep, specs
        self.pool, self.futures = pool, futures      # the pool also runs the first-call builds: shutdown waits


def start_kernels(fg, groups, opts, rep, batches=()) -> PendingKernels:
    """Emit every kernel group, then start compiling the distinct sources, and the builds the program's first
    call would make (runtime.first_call_builds), on a thread pool."""
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
    jobs = first_call_builds(groups, batches, opts) if unique else []
    threads = opts.compile_threads or os.cpu_count() or 1

    def build(spec):
        try:
            return spec.source, compile_kernel(spec, opts), None
        except Exception as e:     # a compiler error or a missing compiler: those groups run as ATen
            return spec.source, None, e

    progress.start(len(unique))
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique) + len(jobs) or 1)))
    try:
        futures = [pool.submit(build, spec) for spec in unique.values()]
        for job in jobs:
            pool.submit(_quiet, job)
    except BaseException:
        pool.shutdown(wait=True)
        progress.done()
        raise
    return PendingKernels(groups, opts, rep, specs, pool, futures)


def finish_kernels(p: PendingKernels) -> dict:
    """Wait for the compiles: group id -> (KernelSource, launch) of every kernel that built."""
    built = {}
    try:
        for fut in p.futures:
            source, launch, err = fut.result()
            built[source] = (launch, err)
            p.rep.sources.append(source)
            progress.step()
    finally:
        p.pool.shutdown(wait=True)       # the first-call builds too: the first call would wait for them
        progress.done()
    kernels = {}
    for gid, spec in p.specs.items():
        launch, err = built[spec.source]
        if err is not None:
            _fail(next(g for g in p.groups if g.id == gid), "compile: %s" % err, p.opts, p.rep)
        else:
            kernels[gid] = (spec, launch)
    return kernels


def _quiet(job):
    """A first-call build is only started early: if it fails, the first call meets the same failure and
    handles it as it always does."""
    try:
        job()
    except Exception:
        pass


def _fail(group, reason, opts, rep):
    if opts.fallback == "error":
        raise RuntimeError("fusebackend: group g%d failed: %s" % (group.id, reason))
    group.fallback_reason = reason
    rep.fallbacks.append(("g%d" % group.id, reason))
