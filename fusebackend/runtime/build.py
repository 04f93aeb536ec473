"""Turning kernel sources and groups into a runnable Program."""
from __future__ import annotations

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
