"""passes/patterns.py: MoE experts (routed, shared, graph-broken, batched, grouped) and attention found in the
ATen graphs fuse's capture makes of the zoo and of tiny HF configs (transformers 5.x), on the CPU and on
fake CUDA tensors; their boundaries clean (movable as a unit), their sizes and weight bytes those of the model.

Counting graph-broken forms: a graph Dynamo compiles once serves several calls (every layer, every expert
the eager loop runs), so "found per layer" is the sum over graphs of candidates x fg.calls.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusebackend.graph import FusionGraph
from fusebackend.passes.patterns import find_patterns
from fusebackend.passes.sentinel_masks import drop_impossible_masks
from placement_graphs import TINY, trace_graphs, tiny_hf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from models.mixtral import MoEConfig, SparseMoE  # noqa: E402

pytest.importorskip("transformers")
# transformers' grouped_mm check calls an lru_cache'd version test that Dynamo warns about
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
H, FF, E, LAYERS = TINY["hidden"], TINY["ffn"], TINY["experts"], TINY["layers"]
DISPATCH = {"topk", "nonzero", "index_put", "index_add", "scatter", "scatter_add", "embedding", "sort", "histc"}


@functools.lru_cache(None)
def traced(key):
    """(graphs, model) per case, traced once per session."""
    kind, name, *rest = key
    if kind == "zoo":
        entry = models.get(name)
        model, inputs = entry.make(size="small", seed=0)
        return trace_graphs(model, inputs, entry.dynamo_config, device=rest[0] if rest else "cpu"), model
    impl, device, dtype = rest
    model, inputs = tiny_hf(name, impl, dtype=getattr(torch, dtype))
    return trace_graphs(model, inputs, device=device), model


def found(graphs):
    """Patterns as the pipeline finds them (passes/moe_rewrite.py, capture/placement.py): after the masks
    that can never be true are dropped (transformers 5.17 masks every grouped product with one)."""
    return [(fg, (drop_impossible_masks(fg), find_patterns(fg))[1]) for fg in graphs]


def ops_of(fg, nodes, skip=("view", "_unsafe_view", "permute", "unsqueeze", "squeeze", "slice", "alias",
                            "expand", "clone", "_to_copy")):
    names = [fg.node(n).op_name.split(".")[0] for n in nodes]
    return sorted(n for n in names if n not in skip)


def check_boundaries(fg, pats):
    """Every candidate: disjoint from routers and other layers' candidates, no dispatch op, entry outside,
    exit inside, and only the exit read from outside (it can move to another device as a unit)."""
    routers = set().union(*[r.nodes for r in pats.routers]) if pats.routers else set()
    cands = pats.experts + pats.attention
    for c in cands:
        assert not c.nodes & routers, (c.layer, c.nodes & routers)
        assert not {fg.node(n).op_name.split(".")[0] for n in c.nodes} & DISPATCH
        exit_name = c.exit if isinstance(c.exit, str) else c.exit.name
        entries = [c.entry.name] if hasattr(c, "entry") else [c.q.name, c.k.name, c.v.name]
        assert exit_name in c.nodes and not set(entries) & c.nodes
        for n in c.nodes - {exit_name}:
            assert set(fg.users(n)) <= c.nodes and n not in fg.output_names(), (n, fg.users(n))
        for d in cands:
            if d is not c and d.nodes != c.nodes:       # batched experts of a layer share theirs
                assert not c.nodes & d.nodes


def assert_swiglu(e, weights_bytes, tokens):
    assert (e.hidden, e.ffn, e.gated, e.tokens) == (H, FF, True, tokens)
    assert sorted(w.bytes for w in e.weights) == sorted(weights_bytes)


# ---- MoE experts ----

def test_captured_zoo_layer_finds_its_four_experts_beside_its_router():
    graphs, model = traced(("zoo", "mixtral_moe_captured"))
    [(fg, pats)] = found(graphs)
    check_boundaries(fg, pats)
    [router] = pats.routers
    assert (router.experts, router.top_k) == (4, 2)
    assert [(e.layer, e.expert, e.kind, e.form, e.router) for e in pats.experts] == \
        [(0, i, "routed", "loop", router.topk) for i in range(4)]
    w = model.experts[0].w1.weight
    for i, e in enumerate(pats.experts):
        assert_swiglu(e, [w.numel() * 4] * 3, "u%d" % i)      # unbacked token counts, one per expert
        assert e.label == "experts.%d" % i and {w.role for w in e.weights} == {"gate", "up", "down"}
        assert ops_of(fg, e.nodes) == ["mm", "mm", "mm", "mul", "mul", "sigmoid"]
        assert fg.node(e.entry.name).op_name.startswith("index")    # its gathered tokens


def test_graph_broken_zoo_loop_gives_one_expert_per_ffn_graph():
    graphs, model = traced(("zoo", "mixtral_moe"))
    res = found(graphs)
    # the loop runs eagerly: Dynamo compiles the expert FFN with a static token count, then once dynamic
    assert len(graphs) == 2 and all(len(p.experts) == 1 for _, p in res)
    assert sum(len(p.experts) * fg.calls for fg, p in res) == 4           # 4 experts x 1 layer, per call
    for fg, pats in res:
        [e] = pats.experts
        check_boundaries(fg, pats)
        assert (e.layer, e.expert, e.form, e.router, pats.routers) == (0, None, "graph", None, [])
        assert all(fg.node(w.input).kind == "placeholder" and w.expert_index is None for w in e.weights)
        assert fg.node(e.entry.name).kind == "placeholder"
    # token counts: the first call's static, the recompiled graph's a symbol
    assert isinstance(res[0][1].experts[0].tokens, int) and isinstance(res[1][1].experts[0].tokens, str)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_eager_expert_loop_runs_its_experts_outside_every_graph(family):
    """transformers 5.x: the loop over `expert_hit` (nonzero) graph-breaks and runs eagerly; its products
    by gate_up_proj[e] / down_proj[e] reach no graph (only SiLU does), so no routed expert can be found.
    Qwen2-MoE's shared expert runs before the loop, in the graph that ends at the router: found there."""
    graphs, model = traced(("hf", family, "eager", "cpu", "float32"))
    res = found(graphs)
    assert sum(len(p.routers) * fg.calls for fg, p in res) == LAYERS
    assert sum(len(p.attention) * fg.calls for fg, p in res) == LAYERS
    assert not any(e.kind == "routed" for _, p in res for e in p.experts)
    assert not any("gate_up_proj" in lab for fg in graphs for lab in getattr(fg, "input_labels", {}).values())
    shared = [(fg, e) for fg, p in res for e in p.experts]
    assert sum(fg.calls for fg, _ in shared) == (LAYERS if family == "qwen2_moe" else 0)
    for fg, e in shared:            # one graph, called once per layer: labels relative to the MoE block
        assert (e.layer, e.kind, e.ffn, e.label) == (0, "shared", TINY["shared_ffn"], "shared_expert")
        assert e.weight_bytes == sum(p.numel() * 4 for p in model.inner.model.layers[0].mlp.shared_expert.parameters())
    for fg, pats in res:
        check_boundaries(fg, pats)


@pytest.mark.parametrize("impl,device,dtype", [("batched_mm", "cpu", "float32"), ("grouped_mm", "cpu", "float32"),
                                               ("grouped_mm", "cuda", "bfloat16")])
def test_hf_mixtral_batched_and_grouped_experts_are_slices_of_3d_weights(impl, device, dtype):
    graphs, model = traced(("hf", "mixtral", impl, device, dtype))
    [(fg, pats)] = found(graphs)                    # no graph break: the whole model is one graph
    check_boundaries(fg, pats)
    assert {fg.node(n).device for n in pats.experts[0].nodes} == {device}
    assert [(e.layer, e.expert) for e in pats.experts] == [(l, i) for l in range(LAYERS) for i in range(E)]
    assert len(pats.routers) == LAYERS and len(pats.attention) == LAYERS
    item = getattr(torch, dtype).itemsize
    for e in pats.experts:
        experts = model.inner.model.layers[e.layer].mlp.experts
        assert e.form == ("batched" if impl == "batched_mm" else "grouped") and e.kind == "routed"
        assert_swiglu(e, [2 * FF * H * item, H * FF * item], 2 * 16)           # 16 tokens x top-2 rows
        assert {(w.role, w.expert_index, w.shape) for w in e.weights} == \
            {("gate_up", e.expert, (2 * FF, H)), ("down", e.expert, (H, FF))}
        assert e.label == "inner.model.layers.%d.mlp.experts[%d]" % (e.layer, e.expert)
        assert {fg.input_labels[w.input] for w in e.weights} == \
            {"inner.model.layers.%d.mlp.experts.%s" % (e.layer, n) for n in ("gate_up_proj", "down_proj")}
        assert experts.gate_up_proj.shape == (E, 2 * FF, H) and e.side_inputs      # reads expert ids/offsets
        assert e.router == pats.routers[e.layer].topk
    layer0 = [e for e in pats.experts if e.layer == 0]
    assert len({e.nodes for e in layer0}) == 1 and ops_of(fg, layer0[0].nodes).count("sigmoid") == 1


def test_qwen2_moe_shared_expert_is_always_on_beside_the_routed_ones():
    graphs, model = traced(("hf", "qwen2_moe", "batched_mm", "cpu", "float32"))
    [(fg, pats)] = found(graphs)
    check_boundaries(fg, pats)
    routed = [e for e in pats.experts if e.kind == "routed"]
    shared = [e for e in pats.experts if e.kind == "shared"]
    assert len(routed) == E * LAYERS and [e.layer for e in shared] == list(range(LAYERS))
    for e in shared:
        ref = model.inner.model.layers[e.layer].mlp.shared_expert
        assert (e.expert, e.form, e.hidden, e.ffn, e.tokens, e.router) == \
            (None, "dense", H, TINY["shared_ffn"], 16, pats.routers[e.layer].topk)
        assert e.weight_bytes == sum(p.numel() * 4 for p in ref.parameters())
        assert e.label == "inner.model.layers.%d.mlp.shared_expert" % e.layer
        assert {w.role for w in e.weights} == {"gate", "up", "down"}


def test_hf_5x_expert_loop_traced_whole_finds_each_experts_slice():
    """The transformers 5.x experts body (F.linear on gate_up_proj[e] / down_proj[e], chunk, index_add_)
    as it looks when the loop is over range(E) and traced whole (capture_dynamic_output_shape_ops). (With
    transformers' own 0-d tensor index, W3[expert_idx], Dynamo cannot trace it: an unbacked select.)"""
    class SliceExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(H, E, bias=False)
            self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * FF, H) * 0.1)
            self.down_proj = nn.Parameter(torch.randn(E, H, FF) * 0.1)

        def forward(self, x):
            h = x.view(-1, H)
            w, idx = torch.topk(F.softmax(self.gate(h).float(), dim=-1), 2, dim=-1)
            out, mask = torch.zeros_like(h), F.one_hot(idx, E).permute(2, 1, 0)
            for e in range(E):
                pos, tok = torch.where(mask[e])
                gate, up = F.linear(h[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
                out.index_add_(0, tok, F.linear(F.silu(gate) * up, self.down_proj[e]) * w[tok, pos, None])
            return out.view_as(x)

    torch.manual_seed(0)
    graphs = trace_graphs(SliceExperts().eval(), (torch.randn(2, 8, H),),
                          {"capture_dynamic_output_shape_ops": True})
    [(fg, pats)] = found(graphs)
    check_boundaries(fg, pats)
    assert [(e.expert, e.form, e.layer) for e in pats.experts] == [(i, "loop", 0) for i in range(E)]
    for e in pats.experts:
        assert_swiglu(e, [2 * FF * H * 4, H * FF * 4], e.tokens)
        assert {(w.role, w.expert_index, w.shape) for w in e.weights} == \
            {("gate_up", e.expert, (2 * FF, H)), ("down", e.expert, (H, FF))}


def test_decode_expert_on_fake_cuda_is_found_in_its_gemv_spelling():
    """One token, bf16 on (fake) CUDA: capture/decomp_gemv.py spells each product as a row reduction."""
    cfg = MoEConfig(batch=1, seq=1, dim=64, ffn=128, experts=4)
    torch.manual_seed(0)
    model = SparseMoE(cfg).to(torch.bfloat16).eval()
    graphs = trace_graphs(model, (torch.randn(1, 1, 64, dtype=torch.bfloat16),), device="cuda")
    res = {p.experts[0].tokens: (fg, p) for fg, p in found(graphs)}
    # the zoo loop calls every expert: the 2 picked ones with 1 token, the others with none (a 0-row graph)
    assert sorted(res) == [0, 1] and [res[t][0].calls for t in (0, 1)] == [2, 2]
    for tokens, (fg, pats) in res.items():
        [e] = pats.experts
        check_boundaries(fg, pats)
        products = ops_of(fg, e.nodes)
        assert products.count("sum" if tokens else "mm") == 3 and ("mm" in products) == (tokens == 0)
        assert (e.hidden, e.ffn, e.form, e.dtype, e.gated) == (64, 128, "graph", torch.bfloat16, True)
        assert e.weight_bytes == 3 * 64 * 128 * 2


def test_dense_mlps_are_not_experts():
    for name in ("mlp", "llama_layer", "gpt2_block"):
        graphs, _ = traced(("zoo", name))
        assert all(not p.experts and not p.routers for _, p in found(graphs)), name


# ---- attention ----

@pytest.mark.parametrize("name,heads,kv_heads,head_dim,form", [
    ("llama_layer", 4, 2, 16, "sdpa"), ("gpt2_block", 4, 4, 16, "sdpa"), ("gpt2_block_eager_attn", 4, 4, 16, "matmul")])
def test_zoo_attention_found_once(name, heads, kv_heads, head_dim, form):
    graphs, _ = traced(("zoo", name))
    [(fg, pats)] = found(graphs)
    [a] = pats.attention
    check_boundaries(fg, pats)
    assert (a.form, a.batch, a.q_heads, a.kv_heads, a.q_len, a.context, a.head_dim) == \
        (form, 2, heads, kv_heads, 16, 16, head_dim)
    assert (a.kv_source, a.kv_inputs, a.kv_bytes) == ("computed", (), 2 * 2 * kv_heads * 16 * head_dim * 4)
    assert ops_of(fg, a.nodes).count("exp") == (1 if form == "matmul" else 0)


def test_hf_attention_found_per_layer():
    for key, kv_heads in ((("hf", "gpt2", "eager", "cpu", "float32"), TINY["heads"]),
                          (("hf", "mixtral", "grouped_mm", "cuda", "bfloat16"), TINY["kv_heads"])):
        graphs, _ = traced(key)
        [(fg, pats)] = found(graphs)
        assert [a.layer for a in pats.attention] == list(range(LAYERS))
        for a in pats.attention:
            assert (a.batch, a.q_heads, a.kv_heads, a.context, a.head_dim) == (2, 4, kv_heads, 8, H // 4)
            assert a.label.endswith(("h.%d.attn" if key[1] == "gpt2" else "layers.%d.self_attn") % a.layer)


class CachedAttention(nn.Module):
    """Decode attention over a KV cache: updated in the graph (index_copy_ into buffers, or cat with the
    past), or read as given; GQA through SDPA's enable_gqa."""

    def __init__(self, mode, heads=4, kv=2, ctx=16, batch=2):
        super().__init__()
        self.mode, self.h, self.kv, self.d = mode, heads, kv, H // heads
        self.q, self.o = nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)
        self.k, self.v = nn.Linear(H, kv * self.d, bias=False), nn.Linear(H, kv * self.d, bias=False)
        self.register_buffer("kc", torch.zeros(batch, kv, ctx, self.d))
        self.register_buffer("vc", torch.zeros(batch, kv, ctx, self.d))

    def forward(self, x, pos, past_k, past_v):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2)
        if self.mode == "index_copy":
            self.kc.index_copy_(2, pos, k)
            self.vc.index_copy_(2, pos, v)
            k, v = self.kc, self.vc
        elif self.mode == "cat":
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        else:
            k, v = past_k, past_v
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("mode,device,source,context", [
    ("index_copy", "cpu", "updated", 16), ("cat", "cpu", "updated", 8), ("input", "cpu", "input", 7),
    ("cat", "cuda", "updated", 8)])        # fake CUDA: GQA SDPA takes the math path, matmul -> softmax
def test_kv_cache_source(mode, device, source, context):
    torch.manual_seed(0)
    past = torch.randn(2, 2, 7, H // 4)
    graphs = trace_graphs(CachedAttention(mode).eval(), (torch.randn(2, 1, H), torch.tensor([3]), past, past + 1),
                          device=device)
    [(fg, pats)] = found(graphs)
    [a] = pats.attention
    check_boundaries(fg, pats)
    assert (a.form, a.q_len, a.q_heads, a.kv_heads, a.head_dim) == \
        ("matmul" if device == "cuda" else "sdpa", 1, 4, 2, H // 4)
    assert (a.kv_source, a.context, a.kv_from_input) == (source, context, True)
    per_position = 2 * 2 * 2 * (H // 4) * 4                      # K and V: batch x kv heads x head dim, fp32
    assert (a.kv_bytes_per_position, a.kv_bytes) == (per_position, per_position * context)
    labels = [fg.input_labels.get(n) for n in a.kv_inputs]
    assert labels == (["kc", "vc"] if mode == "index_copy" else [None, None])
    assert all(fg.node(n).kind == "placeholder" and fg.meta_of(n).shape[1] == 2 for n in a.kv_inputs)
    assert len(a.kv_updates) == (2 if source == "updated" else 0) and not set(a.kv_updates) & a.nodes


def test_unknown_graphs_find_nothing_and_never_raise():
    assert find_patterns(FusionGraph()).experts == [] and find_patterns(FusionGraph()).attention == []
    for name in ("small_cnn", "vit_block"):
        graphs, _ = traced(("zoo", name))
        for fg, pats in found(graphs):
            check_boundaries(fg, pats)
            assert not pats.experts and len(pats.attention) == (name == "vit_block")
