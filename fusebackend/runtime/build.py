"""Turning kernel sources and groups into a runnable Program."""
from __future__ import annotations

import functools

from . import cpu_compiler, launch_ext
from .batch import merge_batches
from .meta_check import check_kernel_inputs
from .program import FallbackStep, Program, kept_values
from .steps import AtenStep, DynamicKernelStep, KernelStep, cpu_launcher
from .symbols import SymbolEval
from .views import ViewStep, view_chains


def compile_kernel(spec, opts):
    """Compile one KernelSource for its target; returns a launch(tensors, meta) callable."""
    if spec.target == "cpu":
        return cpu_launcher(cpu_compiler.build(spec.source, spec.name, opts.cache_dir), spec,
                            launch_ext.load(opts.cache_dir))
    if spec.target == "cuda":
        from . import cuda_compiler
        return cuda_compiler.launcher(spec, opts)
    raise ValueError("unknown kernel target %r" % spec.target)


def first_call_builds(groups, batches, opts) -> list:
    """The one-time builds a program's first launches would make, one after another, while the graph's
    kernels compile (the C launch extension after the first CPU kernel, the batch extension and the CPU
    batch driver at the first call: 0.4 s of g++ in a fresh cache): zero-argument jobs, each a no-op once
    built in this process, for the caller to run beside the kernel compiles. Results stay where the loads
    keep them; a failed build is what the first call would have met too."""
    jobs = []
    if any(g.is_kernel and g.device == "cpu" for g in groups):
        jobs.append(functools.partial(launch_ext.load, opts.cache_dir))
    batched = {b.device for b in batches if len(b.groups) >= 2}
    if batched:                          # the batch steps load these with the default cache folder
        from . import batch_ext
        jobs.append(functools.partial(batch_ext.load, None))
    if "cpu" in batched:
        from . import cpu_batch
        jobs.append(functools.partial(cpu_batch.driver, None))
    return jobs


def build_program(fg, groups, kernels, opts, batches=()) -> Program:
    steps = []
    sym = SymbolEval(fg.symbols, fg.symbol_sources)
    absorbed, chains = view_chains(fg, groups, kept_values(fg))
    for g in groups:
        nodes = [fg.node(n) for n in g.nodes]
        if g.id in kernels:
            spec, launch = kernels[g.id]
            metas = [fg.node(n).meta for n in spec.outputs]
            if all(m.is_static for m in metas) and all(isinstance(d, int) for d in spec.domain) \
                    and not spec.scalars:
                step = KernelStep(spec, launch, metas, g.device)
            else:
                step = DynamicKernelStep(spec, launch, metas, g.device, sym)
            step.group_nodes = nodes
            step.group_id = g.id
            steps.append(step)
        elif g.is_kernel:
            steps.append(FallbackStep(nodes, g.fallback_reason or "no kernel"))
        else:
            for n in nodes:
                if n.name in chains:
                    steps.append(ViewStep(chains[n.name]))
                elif n.name not in absorbed:
                    steps.append(AtenStep(n))
    steps = check_kernel_inputs(fg, _merge_batches(steps, batches, fg.output_names()))
    program = Program(fg, steps, fg.inputs)
    if opts.cudagraphs:
        from .cudagraph import CudaGraphProgram
        return CudaGraphProgram(program)
    return program


def _merge_batches(steps, batches, graph_outputs=frozenset()):
    """Replace the member steps of each horizontal batch by BatchKernelSteps (runtime/batch.py)."""
    return merge_batches(steps, batches, graph_outputs)


def reset() -> None:
    """Forget in-memory compiled kernels (the disk cache stays): the next compile is a warm start."""
    cpu_compiler.clear_memory()
    try:
        from . import cuda_compiler
        cuda_compiler.clear_memory()
    except ImportError:
        pass
