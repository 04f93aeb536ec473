"""Divergent horizontal batches: kernels of different chains (different generated bodies), sizes and dtypes in
one launch, on the CPU build (one parallel region, problems dealt to threads by bytes: runtime/cpu_batch.py)
and on the CUDA emulator (a switch on each problem's chain id; the problem table in kernel arguments, or in
device memory when it does not fit: runtime/cuda_batch.py); the table is written again only when the
operands' pointers change; the cost rule's merges and splits as explain prints them; nvcc compiles the
divergent and table-mode entries for sm_90."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(__file__))

import cuda_emu  # noqa: E402
import numerics  # noqa: E402
from test_cuda import INCLUDE, capture  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.capture import decompositions, records  # noqa: E402
from fusebackend.emit import cuda_target  # noqa: E402
from fusebackend.emit.cuda import emit_cuda  # noqa: E402
from fusebackend.emit.cuda_batch import divergent_kernel  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import batch_horizontal, plan_groups  # noqa: E402
from fusebackend.passes.horizontal_cost import MAX_CHAINS, plan_merges  # noqa: E402
from fusebackend.runtime import build_program, cuda_batch  # noqa: E402
from fusebackend.runtime.batch import BatchKernelStep  # noqa: E402
from fusebackend.runtime.cpu_batch import deal  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def mixed(*xs):
    """Three chains by thirds: an affine relu, an exp, a float64 tanh (mixed dtypes among the outputs)."""
    n = len(xs) // 3
    return ([(x * 2.0 + 1.0).relu() for x in xs[:n]] + [torch.exp(y) * 0.5 for y in xs[n:2 * n]]
            + [torch.tanh(z.double()) * 3 for z in xs[2 * n:]])


def mixed_dtypes(a, b, c, d):
    return a * 2 + 1, (b.float() * 3).to(torch.bfloat16), c.sin() + 1, d.double().exp()


def update_in_place(*xs):
    """Stores into the inputs (no outputs): a steady call's pointers are the same as the last call's."""
    n = len(xs) // 2
    for x in xs[:n]:
        x.mul_(0.5).add_(1.0)
    for y in xs[n:]:
        y.mul_(y.sigmoid())


def biased_update(*xs):
    """In place, two chains, each problem reading a bias (an operand of its own even where it is empty)."""
    n = len(xs) // 2
    for i, (x, b) in enumerate(zip(xs[:n], xs[n:])):
        if i % 2:
            x.mul_(0.5).add_(b)
        else:
            x.mul_(b.sigmoid())


def _mixed_args(n=9, empty=(4,)):
    xs = [torch.randn(5 + 3 * i, 16 + (i % 3) * 8) for i in range(n)]
    for i in empty:
        xs[i] = torch.randn(0, 16)
    return tuple(xs)


def _batch_steps(programs):
    return [s for p in programs for s in p.steps if isinstance(s, BatchKernelStep)]


# ---------------------------------------------------------------- the CPU build

def _compiled_cpu(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="fuse", options={"fallback": "error"})


def test_cpu_mixed_chains_sizes_dtypes_and_empty_in_one_launch():
    with records.collect() as reps:
        compiled = _compiled_cpu(mixed)
        with torch.no_grad():
            numerics.assert_matches(mixed, compiled, _mixed_args())
    assert sum(r.num_kernels for r in reps) == 1, [b.describe() for r in reps for b in r.batches]
    text = " ".join(b.describe() for r in reps for b in r.batches)
    assert "3 chains in one parallel region, problems dealt to threads by bytes" in text, text
    with torch.no_grad():
        for _ in range(2):
            numerics.assert_matches(mixed, compiled, _mixed_args(empty=(0, 8)))
    step = _batch_steps([r.program for r in reps])[0]
    assert step.chains == 3 and step.plan.nparts == min(torch.get_num_threads(), 9)


def test_cpu_mixed_dtypes_one_live_problem_and_one_kernel():
    args = (torch.randn(7, 5), torch.randn(6).to(torch.bfloat16), torch.randn(3, 3), torch.randn(11))
    with torch.no_grad():
        numerics.assert_matches(mixed_dtypes, _compiled_cpu(mixed_dtypes), args)
        one_live = (torch.randn(0, 5), torch.randn(0).to(torch.bfloat16), torch.randn(0, 3), torch.randn(9))
        numerics.assert_matches(mixed_dtypes, _compiled_cpu(mixed_dtypes), one_live)
        single = lambda x: (x * 2 + 1).relu()
        numerics.assert_matches(single, _compiled_cpu(single), (torch.randn(33, 7),))


def test_cpu_table_written_only_when_pointers_change():
    xs = [torch.randn(4 + i, 8 + i) for i in range(12)]
    ref = [x.clone() for x in xs]
    with records.collect() as reps:
        step = _compiled_cpu(update_in_place)
        with torch.no_grad():
            for _ in range(3):
                step(*xs)
                update_in_place(*ref)
    batch = _batch_steps([r.program for r in reps])[0]
    assert batch.chains == 2 and batch.plan.writes == 1        # the first call's table, then the same pointers
    xs[3] = xs[3].clone()                                      # another storage: its slot changes
    ref[3] = ref[3].clone()
    with torch.no_grad():
        step(*xs)
        update_in_place(*ref)
    assert batch.plan.writes == 2
    for a, b in zip(xs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_problems_dealt_by_bytes():
    sizes = [1000] + [10] * 100 + [0, 500]
    order, part = deal(sizes, 2)
    lists = [order[part[t]:part[t + 1]] for t in range(len(part) - 1)]
    loads = [sum(sizes[q] for q in lst) for lst in lists]
    assert sorted(order) == list(range(len(sizes))) and all(lst == sorted(lst) for lst in lists)
    assert max(loads) - min(loads) <= 10, loads               # by bytes: 1000 vs 500 + 50 of the tens
    assert deal([5, 7], 8)[1] == [0, 1, 2] and deal([3], 1) == ([0], [0, 1])


def test_cpu_optimizer_step_updates_and_counters_in_two_launches():
    shapes = [(64, 32), (256,), (7, 13), (33,), (), (3, 1, 8)]
    g = torch.Generator().manual_seed(3)
    make = lambda: [torch.nn.Parameter(torch.randn(shapes[i % 6], generator=g)) for i in range(30)]
    ps = make()
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, r in zip(ps, ref_ps):
        p.grad = torch.randn(p.shape, generator=g)
        r.grad = p.grad.clone()
    opt, ref = (torch.optim.AdamW(x, lr=1e-2, weight_decay=0.05, foreach=True) for x in (ps, ref_ps))
    rep = fusebackend.explain(opt.step)
    assert rep.num_kernels == 2 and rep.num_aten_calls == 0, str(rep)
    ref.step()
    step = torch.compile(opt.step, backend="fuse")
    for _ in range(3):
        step()
        ref.step()
    for p, r in zip(ps, ref_ps):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the CUDA emulator

def _compile_emulated(fn, programs, mutations=False, batches_out=None):
    def compiler(gm, example_inputs):
        fg = lower(gm)
        groups, batches = plan_groups(fg, 200)
        kernels, by_source = {}, {}
        for g in groups:
            if g.is_kernel:
                spec = emit_cuda(fg, g)
                kernels[g.id] = (spec, by_source.setdefault(spec.source, cuda_emu.launcher(spec)))
        program = build_program(fg, groups, kernels, FuseOptions(), batches)
        programs.append(program)
        if batches_out is not None:
            batches_out.extend(batches)
        return program
    torch._dynamo.reset()
    kw = {"keep_inference_input_mutations": True} if mutations else {}
    return torch.compile(fn, backend=aot_autograd(fw_compiler=compiler, inference_compiler=compiler,
                                                  decompositions=decompositions.table(), **kw))


def _emulated_batch(fn, make, calls=2):
    programs = []
    compiled = _compile_emulated(fn, programs)
    with torch.no_grad():
        for _ in range(calls):
            numerics.assert_matches(fn, compiled, make())
    steps = _batch_steps(programs)
    assert len(steps) == 1 and len(programs[0].steps) == 1, [type(s).__name__ for s in programs[0].steps]
    return steps[0]


def test_emulated_mixed_chains_one_divergent_launch():
    step = _emulated_batch(mixed, lambda: _mixed_args(empty=(1, 7)))
    assert step.chains == 3 and step.plan.chains == 3 and step.plan.mode == "args"
    assert [l[0] for l in step.launch.shapes] == ["batch", "batch"]          # one launch a call
    assert len(step.plan.launches[0].sel) == 7                              # the two empty problems left out


def test_emulated_mixed_dtypes_and_one_live_problem():
    make = lambda: (torch.randn(7, 5), torch.randn(6).to(torch.bfloat16), torch.randn(3, 3), torch.randn(11))
    step = _emulated_batch(mixed_dtypes, make)
    assert step.plan.chains == 4
    one = lambda: (torch.randn(0, 5), torch.randn(0).to(torch.bfloat16), torch.randn(0, 3), torch.randn(9))
    step = _emulated_batch(mixed_dtypes, one)
    assert step.plan.live == [3] and step.plan.launches[0].grid >= 1


def test_emulated_more_problems_than_arguments_hold(monkeypatch):
    """A table in device memory: one launch; under a CUDA graph capture, argument launches of K problems."""
    monkeypatch.setattr(cuda_target, "MAX_PARAM_BYTES", 20 + (8 * 2 + 4) * 4)     # 4 problems per launch
    make = lambda: _mixed_args(n=15, empty=(2,))
    step = _emulated_batch(mixed, make)
    assert step.plan.mode == "table" and step.plan.k == 4 and len(step.plan.launches) == 1
    assert step.launch.shapes[-1][0] == "batch" and len(step.launch.shapes) == 2
    monkeypatch.setattr(cuda_batch, "_capturing", lambda index: True)
    args = make()
    programs = []
    compiled = _compile_emulated(mixed, programs)
    with torch.no_grad():
        numerics.assert_matches(mixed, compiled, args)          # first call: captured -> argument launches
    plan = _batch_steps(programs)[0].plan
    assert plan.tab is None and len(plan.chunks) == 4 and plan.uploads == 0
    monkeypatch.setattr(cuda_batch, "_capturing", lambda index: False)
    with torch.no_grad():
        numerics.assert_matches(mixed, compiled, args)
    assert plan.uploads == 1


@pytest.mark.parametrize("table", [False, True])
def test_emulated_table_uploaded_only_when_pointers_change(table, monkeypatch):
    if table:
        monkeypatch.setattr(cuda_target, "MAX_PARAM_BYTES", 20 + (8 * 2 + 4) * 3)     # 3 problems a launch
    xs = [torch.randn(3 + i, 5 + 2 * i) for i in range(10)] + [torch.randn(5 + 2 * i) for i in range(10)]
    xs[2], xs[7] = torch.randn(0, 9), torch.randn(0, 19)     # empty problems, their biases at real addresses
    ref = [x.clone() for x in xs]
    programs = []
    step = _compile_emulated(biased_update, programs, mutations=True)
    with torch.no_grad():
        for _ in range(3):
            step(*xs)
            biased_update(*ref)
    plan = _batch_steps(programs)[0].plan
    assert plan.mode == ("table" if table else "args") and plan.chains == 2
    assert plan.writes == 1 and plan.uploads == (1 if table else 0)
    xs[6], ref[6] = xs[6].clone(), ref[6].clone()
    with torch.no_grad():
        step(*xs)
        biased_update(*ref)
    assert plan.writes == 2 and plan.uploads == (2 if table else 0)
    for a, b in zip(xs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def two_chain_intermediates(*xs):
    ys = [x * 2 + 1 for x in xs[:3]] + [torch.sigmoid(x) for x in xs[3:]]      # intermediates of two chains
    return torch.cat([y.sum(-1, keepdim=True).exp() for y in ys], -1)


def test_emulated_divergent_intermediates_share_one_allocation():
    programs = []
    compiled = _compile_emulated(two_chain_intermediates, programs)
    with torch.no_grad():
        for _ in range(2):
            numerics.assert_matches(two_chain_intermediates, compiled, tuple(torch.randn(8, 16 + 4 * i)
                                                                            for i in range(6)))
    steps = [s for s in _batch_steps(programs) if s.chains == 2]
    assert steps and steps[0].outputs.mode in ("rows", "flat"), [s.outputs.mode for s in steps]


def rows_and_points(*xs):
    return [torch.softmax(x, -1) for x in xs[:3]] + [x.sum(-1) for x in xs[3:6]] + [x * 3 for x in xs[6:]]


def test_emulated_launch_families_split_and_say_so():
    programs, batches = [], []
    compiled = _compile_emulated(rows_and_points, programs, batches_out=batches)
    args = tuple(torch.randn(4 + i, 40) for i in range(9))
    with torch.no_grad():
        numerics.assert_matches(rows_and_points, compiled, args)
    steps = _batch_steps(programs)
    assert len(steps) >= 2 and sum(len(s.members) for s in steps) == 9
    shapes = {m.spec.launch["shape"] for s in steps for m in s.members}
    assert all(len({m.spec.launch["shape"] for m in s.members}) == 1 for s in steps) and len(shapes) >= 2
    text = " ".join(b.describe() for b in batches)
    assert "runtime: %d launches: " % len(steps) in text and "pointwise kernels" in text, text


# ---------------------------------------------------------------- the cost rule and explain

def test_cuda_rule_small_chains_join_the_anchor_big_ones_do_not():
    members = list(range(8))
    sizes = {0: 300 << 20, 1: 4096, 2: 8192, 3: 400 << 20, 4: 100, 5: 100, 6: 2048, 7: 64}
    chain = {0: "a", 1: "b", 2: "b", 3: "c", 4: "d", 5: "a", 6: "r", 7: "r"}
    family = {g: "reduction" if chain[g] == "r" else "pointwise" for g in members}
    plans = plan_merges("cuda", members, sizes, chain, family, 2)
    kept = [p[0] for p in plans]
    assert [1, 2, 3, 4] in kept and [0, 5] in kept and [6, 7] in kept, kept
    why = " ".join(w for p in plans for _, w in p[2])
    assert "more than 8 launches of work" in why and "launch with different block shapes" in why
    many = {g: "c%d" % g for g in range(12)}
    plans = plan_merges("cuda", list(range(12)), {g: 1000 for g in range(12)}, many, {g: "pointwise" for g in many}, 2)
    assert [len(p[0]) for p in plans] == [MAX_CHAINS, 12 - MAX_CHAINS]
    cpu = plan_merges("cpu", members, sizes, chain, family, 2)
    assert len(cpu) == 1 and "8 chains" not in cpu[0][1]      # the CPU merges every chain (big ones alone)


def test_explain_says_why_cuda_batches_merge_or_split():
    xs = [torch.randn(64, 64) for _ in range(3)] + [torch.randn(32) for _ in range(3)]
    fg, groups = capture(lambda *a: [(x * 2).relu() for x in a[:3]] + [y.sum() for y in a[3:]], xs)
    for g in groups:
        g.device = "cuda"
    _, batches = batch_horizontal(fg, groups, threads=2)
    text = "\n".join(b.describe() for b in batches)
    assert text.count("kernels in one launch") == 2 and "different block shapes" in text, text
    cpu_text = str(fusebackend.explain(mixed, *_mixed_args()))
    assert "3 chains in one parallel region" in cpu_text, cpu_text


# ---------------------------------------------------------------- nvcc (sm_90)

def test_nvcc_compiles_divergent_and_table_entries(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    fg, groups = capture(mixed_dtypes, (torch.randn(7, 5), torch.randn(6).to(torch.bfloat16),
                                        torch.randn(3, 3), torch.randn(11)))
    # three chains that each compile without a stack frame (the float64 exp's own batch entry spills)
    specs = [emit_cuda(fg, g) for g in groups if g.is_kernel][:3]
    div = divergent_kernel(specs, cuda_target.MAX_PARAM_BYTES)
    assert div.chains == 3 and div.source.count("if (fb_chain == ") == 2 * 3     # argument and table entries
    fg, groups = capture(rows_and_points, tuple(torch.randn(4, 40) for _ in range(9)))
    rows = {}
    for g in groups:
        if g.is_kernel and g.kind == "reduction":        # a softmax and a row sum: row_warp kernels both
            spec = emit_cuda(fg, g)
            rows.setdefault(spec.source, spec)
    rows = list(rows.values())
    drows = divergent_kernel(rows, cuda_target.MAX_PARAM_BYTES)
    assert drows.chains == 2 and rows[0].launch["shape"] == "row_warp"
    jobs = [(div.name, div.source, ()), (div.name, div.source, ("-DFB_TABLE",)),
            (drows.name, drows.source, ()), (drows.name, drows.source, ("-DFB_TABLE",)),
            (specs[0].batch_name, specs[0].source, ("-DFB_BATCH", "-DFB_TABLE"))]
    jobs += [(rows[0].batch_name, rows[0].source, ("-DFB_BATCH", "-DFB_TABLE"))]
    for i, (name, source, defines) in enumerate(jobs):
        src = tmp_path / ("k%d.cu" % i)
        src.write_text(source)
        res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", *defines, "-I", INCLUDE, str(src),
                              "-Xptxas", "-v", "-o", str(tmp_path / ("k%d.o" % i))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:] + "\n" + source
        props = re.findall(r"Function properties for (\w+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores",
                           res.stderr)
        got = {fn: (int(frame), int(spill)) for fn, frame, spill in props}
        want = [name, name + "_t"] if "-DFB_TABLE" in defines else [name]
        assert sorted(got) == sorted(want), res.stderr
        # argument mode: the pointers stay in parameter space, nothing on the stack. Table mode reads them from
        # global memory; under __launch_bounds__(512) ptxas holds such kernels at 32 registers (full
        # occupancy), spilling a register or two and putting sinf's slow-path array on the stack
        assert got[name][0] == 0, res.stderr
        assert all(got[fn][1] <= 8 and got[fn][0] <= 48 for fn in want), res.stderr


# ---------------------------------------------------------------- on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("cudagraphs", [False, True])
def test_gpu_divergent_table_batch(cudagraphs):
    make = lambda: tuple(torch.randn(5 + 3 * (i % 40), 64 + 32 * (i % 3), device="cuda") for i in range(600))
    torch._dynamo.reset()
    compiled = torch.compile(mixed, backend="fuse", options={"fallback": "error", "cudagraphs": cudagraphs})
    with torch.no_grad():
        for _ in range(4):
            numerics.assert_matches(mixed, compiled, make())
