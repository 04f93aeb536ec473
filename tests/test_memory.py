"""A compiled graph drops each intermediate tensor after its last reader (runtime/program.py), so its peak
memory follows eager's lifetimes instead of holding every value until the call returns."""
from __future__ import annotations

import pytest
import torch

import numerics
import fusebackend


def mlp(x, ws):
    for w in ws:
        x = torch.relu(x @ w) * 0.5
    return x


def _args(device="cpu", n=6, d=256, rows=512):
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(rows, d, device=device, generator=g),
            [torch.randn(d, d, device=device, generator=g) / d ** 0.5 for _ in range(n)])


def test_each_intermediate_is_dropped_after_its_last_reader():
    rep = fusebackend.explain(mlp, *_args())
    (graph,) = [r for r in rep.graph_reports if r.kind != "backward"]
    program = graph.program
    outputs = {o.name for o in graph.graph.outputs}
    freed = [n for names in program.frees for n in names]
    assert len(freed) == len(set(freed))
    # every mm result and every kernel output but the last is dropped, each right after the step reading it
    mm_outs = [n.name for n in graph.graph.nodes() if n.op_name.startswith("mm")]
    assert mm_outs and set(mm_outs) <= set(freed) and not (outputs & set(freed))
    from fusebackend.runtime.program import step_reads
    for i, names in enumerate(program.frees):
        for name in names:
            assert name in step_reads(program.steps[i])
            assert not any(name in step_reads(s) for s in program.steps[i + 1:])
    torch._dynamo.reset()
    numerics.assert_matches(mlp, torch.compile(mlp, backend="fuse"), _args())


@pytest.mark.gpu
def test_peak_memory_is_eager_like_on_gpu():
    x, ws = _args("cuda", n=12, d=1024, rows=8192)
    compiled = torch.compile(mlp, backend="fuse")
    compiled(x, ws)
    peaks = []
    for fn in (mlp, compiled):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, ws)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    act = 8192 * 1024 * 4
    assert peaks[1] <= peaks[0] + act, (peaks, act)        # at most one activation more than eager
