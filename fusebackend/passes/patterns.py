"""Placement candidates in an ATen FusionGraph: MoE experts (with their routers) and attention.

    pats = find_patterns(fg)      # Patterns(experts=[ExpertCandidate], attention=[AttentionCandidate],
                                  #          routers=[Router])

A pure pass: it reads the graph and never changes it. What it does not recognise is an ordinary graph:
the lists come back empty, nothing raises. Layers are numbered by order of appearance within this graph
(experts by their router's top-k, attention by its op); a graph-broken model numbers each graph on its
own, and a graph that is one expert FFN (its router ran in another graph) is layer 0, expert None.
Labels come from `fg.input_labels` (placeholder -> the user's parameter name) where capture set it.

The finders: pattern_linear.py (products by a weight, every spelling), pattern_experts.py (routers, FFNs,
routed / shared / graph-broken experts and where their boundary is), pattern_attention.py (SDPA or
matmul-softmax-matmul, with K/V from a cache input, a cache updated in the graph, or computed).
"""
from __future__ import annotations

from ..graph import FusionGraph
from .pattern_attention import find_attention
from .pattern_experts import find_experts
from .pattern_types import AttentionCandidate, ExpertCandidate, Patterns, Router, WeightUse

__all__ = ["AttentionCandidate", "ExpertCandidate", "Patterns", "Router", "WeightUse", "find_patterns"]


def find_patterns(fg: FusionGraph) -> Patterns:
    labels = getattr(fg, "input_labels", None) or {}
    if not isinstance(labels, dict):
        labels = {}
    if len(fg) == 0:
        return Patterns()
    experts, routers = find_experts(fg, labels)
    return Patterns(experts=experts, attention=find_attention(fg, labels), routers=routers)
