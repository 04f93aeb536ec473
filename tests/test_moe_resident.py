"""Whole MoE layers without a memory budget (issue 15): rewritten into one moe_experts op (passes/moe_rewrite.py,
capture/moe_layers.py) that runs with one host sync per layer (graph/moe_grouped.py), against eager."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fusebackend.capture import records
from fusebackend.graph.moe_grouped import sorted_moe
from fusebackend.graph.moe_op import expert_triples, reference_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import models  # noqa: E402
from numerics import assert_half_close, assert_matches  # noqa: E402
from workloads import MoETop2  # noqa: E402

CAPTURE = {"capture_dynamic_output_shape_ops": True}


def _compile(model, x, options=None, dynamo=None):
    """(compiled output, the GraphReports of the compile) through torch.compile(backend="fuse")."""
    torch._dynamo.reset()
    kw = {"options": options} if options else {}
    with torch.no_grad(), records.collect() as reps, torch._dynamo.config.patch(**(dynamo or {})):
        compiled = torch.compile(model, backend="fuse", **kw)
        out = compiled(x)
    return out, reps, compiled


def _check(model, x, out):
    """float32 to 1e-5 of eager; half types within eager's own error against a float64 copy of the model."""
    with torch.no_grad():
        ref = model(x)
        if x.dtype == torch.float32:
            assert_matches(model, lambda *a: out, (x,))
        else:
            m64 = copy.deepcopy(model).double()
            fn = lambda t: m64(t) if t.dtype == torch.float64 else model(t)   # noqa: E731
            assert_half_close(fn, (x,), out, ref, 2.0)


def _ops(rep):
    return [n.op_name for n in rep.graph.nodes() if n.target is not None]


def _moe_top2(dtype, hidden=48, ffn=80, experts=8, top_k=2):
    torch.manual_seed(0)
    return MoETop2(hidden, ffn, experts, top_k).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_moe_top2_dense_layer_is_one_op_and_matches_eager(dtype):
    model = _moe_top2(dtype)
    x = torch.randn(16, 48, dtype=dtype)
    out, reps, _ = _compile(model, x)
    (rep,) = reps
    assert len(rep.moe_layers) == 1 and "dense form, 8 experts, top-2" in rep.moe_layers[0]
    ops = _ops(rep)
    assert ops.count("moe_experts.default") == 1
    assert ops.count("mm.default") == 1                 # the router's; the 24 expert products are in the op
    _check(model, x, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zoo_mixtral_moe_captured_is_one_op_without_nonzero(dtype):
    entry = models.get("mixtral_moe_captured")
    model, (x,) = entry.make(size="small", dtype=dtype, seed=3)
    out, reps, _ = _compile(model, x, dynamo=entry.dynamo_config)
    (rep,) = reps
    assert len(rep.moe_layers) == 1 and "loop form, 4 experts" in rep.moe_layers[0]
    ops = _ops(rep)
    assert ops.count("moe_experts.default") == 1
    assert not any(o.startswith(("nonzero", "index_put", "index_add", "_assert")) for o in ops), ops
    _check(model, x, out)


def test_token_count_changes_recompile_dynamic_and_stay_rewritten():
    model = _moe_top2(torch.float32)
    compiled = torch.compile(model, backend="fuse")
    with torch.no_grad(), records.collect() as reps:
        for tokens in (16, 9, 5):                       # the second shape compiles with a symbolic count
            x = torch.randn(tokens, 48)
            _check(model, x, compiled(x))
    assert len(reps) >= 2 and all(len(r.moe_layers) == 1 for r in reps)
    assert any(n.kind == "placeholder" and n.meta is not None and not isinstance(n.meta.shape[0], int)
               for r in reps for n in r.graph.nodes())


def test_zoo_mixtral_moe_graph_broken_experts_are_left_alone():
    """Dynamo breaks the plain loop at torch.where: each graph is one expert FFN, no layer to rewrite."""
    entry = models.get("mixtral_moe")
    model, (x,) = entry.make(size="small", seed=4)
    out, reps, _ = _compile(model, x)
    assert reps and not any(r.moe_layers for r in reps)
    _check(model, x, out)


def test_option_and_env_turn_the_rewrite_off(monkeypatch):
    model = _moe_top2(torch.float32)
    x = torch.randn(16, 48)
    out, reps, _ = _compile(model, x, options={"moe_op": False})
    assert not reps[0].moe_layers and "moe_experts.default" not in _ops(reps[0])
    _check(model, x, out)
    monkeypatch.setenv("FUSEBACKEND_MOE_OP", "0")
    _, reps, _ = _compile(model, x)
    assert not reps[0].moe_layers
    _, reps, _ = _compile(model, x, options={"cudagraphs": True})    # CUDA graphs: the sync would stop capture
    assert not reps[0].moe_layers


def test_training_graphs_are_not_rewritten():
    model = _moe_top2(torch.float32).train()
    x = torch.randn(16, 48, requires_grad=True)
    torch._dynamo.reset()
    with records.collect() as reps:
        out = torch.compile(model, backend="fuse")(x)
    out.sum().backward()
    assert reps and not any(r.moe_layers for r in reps)
    assert x.grad is not None


def _routed(model, hidden, experts, order, special=None, tokens=12):
    """Inputs whose top-k is fixed: feature 0 is 10 for every token and the router's column 0 ranks the
    experts by `order` (so every token picks the same ones); feature 1 is 10 for token `special` only and
    column 1 lifts expert `order[-1]` above all for it (one token to that expert)."""
    with torch.no_grad():
        w = model.router.weight if hasattr(model, "router") else model.gate.weight
        w.zero_()
        for rank, e in enumerate(order):
            w[e, 0] = 1.0 - 0.1 * rank
        if special is not None:
            w[order[-1], 1] = 5.0
    x = torch.randn(tokens, hidden, dtype=w.dtype) * 0.1
    x[:, 0] = 10.0
    x[:, 1] = 0.0
    if special is not None:
        x[special, 1] = 10.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["all_to_one", "all_to_two", "one_token"])
def test_routing_with_idle_experts_single_tokens_and_one_expert(dtype, case):
    top_k = 1 if case == "all_to_one" else 2
    model = _moe_top2(dtype, top_k=top_k)
    x = _routed(model, 48, 8, [5, 2, 7], special=3 if case == "one_token" else None)
    with torch.no_grad():
        idx = torch.topk(model.router(x).float(), top_k, dim=-1)[1]
    counts = torch.bincount(idx.flatten(), minlength=8).tolist()
    want = {"all_to_one": [0, 0, 0, 0, 0, 12, 0, 0], "all_to_two": [0, 0, 12, 0, 0, 12, 0, 0],
            "one_token": [0, 0, 11, 0, 0, 12, 0, 1]}[case]
    assert counts == want, counts               # the routing the case is about (5 idle experts at least)
    out, reps, _ = _compile(model, x)
    assert len(reps[0].moe_layers) == 1
    _check(model, x, out)


def _random_case(T, E, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    H, Fn = 16, 24
    hidden = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    idx[: T // 2] = torch.arange(k)              # experts 0..k-1 get at least half the tokens
    w = torch.rand(T, k, generator=g).to(dtype)
    ex = [(torch.randn(s, generator=g) * 0.2).to(dtype) for _ in range(E) for s in ((Fn, H), (Fn, H), (H, Fn))]
    return hidden, idx, w, ex


@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 4, 2), (5, 8, 1), (9, 6, 3), (32, 8, 2)])
def test_sorted_executor_is_reference_moe(T, E, k):
    """float64: the one-sync formula is the per-expert one; float32 on the CPU: bit for bit (each token's
    terms added in expert order by one index_add_, as reference_moe's index_adds do)."""
    for dtype, exact in ((torch.float64, False), (torch.float32, True), (torch.bfloat16, False)):
        hidden, idx, w, ex = _random_case(T, E, k, dtype, seed=T * 100 + E * 10 + k)
        got = sorted_moe(hidden, idx, w, expert_triples(ex, 0))
        want = reference_moe(hidden, idx, w, ex, 0)
        assert got.dtype == hidden.dtype and got.shape == hidden.shape
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-12, atol=1e-12)


def test_sorted_executor_fuses_gate_and_up_of_one_storage():
    hidden, idx, w, ex = _random_case(9, 4, 2, torch.float64, seed=7)
    fused = []
    for e in range(4):                            # gate and up rows of one [2F, H] tensor, as HF's gate_up_proj
        gu = torch.cat([ex[3 * e], ex[3 * e + 1]])
        fused += [gu[:24], gu[24:], ex[3 * e + 2]]
    calls = []
    real = F.linear

    def spy(x, weight, *a):
        calls.append(tuple(weight.shape))
        return real(x, weight, *a)
    try:
        F.linear = spy
        got = sorted_moe(hidden, idx, w, expert_triples(fused, 0))
    finally:
        F.linear = real
    torch.testing.assert_close(got, reference_moe(hidden, idx, w, ex, 0), rtol=1e-12, atol=1e-12)
    hit = len(set(idx.flatten().tolist()))
    assert calls.count((48, 16)) == hit and calls.count((24, 16)) == 0


class _TwoLayers(torch.nn.Module):
    def __init__(self, dtype, loop):
        super().__init__()
        if loop:
            entry = models.get("mixtral_moe_captured")
            self.a, _ = entry.make(size="small", dtype=dtype, seed=1)
            self.b, _ = entry.make(size="small", dtype=dtype, seed=2)
        else:
            self.a, self.b = _moe_top2(dtype), _moe_top2(dtype)

    def forward(self, x):
        return self.b(x + self.a(x))


class _Syncs:
    """Counts the host syncs a call makes: ATen ops whose result size or value the host reads (nonzero,
    _local_scalar_dense: what .item() and a data-dependent size run), as the profiler records them wherever
    they are called from, and Tensor.tolist / cpu from Python (the op's one copy of the expert boundaries).
    (A TorchDispatchMode would make Dynamo run the model eagerly instead of the compiled program.)"""

    SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::unique",
                "aten::_unique2", "aten::bincount")

    def __init__(self, monkeypatch):
        self.python = 0
        for meth in ("tolist", "cpu"):
            real = getattr(torch.Tensor, meth)

            def counted(t, *a, _real=real, **kw):
                self.python += 1
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, meth, counted)

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.aten = sum(1 for e in self.prof.events() if e.name in self.SYNC_OPS)
        self.count = self.aten + self.python
        return False


@pytest.mark.parametrize("loop", [False, True])
def test_one_host_sync_per_layer(monkeypatch, loop):
    model = _TwoLayers(torch.float32, loop)
    x = torch.randn(2, 8, 32) if loop else torch.randn(16, 48)
    dynamo = CAPTURE if loop else None
    out, reps, compiled = _compile(model, x, dynamo=dynamo)
    assert sum(len(r.moe_layers) for r in reps) == 2
    _check(model, x, out)
    with torch.no_grad(), torch._dynamo.config.patch(**(dynamo or {})):
        off = torch.compile(model, backend="fuse", options={"moe_op": False})
        off(x)
        compiled(x)
        with _Syncs(monkeypatch) as s:
            compiled(x)
        mine = s.count
        with _Syncs(monkeypatch) as s:
            off(x)
        theirs = s.count
    assert mine == 2
    if loop:                                    # the loop: a torch.where per expert (4 per layer), and the
        assert theirs >= 8                      # program reads some of their sizes back (.item)
    else:
        assert theirs == 0                      # the dense form has none


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_a_dense_cuda_layer_keeps_its_own_kernels(cudagraphs):
    """On fake CUDA tensors (capture/fake_cuda.py, as bench/plan_cuda.py traces): the dense masked form stays as
    its own kernels on CUDA (no sync; on the H200 0.569 ms against 1.116 as the op), with or without cudagraphs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import detect_fake_mode
    from fusebackend.capture import decompositions, fake_cuda, moe_layers
    from fusebackend.graph import lower
    from fusebackend.options import FuseOptions
    opts, seen = FuseOptions(cudagraphs=cudagraphs), []

    def planner(gm, example_inputs):
        fg = lower(gm)
        rep = records.GraphReport(kind="inference", graph=fg)
        seen.append((fg, moe_layers.rewrite(fg, opts, "inference", rep)))
        return lambda *a: None

    def capture(gm, example_inputs):
        runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        fake = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs)
        aot_autograd(fw_compiler=planner, inference_compiler=planner,
                     decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul))(
            fake_cuda.retarget(gm), fake)
        return runnable.forward
    model = _moe_top2(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(torch.randn(16, 48, dtype=torch.bfloat16))
    (fg, done), = seen
    ops = [n for n in fg.nodes() if n.target is not None and n.op_name == "moe_experts.default"]
    assert not done and not ops
    assert any(n.device == "cuda" for n in fg.nodes())


def test_explain_and_dump_name_the_rewritten_layer():
    import fusebackend
    from fusebackend.inspection.dump import graph_data
    from fusebackend.inspection.dump_text import render_text
    model = _moe_top2(torch.float32)
    x = torch.randn(16, 48)
    with torch.no_grad():
        rep = fusebackend.explain(model, x)
    text = str(rep)
    assert rep.moe_layers and "dense form, 8 experts, top-2) -> moe_experts_layer0" in text, text
    data = graph_data(rep.graph_reports[0], 0)
    assert data["moe_layers"] == rep.moe_layers
    assert "MoE layers as one moe_experts op (1):" in render_text(data)
