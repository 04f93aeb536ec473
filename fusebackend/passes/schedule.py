"""Schedule: a topological order of groups (a group runs when every value it reads exists)."""
from __future__ import annotations

import networkx as nx

from ..graph.fusion_graph import FusionGraph


def order_groups(fg: FusionGraph, groups: list) -> list:
    owner = {n: g.id for g in groups for n in g.nodes}
    dag = nx.DiGraph()
    dag.add_nodes_from(g.id for g in groups)
    for g in groups:
        for n in g.nodes:
            for p in fg.producers(n):
                if p in owner and owner[p] != g.id:
                    dag.add_edge(owner[p], g.id)
    by_id = {g.id: g for g in groups}
    first = {g.id: min(fg.node(n).index for n in g.nodes) for g in groups}
    order = list(nx.lexicographical_topological_sort(dag, key=lambda i: first[i]))
    out = []
    for new_id, gid in enumerate(order):
        g = by_id[gid]
        g.id = new_id
        out.append(g)
    return out
