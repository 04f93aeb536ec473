"""passes/sentinel_masks.py: a `where` on `top-k ids >= E` (transformers 5.17's sentinel rows) is dropped, and
only when the mask can never be true; the graph computes what eager does either way."""
import pytest
import torch

import fusebackend
from fusebackend.graph import lower
from fusebackend.passes.sentinel_masks import drop_impossible_masks


def _layer(threshold):
    def f(scores, x):
        _, idx = torch.topk(scores, 2, dim=-1)               # ids in [0, 8)
        ids, perm = torch.sort(idx.reshape(-1))
        rows = x[perm // 2]
        mask = (ids >= threshold).unsqueeze(-1)
        rows = rows.masked_fill(mask, 0.0)
        ids = ids.clamp(max=7)
        return torch.relu(rows) * 2 + ids.unsqueeze(-1).float()
    return f


def _graph(fn, *args):
    from fusebackend.capture.decompositions import table
    gm = torch.fx.experimental.proxy_tensor.make_fx(fn, decomposition_table=table())(*args)   # as AOT hands it
    return lower(gm)


def _wheres(fg):
    return [n for n in fg.nodes() if n.target is not None and n.op_name.split(".")[0] == "where"]


@pytest.mark.parametrize("threshold, dropped", [(8, 1), (9, 1), (7, 0), (3, 0)])
def test_only_a_mask_that_can_never_be_true_is_dropped(threshold, dropped):
    scores, x = torch.randn(5, 8), torch.randn(5, 16)
    fg = _graph(_layer(threshold), scores, x)
    before = len(_wheres(fg))
    assert before == 1
    assert drop_impossible_masks(fg) == dropped
    assert len(_wheres(fg)) == before - dropped
    if dropped:      # the mask's own ops went with it
        assert not [n for n in fg.nodes() if n.target is not None and n.op_name.split(".")[0] == "ge"]


@pytest.mark.parametrize("threshold", [8, 7, 3])
def test_compiled_layer_matches_eager(threshold):
    fn = _layer(threshold)
    compiled = torch.compile(fn, backend="fuse")
    for _ in range(2):
        scores, x = torch.randn(6, 8), torch.randn(6, 16)
        torch.testing.assert_close(compiled(scores, x), fn(scores, x), rtol=1e-5, atol=1e-6)


def test_hf_mixtral_grouped_experts_are_found_behind_sentinel_masks():
    """The HF Mixtral tiny config planned for CUDA with a budget: every layer's experts are found (transformers
    5.17 masks sentinel rows around its grouped products; 5.24 does not: both must find them)."""
    pytest.importorskip("transformers")
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "hf_generate.py")
    spec = importlib.util.spec_from_file_location("bench_hf_generate", path)   # tests/ has an hf_generate too
    H = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(H)
    from fusebackend.capture.placement import plan_only
    s = dict(H.SHAPES["mixtral"]["smoke"])
    m = H.build("mixtral", s, 40, "grouped_mm")
    ids = torch.randint(1, s["vocab"], (1, 12))
    with plan_only(), torch.no_grad():
        rep = fusebackend.explain(lambda x: m(input_ids=x, use_cache=False).logits, ids,
                                  options={"gpu_memory_budget": 10 ** 9})
    found = sum(len(r.patterns.experts) for r in rep.graph_reports if r.patterns)
    assert found == s["experts"] * s["layers"]
    # each layer became one moe_experts op; it returns hidden's dtype (bf16) and the layer's float32 sum (its
    # routing weights are float32) comes back through a cast, so the op's metadata is what it returns
    ops = [(r.graph, n) for r in rep.graph_reports for n in r.graph.nodes() if n.name.startswith("moe_experts")
           and not n.name.endswith("_cast")]
    assert len(ops) == s["layers"]
    for fg, n in ops:
        assert n.meta.dtype == torch.bfloat16
        assert all(fg.node(u).meta.dtype == torch.float32 for u in fg.users(n.name))
