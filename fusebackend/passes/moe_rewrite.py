"""Whole MoE layers as one moe_experts op without a memory budget: the routing loop's syncs taken out.

HF Mixtral's loop asks the device for each expert's tokens (a data-dependent nonzero per expert, a device ->
host sync each); the dense masked form (pattern_moe_dense.py) runs every expert on every token. Either way the
layer is the routed sum of graph/moe_op.py, which the op computes with one sync per layer and each expert on
its own tokens (graph/moe_grouped.py). This pass finds the layers and rewrites them in place with
placement_moe.rewrite_layer (the weights keep their homes); capture/moe_layers.py decides where it runs.

Not rewritten: HF 5.x's grouped form (layout 1), which already runs without a sync (grouped_mm over its 3-D
weights); the dense form on the GPU, where its own kernels have no sync and read every expert anyway (H200,
bench/moe_op.py, the anchor: 0.569 ms as its kernels, 1.116 ms as the op); and any layer whose pieces the
finders do not see whole.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..graph import FusionGraph
from ..graph.moe_op import UNBOUND
from .pattern_moe_dense import find_dense_moe_layers
from .pattern_moe_layer import find_moe_layers
from .patterns import find_patterns
from .sentinel_masks import drop_impossible_masks
from .placement_moe import rewrite_layer


@dataclass(frozen=True)
class RewrittenLayer:
    layer: int          # the router's layer number
    form: str           # "loop" (a nonzero per expert) | "dense" (every expert on every token)
    experts: int
    top_k: object
    node: str           # the moe_experts node that replaced it

    def describe(self) -> str:
        return "MoE layer %d (%s form, %d experts, top-%s) -> %s: one host sync per call" % (
            self.layer, self.form, self.experts, self.top_k, self.node)


def has_router(fg: FusionGraph) -> bool:
    """A cheap first look: no top-k, no MoE layer."""
    return any(n.target is not None and n.op_name.split(".")[0] == "topk" for n in fg.nodes())


def rewrite_moe_layers(fg: FusionGraph, devices=("cuda", "cpu")) -> list:
    """Rewrite every complete loop-form or dense masked MoE layer whose output lives on one of `devices`;
    returns a RewrittenLayer per layer, in router order."""
    if not has_router(fg):
        return []
    drop_impossible_masks(fg)          # transformers 5.17's sentinel masks hide its grouped experts
    patterns = find_patterns(fg)
    top_k = {r.topk: r.top_k for r in patterns.routers}
    found = [(L, "loop") for L in find_moe_layers(fg, patterns)
             if L.layout == 0 and all(u.expert_index is None for trio in L.expert_weights for u in trio)]
    found += [(L, "dense") for L in find_dense_moe_layers(fg, patterns)]
    found.sort(key=lambda p: p[0].layer)
    out = []
    for layer, form in found:
        device = str(fg.node(layer.output).device).split(":")[0]
        if device not in devices or (form == "dense" and device != "cpu"):
            continue            # H200: the dense layer's own kernels 0.569 ms, as one op 1.116 (bench/moe_op.py)
        name = rewrite_layer(fg, layer, UNBOUND, host_weights=False)
        out.append(RewrittenLayer(layer.layer, form, len(layer.expert_weights), top_k.get(layer.router), name))
    return out
