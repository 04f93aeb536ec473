"""Whole MoE layers found (passes/pattern_moe_layer.py) and rewritten into one moe_experts op
(passes/placement_moe.py), run through the normal CPU pipeline with the op's reference formula, against eager."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd

from fusebackend.capture import decompositions, records
from fusebackend.capture.kernels import build_kernels
from fusebackend.graph import lower
from fusebackend.graph.moe_op import OP, reference_moe
from fusebackend.options import FuseOptions
from fusebackend.passes import plan_groups
from fusebackend.passes.pattern_moe_layer import find_moe_layers
from fusebackend.passes.patterns import find_patterns
from fusebackend.passes.sentinel_masks import drop_impossible_masks
from fusebackend.passes.placement_moe import rewrite_layer
from fusebackend.runtime import build_program

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.mixtral import MoEConfig, SparseMoE  # noqa: E402


def _compile(model, x, seen, rewrite=True):
    """torch.compile through AOT with fuse's decompositions; each graph's layers rewritten, then the usual
    passes, kernels and program. seen: the graphs' FusionGraphs and layers, for the asserts."""
    opts = FuseOptions()

    def comp(gm, example_inputs):
        fg = lower(gm)
        drop_impossible_masks(fg)      # as the pipeline does first (moe_rewrite): transformers 5.17's masks
        layers = find_moe_layers(fg, find_patterns(fg))
        seen.append((fg, layers))
        if rewrite:
            for i, layer in enumerate(layers):
                rewrite_layer(fg, layer, 10_000 + i)
        rep = records.GraphReport(kind="inference", graph=fg)
        groups, batches = plan_groups(fg, opts.max_group_nodes)
        program = build_program(fg, groups, build_kernels(fg, groups, opts, rep), opts, batches)

        def run(args):
            return program(args)
        run._boxed_call = True
        return run
    torch._dynamo.reset()
    be = aot_autograd(fw_compiler=comp, inference_compiler=comp, decompositions=decompositions.table(8, False))
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return torch.compile(model, backend=be)(x)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 2), (6, 3)])
def test_captured_layer_is_one_op_and_matches_eager(dtype, experts, top_k):
    torch.manual_seed(experts * 10 + top_k)
    model = SparseMoE(MoEConfig(2, 7, 32, 48, experts, top_k)).eval().to(dtype)
    x = torch.randn(2, 7, 32, dtype=dtype)
    seen = []
    got = _compile(model, x, seen)
    (fg, layers), = seen
    assert len(layers) == 1 and len(layers[0].experts) == experts
    ops = [n.op_name for n in fg.nodes()]
    assert ops.count("moe_experts.default") == 1 and not any(o.startswith("nonzero") for o in ops)
    with torch.no_grad():
        ref = model(x)
        ref64 = model.double()(x.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:   # half types: within what eager itself shows against float64
        assert _max_err(got, ref64) <= max(_max_err(ref, ref64), 1e-3) * 1.5


class _LeakyMoE(SparseMoE):
    """The running sum is also returned after the first expert: the layer's intermediate is read outside."""

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        h = hidden_states.view(-1, d)
        rw = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        rw, sel = torch.topk(rw, self.top_k, dim=-1)
        rw = (rw / rw.sum(dim=-1, keepdim=True)).to(h.dtype)
        final = torch.zeros_like(h)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        partial = None
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            y = self.experts[e](h[None, top_x].reshape(-1, d)) * rw[top_x, idx, None]
            final = final.index_add(0, top_x, y)
            if e == 0:
                partial = final * 2
        return final.reshape(b, s, d), partial


def test_a_layer_whose_partial_sum_is_read_elsewhere_is_not_rewritten():
    torch.manual_seed(3)
    model = _LeakyMoE(MoEConfig(1, 6, 16, 32, 4)).eval()
    x = torch.randn(1, 6, 16)
    seen = []
    got = _compile(model, x, seen)
    assert all(not layers for _, layers in seen)
    with torch.no_grad():
        ref = model(x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_formula_is_the_routed_sum():
    torch.manual_seed(0)
    T, H, Fn, E, k = 9, 8, 12, 5, 2
    hidden = torch.randn(T, H, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=torch.float64)
    ex = [torch.randn(s, dtype=torch.float64) for _ in range(E) for s in ((Fn, H), (Fn, H), (H, Fn))]
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            g, u, d = ex[3 * idx[t, j]:3 * idx[t, j] + 3]
            want[t] += w[t, j] * (d @ (F.silu(g @ hidden[t]) * (u @ hidden[t])))
    torch.testing.assert_close(reference_moe(hidden, idx, w, ex), want)
    torch.testing.assert_close(OP(hidden, idx, w, ex, 987654), want)      # no handler bound: the formula


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_grouped_layers_become_one_op_each_and_match_eager(family):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "targets"))
    import hf_moe_tiny
    model, (ids,) = getattr(hf_moe_tiny, family)()
    seen = []
    got = _compile(model, ids, seen)
    layers = [L for _, ls in seen for L in ls]
    assert len(layers) == 2 and all(L.layout == 1 and len(L.experts) == 4 for L in layers)
    for fg, _ in seen:
        ops = [n.op_name for n in fg.nodes()]
        assert ops.count("moe_experts.default") == 2 and not any("grouped" in o for o in ops), ops
    with torch.no_grad():
        ref = model(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bound_layers_run_the_hybrid_schedule_and_match_the_formula():
    """The runtime binding (runtime/placed_moe.py) on the simulated CUDA API of test_hybrid_moe: two layers
    sharing one staging pool and one correction, the second prefetched while the first runs."""
    from hybrid_sim import SimApi, make_experts
    from fusebackend.passes.hardware_profile import reference_h200
    from fusebackend.runtime.placed_moe import ModelMoE, bind
    torch.manual_seed(1)
    E, H, Fn, T, k = 6, 32, 48, 5, 2
    model = ModelMoE(reference_h200(), staging_slots=2)
    model.api = SimApi()
    layers = [make_experts(E, H, Fn, torch.float32, seed=s) for s in (0, 1)]
    flat = [[t for trio in ex for t in trio] for ex in layers]
    keys = [900_001, 900_002]
    bindings = [bind(model, key, resident=[0, 3]) for key in keys]
    for _ in range(3):
        for key, ex in zip(keys, flat):
            hidden = torch.randn(T, H)
            idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
            w = torch.rand(T, k)
            got = OP(hidden, idx, w, ex, key, 0)
            torch.testing.assert_close(got, reference_moe(hidden, idx, w, ex), rtol=1e-5, atol=1e-5)
    assert [b.layer is not None for b in bindings] == [True, True] and model.layers == bindings
    assert len(model.pools) == 1 and all(b.layer.pool is model.pools[(H, Fn, torch.float32)] for b in bindings)
    assert all(b.failed is None for b in bindings)


def test_a_layer_that_cannot_run_falls_back_to_the_formula_with_one_warning(monkeypatch):
    from fusebackend.passes.hardware_profile import reference_h200
    from fusebackend.runtime import placed_moe
    from fusebackend.runtime.placed_moe import ModelMoE, bind

    class Broken:
        def __init__(self, *a, **kw):
            raise RuntimeError("cudaHostRegister failed")
    monkeypatch.setattr(placed_moe, "HybridMoELayer", Broken)
    model = ModelMoE(reference_h200(), staging_slots=0)
    model.api = object()
    binding = bind(model, 900_003, resident=[])
    hidden, idx, w = torch.randn(3, 8), torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
    ex = [torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)] * 2
    with pytest.warns(UserWarning, match="hybrid MoE layer.*cudaHostRegister failed"):     # warned once
        got = OP(hidden, idx, w, ex, 900_003, 0)
    torch.testing.assert_close(got, reference_moe(hidden, idx, w, ex))
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        OP(hidden, idx, w, ex, 900_003, 0)                          # no second warning
    assert binding.failed is not None


def test_graphs_of_one_model_share_the_hybrid_layer_of_the_same_experts():
    """HF generate compiles a prefill and decode graphs; each has its own moe_experts op for the same layer.
    They must run one HybridMoELayer (one set of resident copies under the budget, one popularity score): the
    decode graphs' plans found the budget held by the prefill graph's resident experts and homed none."""
    from hybrid_sim import SimApi, make_experts
    from fusebackend.passes.hardware_profile import reference_h200
    from fusebackend.runtime.placed_moe import ModelMoE, bind
    torch.manual_seed(2)
    E, H, Fn, T, k = 6, 32, 48, 4, 2
    model = ModelMoE(reference_h200(), staging_slots=2)
    model.api = SimApi()
    ex = [t for trio in make_experts(E, H, Fn, torch.float32, seed=3) for t in trio]
    other = [t for trio in make_experts(E, H, Fn, torch.float32, seed=4) for t in trio]
    prefill, decode, second = bind(model, 900_011, resident=[0, 3]), bind(model, 900_012, resident=[]), \
        bind(model, 900_013, resident=[1])
    for key, weights, t in ((900_011, ex, T), (900_012, ex, 1), (900_013, other, 1)):
        hidden, w = torch.randn(t, H), torch.rand(t, k)
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(t)])
        torch.testing.assert_close(OP(hidden, idx, w, weights, key, 0), reference_moe(hidden, idx, w, weights),
                                   rtol=1e-5, atol=1e-5)
    assert decode.layer is prefill.layer and sorted(prefill.layer.gpu) == [0, 3]
    assert second.layer is not prefill.layer and sorted(second.layer.gpu) == [1]
    assert len(model.traces()) <= 2
