"""HF generate() of tiny MoE models (Mixtral, Qwen2-MoE) with a left-padded batch under fuse: the tokens are
eager's, fusebackend warns nothing, and Dynamo compiles no more graphs than with aot_eager (same AOT graphs,
eager's kernels). The experts' eager loop graph-breaks per expert; grouped_mm keeps them in one graph."""
from __future__ import annotations

import pytest
import torch

import hf_generate as G


@pytest.mark.slow
@pytest.mark.parametrize("name,experts", [("qwen2_moe", "eager"), ("qwen2_moe", "grouped_mm"),
                                          ("mixtral", "grouped_mm")])
def test_left_padded_moe_generate_matches_eager(name, experts):
    m = G.model(name, experts=experts)
    ids, mask = G.prompt(seed=3, left_pad=2)
    ref, _, _ = G.generate(m, ids, mask, new_tokens=4)
    _, ref_graphs, _ = G.generate(m, ids, mask, new_tokens=4, backend="aot_eager")
    out, graphs, warned = G.generate(m, ids, mask, new_tokens=4, backend="fuse")
    assert warned == [], warned
    assert torch.equal(out, ref), (out, ref)
    assert graphs <= ref_graphs, (graphs, ref_graphs)
    assert out.shape[1] == ids.shape[1] + 4      # greedy ran to the end: no early stop hides a mismatch
