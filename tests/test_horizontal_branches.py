"""Independent branches of real models share launches (issue 14 item 4): kernels ready at the same time batch
even at different depths of the group DAG (passes/horizontal_levels.py).

(a) attention: llama's q and k rotary and v's repeat_kv copy (v's is one level deeper: an unsqueeze and an
    expand stand where q's slices do), GPT-2 eager attention's q, k^T and v copies before the bmms;
(b) MoE: the per-expert SwiGLU of a dense top-2 layer (every expert on every token, bench's MoETop2);
(c) clip_grad_norm_ over 20 gradients of mixed shapes: the per-gradient scaling. The one-element gradients
    read the clip coefficient from the kernel that computes it with the 0-dim ones, so they run one launch
    later (a data dependency; explain says so).

Counted on the CPU build (explain, numerics against eager) and planned for CUDA on fake CUDA tensors (the
launches the runtime would make: one per launch class of a batch's members, runtime/batch.launch_sets).
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._guards import detect_fake_mode

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench/ last: its zoo.py must not shadow the tests' zoo package
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import numerics  # noqa: E402
from workloads import MoETop2  # noqa: E402
from zoo.util import assert_low_precision_close, float64_reference  # noqa: E402

import fusebackend  # noqa: E402
import models  # noqa: E402
from fusebackend.capture import decompositions, fake_cuda  # noqa: E402
from fusebackend.emit import emit_kernel  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import plan_groups  # noqa: E402
from fusebackend.passes.horizontal_levels import MAX_WAIT, _partners, schedule, windows  # noqa: E402
from fusebackend.runtime.batch import launch_sets  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


# ---------------------------------------------------------------- helpers

def explained(fn, *args, options=None):
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args, options=options)
    batches = [b for r in rep.graph_reports for b in r.batches]
    return rep, batches, "\n".join(b.describe() for b in batches)


def planned_cuda(fn, inputs):
    """[(fg, groups, batches, launches)] per graph: fuse's passes on the graph retargeted to fake CUDA tensors
    (as bench/plan_cuda.py), launches counted as the runtime would make them."""
    opts, plans = FuseOptions(), []

    def planner(gm, example_inputs):
        fg = lower(gm)
        groups, batches = plan_groups(fg, opts.max_group_nodes)
        specs = {g.id: emit_kernel(fg, g) for g in groups if g.is_kernel}
        batched = {m for b in batches if len(b.groups) > 1 for m in b.groups}
        launches = sum(1 for g in specs if g not in batched)
        for b in batches:
            if len(b.groups) > 1:
                launches += len(launch_sets([SimpleNamespace(spec=specs[m]) for m in b.groups], 8))
        plans.append((fg, groups, batches, launches))
        return lambda *a: None

    def capture(gm, example_inputs):
        runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        fake = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs)
        aot_autograd(fw_compiler=planner, inference_compiler=planner,
                     decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul))(
            fake_cuda.retarget(gm), fake)
        return runnable.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=capture)(*inputs)
    return plans


def _ops(fg, group):
    return [fg.node(n).op_name.split(".")[0] for n in group.nodes]


def _rotary_and_copies(fg, groups):
    """The attention epilogue kernels: rotaries (a cat of halves) and the copies that make q/k/v contiguous."""
    return [g.id for g in groups if g.is_kernel and ("cat" in _ops(fg, g) or _ops(fg, g) == ["clone"])]


# ---------------------------------------------------------------- (a) attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_qkv_epilogues_share_one_launch_cpu(dtype):
    entry = models.get("llama_layer")
    model, inputs = entry.make(size="small", dtype=dtype)
    rep, batches, text = explained(model, *inputs)
    # rmsnorm, the q/k/v epilogues (one launch: 3 before issue 14 item 4 made v's copy wait for nothing),
    # rmsnorm, SwiGLU, the residual add
    assert rep.num_kernels == 5 and len(batches) == 1, str(rep)
    graph = rep.graph_reports[0]
    assert sorted(batches[0].groups) == sorted(_rotary_and_copies(graph.graph, graph.groups)), text
    assert "3 chains in one parallel region" in text and "waited from depth" in text, text
    compiled = torch.compile(model, backend="fuse", options={"fallback": "error"})
    with torch.no_grad():
        for seed in (1, 2):
            fresh = entry.make_inputs(size="small", dtype=dtype, seed=seed)
            if dtype == torch.float32:
                numerics.assert_matches(model, compiled, fresh)
            else:          # within eager's own distance from float64 (the model's weights are bf16)
                assert_low_precision_close(compiled(*fresh), model(*fresh), float64_reference(model, fresh),
                                           "llama_layer bf16, seed %d" % seed)


def test_llama_qkv_epilogues_share_one_launch_planned_for_cuda():
    entry = models.get("llama_layer")
    model, inputs = entry.make(size="small", dtype=torch.bfloat16)
    (fg, groups, batches, launches), = planned_cuda(model, inputs)
    assert launches == 5, [g.describe(fg) for g in groups] + [b.describe() for b in batches]
    merged = [b for b in batches if len(b.groups) > 1]
    assert len(merged) == 1 and sorted(merged[0].groups) == sorted(_rotary_and_copies(fg, groups))
    text = merged[0].describe()
    assert "3 chains in one kernel, a switch on each problem's chain" in text and "waited from depth" in text


def test_gpt2_eager_attention_copies_share_one_launch():
    entry = models.get("gpt2_block_eager_attn")
    model, inputs = entry.make(size="small")
    rep, batches, text = explained(model, *inputs)
    assert rep.num_kernels == 7 and len(batches) == 1 and len(batches[0].groups) == 3, str(rep)
    compiled = torch.compile(model, backend="fuse", options={"fallback": "error"})
    with torch.no_grad():
        numerics.assert_matches(model, compiled, entry.make_inputs(size="small", seed=5))
    (fg, groups, cbatches, launches), = planned_cuda(model, inputs)
    assert launches == 7, [b.describe() for b in cbatches]


# ---------------------------------------------------------------- (b) MoE experts

def DenseMoE(hidden=32, ffn=64, experts=4, top_k=2):
    """bench/workloads.py's MoETop2 at a test size: every expert on every token, weighted by its top-2 gate."""
    return MoETop2(hidden, ffn, experts, top_k)


def _swiglus(fg, groups):
    return [g.id for g in groups if g.kind == "pointwise" and "sigmoid" in _ops(fg, g)]


def test_moe_expert_swiglus_share_one_launch():
    torch.manual_seed(0)
    moe = DenseMoE().eval()
    rep, batches, text = explained(moe, torch.randn(16, 32), options={"moe_op": False})
    graph = rep.graph_reports[0]
    experts = _swiglus(graph.graph, graph.groups)
    assert len(experts) == 4 and len(batches) == 1 and set(experts) <= set(batches[0].groups), str(rep)
    # the CPU also takes the router's softmax rows into the region: the gate sums and the weighted sum follow
    assert rep.num_kernels == 3, str(rep)
    compiled = torch.compile(moe, backend="fuse", options={"fallback": "error", "moe_op": False})
    with torch.no_grad():
        numerics.assert_matches(moe, compiled, (torch.randn(16, 32),))
    (fg, groups, cbatches, launches), = planned_cuda(moe, (torch.randn(16, 32),))
    merged = [b for b in cbatches if len(b.groups) > 1]
    assert [sorted(b.groups) for b in merged] == [sorted(_swiglus(fg, groups))], [b.describe() for b in cbatches]
    # on CUDA the softmax rows launch with another block shape: router, experts, gates, weighted sum
    assert launches == 4 and "different block shapes" in " ".join(b.describe() for b in cbatches)


# ---------------------------------------------------------------- (c) clip_grad_norm_

def _grads(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for _ in range(n):
        shape = tuple(int(s) for s in torch.randint(1, 24, (int(torch.randint(0, 4, (1,), generator=g)),),
                                                    generator=g))
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * 10        # the clip coefficient is well below 1
        ps.append(p)
    return ps


def test_clip_grad_norm_scaling_in_two_launches():
    ps = _grads()
    assert sum(p.numel() == 1 and p.dim() == 1 for p in ps) == 3 and any(p.dim() == 0 for p in ps)
    clip = lambda: torch.nn.utils.clip_grad_norm_(ps, 1.0)
    rep, batches, text = explained(clip)
    # the 0-dim gradients' scaling fuses with the coefficient; every bigger gradient recomputes it in its
    # own kernel (passes/remat_scalar.py): one launch. The [1]-shaped ones read it back: the second launch
    assert rep.num_kernels == 2 and len(batches) == 2, str(rep)
    assert "reads a result of" in text, text
    for seed in (1, 2):
        mine, ref = _grads(seed=seed), _grads(seed=seed)
        compiled = torch.compile(lambda: torch.nn.utils.clip_grad_norm_(mine, 1.0), backend="fuse")
        norm = compiled()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    plans = planned_cuda(clip, ())
    assert [p[3] for p in plans] == [2], [b.describe() for p in plans for b in p[2]]


# ---------------------------------------------------------------- the schedule itself

def _random_dag(rng, n):
    producers = {i: set(rng.sample(range(i), min(i, rng.randint(0, 3)))) for i in range(n)}
    key = {i: rng.choice([None, "a", "b"]) for i in range(n)}
    return list(range(n)), producers, key


def test_schedule_keeps_every_edge_and_the_longest_path():
    rng = random.Random(0)
    for _ in range(200):
        order, producers, key = _random_dag(rng, rng.randint(1, 40))
        s = schedule(order, producers, key)
        asap, alap = windows(order, producers)
        for c in order:
            assert all(s.level[p] < s.level[c] for p in producers[c])
            assert s.asap[c] <= s.level[c] <= min(alap[c], asap[c] + MAX_WAIT)
        assert max(s.level.values()) == max(asap.values())
        # the kernels that may wait: exactly those with an independent kernel of their key in reach
        lo, hi = s.asap, s.alap
        brute = {g for g in order for h in order if g != h and key[g] is not None and key[g] == key[h]
                 and lo[g] <= hi[h] and lo[h] <= hi[g] and not s.anc[g] & s.bit[h] and not s.anc[h] & s.bit[g]}
        assert _partners(order, key, lo, hi, s.anc, s.bit) == brute
        for g in order:        # never batchable, or nothing it could meet: it runs when ready, as before
            if key[g] is None and all(key[a] is None for a in order if s.anc[g] & s.bit[a]):
                assert s.level[g] == asap[g]


def test_schedule_meets_a_deeper_branch_and_stays_put_without_one():
    # 0 -> 1 (kernel) -> 4 ; 0 -> 2 -> 3 (kernel) -> 4: kernel 1 waits one level for kernel 3
    producers = {0: set(), 1: {0}, 2: {0}, 3: {2}, 4: {1, 3}}
    key = {0: None, 1: "k", 2: None, 3: "k", 4: None}
    s = schedule([0, 1, 2, 3, 4], producers, key)
    assert s.level[1] == s.level[3] == 2 and s.asap[1] == 1
    key[3] = "other"                      # no partner: kernel 1 keeps its depth
    assert schedule([0, 1, 2, 3, 4], producers, key).level[1] == 1
