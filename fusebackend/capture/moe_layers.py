"""Wiring of the MoE-layer rewrite on the ordinary path (no `gpu_memory_budget`): passes/moe_rewrite.py.

Each whole MoE layer of an inference graph becomes one moe_experts op that runs with one device -> host sync
per call instead of one per expert (graph/moe_grouped.py). Not done:
- under `cudagraphs`: that one sync would make the program uncapturable (it would run uncaptured), while the
  captured graph replays the dense or looped experts with no sync at all;
- in forward graphs of training: the backward reads the layer's per-expert intermediates;
- with options={"moe_op": False} or $FUSEBACKEND_MOE_OP=0.
The rewritten layers are recorded on the graph's report (`GraphReport.moe_layers`: explain and dump list them).
"""
from __future__ import annotations

from ..passes.moe_rewrite import rewrite_moe_layers

# Where the op runs instead of the layer's own ops. CUDA: the sync per expert is the layer's cost. CPU: the
# dense form's experts on their own tokens only, and the loop's per-expert ATen calls gone (bench/moe_op.py).
DEVICES = ("cuda", "cpu")


def rewrite(fg, opts, kind: str, rep) -> list:
    if not opts.moe_op or opts.cudagraphs or kind != "inference":
        return []
    done = rewrite_moe_layers(fg, DEVICES)
    rep.moe_layers = [d.describe() for d in done]
    return done
