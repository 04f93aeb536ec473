"""A small layered (Sugiyama-style) layout of a dumped graph, in pure Python: no Graphviz needed.

Each kernel group is one box (cluster) whose member nodes are laid out inside it by their depth within the
group; every other node is a box of its own. Boxes go into layers by depth in the box DAG (inputs and weights
pulled down next to their first user), long edges run through dummy points, layers are ordered by barycenter
sweeps (keeping the order with the fewest crossings), and x positions come from isotonic regression towards
the neighbours' centres, so chains stay straight. Deterministic: the same data gives the same picture.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

CHAR_W = 6.8          # px per character of the 11px monospace font
NODE_H = 34
NODE_PAD = 7
GAP_X = 16
INNER_GAP_Y = 18
LAYER_GAP = 40
CL_PAD = 8
CL_LABEL = 18
DUMMY_W = 6
MARGIN = 20

SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
                "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "bool"}


def is_cluster(group: dict) -> bool:
    return group["kind"] in ("pointwise", "reduction") or len(group["nodes"]) > 1


def node_lines(n: dict) -> tuple:
    if n["shape"] is not None:
        shape = "x".join(str(s) for s in n["shape"]) or "[]"
        second = "%s %s %s" % (n["op"], shape, SHORT_DTYPES.get(n["dtype"], n["dtype"]))
    elif n.get("outputs"):
        second = "%s -> %d outputs" % (n["op"], len(n["outputs"]))
    else:
        second = n["op"]
    return n["name"], second


def cluster_label(g: dict) -> str:
    dom = "x".join(str(s) for s in g["domain"])
    red = " r%s" % g["reduce_dims"] if g["reduce_dims"] else ""
    tags = (" b%s" % g["batch"] if g.get("batch") is not None else "") + (" FALLBACK" if g.get("fallback") else "")
    return "g%d %s %s [%s]%s%s" % (g["id"], g["kind"], g["device"], dom, red, tags)


@dataclass
class Box:
    id: int
    w: float
    h: float = 0.0
    group: dict = None                 # the cluster's group, or None for a lone node / dummy
    members: list = field(default_factory=list)
    rel: dict = field(default_factory=dict)   # member -> (centre x, top y) relative to the box's top-left
    dummy: bool = False
    layer: int = 0
    x: float = 0.0                     # centre
    y: float = 0.0                     # top


@dataclass
class Layout:
    width: float
    height: float
    boxes: list                        # Box, dummies included
    node_pos: dict                     # node name -> (centre x, top y, width)
    edges: list                        # (src, dst, [(x, y), ...]) in node names


def _node_w(n: dict) -> float:
    return max(60.0, max(len(s) for s in node_lines(n)) * CHAR_W + 2 * NODE_PAD)


def _inner(box: Box, nodes: dict, order: dict) -> None:
    """Lay out a cluster's members by their depth inside it."""
    members = set(box.members)
    depth = {}
    for m in box.members:                                  # members arrive in topological order
        depth[m] = 1 + max((depth[p] for p in nodes[m]["inputs"] if p in members), default=-1)
    rows = {}
    for m in box.members:
        rows.setdefault(depth[m], []).append(m)
    pos = {}
    for d in sorted(rows):
        def bary(m):
            ps = [pos[p] for p in nodes[m]["inputs"] if p in pos]
            return (sum(ps) / len(ps) if ps else order[m], order[m])
        rows[d].sort(key=bary)
        for i, m in enumerate(rows[d]):
            pos[m] = i
    widths = {m: _node_w(nodes[m]) for m in box.members}
    row_w = {d: sum(widths[m] for m in r) + GAP_X * (len(r) - 1) for d, r in rows.items()}
    label_w = len(cluster_label(box.group)) * CHAR_W
    box.w = max(max(row_w.values()), label_w) + 2 * CL_PAD
    y = CL_LABEL + CL_PAD / 2
    for d in sorted(rows):
        x = (box.w - row_w[d]) / 2
        for m in rows[d]:
            box.rel[m] = (x + widths[m] / 2, y)
            x += widths[m] + GAP_X
        y += NODE_H + INNER_GAP_Y
    box.h = y - INNER_GAP_Y + CL_PAD


def _crossings(upper: list, vedges: dict, pos: dict) -> int:
    """Edge crossings between a layer and the next (every edge joins adjacent layers): inversions of the
    lower endpoints once the edges are sorted by their upper ones, counted by merge sort."""
    arr = [pb for _, pb in sorted((pos[a], pos[b]) for a in upper for b in vedges.get(a, ()))]

    def count(xs):
        if len(xs) < 2:
            return xs, 0
        mid = len(xs) // 2
        left, cl = count(xs[:mid])
        right, cr = count(xs[mid:])
        merged, i, j, inv = [], 0, 0, cl + cr
        while i < len(left) and j < len(right):
            if right[j] < left[i]:
                merged.append(right[j])
                inv += len(left) - i
                j += 1
            else:
                merged.append(left[i])
                i += 1
        merged += left[i:] + right[j:]
        return merged, inv
    return count(arr)[1]


def _isotonic(targets: list, seps: list, weights: list) -> list:
    """x minimising sum w (x - t)^2 with x[i+1] - x[i] >= seps[i] (pool adjacent violators)."""
    offs = [0.0]
    for s in seps:
        offs.append(offs[-1] + s)
    blocks = []                                    # [mean, weight, count]
    for t, o, w in zip(targets, offs, weights):
        blocks.append([t - o, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out = []
    for m, _, c in blocks:
        out += [m] * c
    return [y + o for y, o in zip(out, offs)]


def layout(data: dict) -> Layout:
    nodes = {n["name"]: n for n in data["nodes"]}
    order = {name: i for i, name in enumerate(nodes)}
    boxes, box_of = [], {}

    def new_box(members, group=None):
        b = Box(len(boxes), 0.0, group=group, members=list(members))
        boxes.append(b)
        for m in members:
            box_of[m] = b.id
        return b

    for g in data["groups"]:
        members = [m for m in g["nodes"] if m in nodes]
        if members and is_cluster(g):
            new_box(members, g)
    for name in nodes:
        if name not in box_of:
            new_box([name])
    edges = [(p, n) for n in nodes for p in nodes[n]["inputs"] if p in nodes]
    dag = nx.DiGraph()
    dag.add_nodes_from(b.id for b in boxes)
    dag.add_edges_from((box_of[p], box_of[n]) for p, n in edges if box_of[p] != box_of[n])
    if not nx.is_directed_acyclic_graph(dag):      # never for valid groups; draw plain nodes if it happens
        return layout(dict(data, groups=[]))

    for b in boxes:
        if b.group is not None:
            _inner(b, nodes, order)
        else:
            b.w, b.h = _node_w(nodes[b.members[0]]), NODE_H
            b.rel[b.members[0]] = (b.w / 2, 0.0)
    first = {b.id: min(order[m] for m in b.members) for b in boxes}
    topo = list(nx.lexicographical_topological_sort(dag, key=lambda i: first[i]))
    for u in topo:                                          # depth, then pull sources down to their users
        boxes[u].layer = 1 + max((boxes[p].layer for p in dag.predecessors(u)), default=-1)
    for u in reversed(topo):
        succ = list(dag.successors(u))
        if succ and len(succ) >= dag.in_degree(u):
            boxes[u].layer = min(boxes[s].layer for s in succ) - 1

    route, vedges = {}, {}                                 # long box edges run through one dummy per layer
    for a, b in sorted(dag.edges(), key=lambda e: (first[e[0]], first[e[1]])):
        chain, prev = [], a
        for lay in range(boxes[a].layer + 1, boxes[b].layer):
            d = Box(len(boxes), DUMMY_W, 0.0, dummy=True, layer=lay)
            boxes.append(d)
            first[d.id] = first[a] + 0.5
            chain.append(d.id)
            vedges.setdefault(prev, []).append(d.id)
            prev = d.id
        vedges.setdefault(prev, []).append(b)
        route[(a, b)] = chain
    preds = {}
    for a, bs in vedges.items():
        for b in bs:
            preds.setdefault(b, []).append(a)

    nlayers = max(b.layer for b in boxes) + 1
    layers = [[] for _ in range(nlayers)]
    for b in sorted(boxes, key=lambda b: first[b.id]):
        layers[b.layer].append(b.id)
    pos = {v: i for lay in layers for i, v in enumerate(lay)}

    def total_crossings():
        return sum(_crossings(layers[i], vedges, pos) for i in range(nlayers - 1))

    best, best_order = total_crossings(), [list(l) for l in layers]
    for sweep in range(8):
        down = sweep % 2 == 0
        rng = range(1, nlayers) if down else range(nlayers - 2, -1, -1)
        for li in rng:
            nb = preds if down else vedges

            def key(v):
                ps = [pos[p] for p in nb.get(v, ())]
                return (sum(ps) / len(ps) if ps else pos[v], pos[v])
            layers[li].sort(key=key)
            for i, v in enumerate(layers[li]):
                pos[v] = i
        c = total_crossings()
        if c < best:
            best, best_order = c, [list(l) for l in layers]
    layers = best_order
    pos = {v: i for lay in layers for i, v in enumerate(lay)}

    for lay in layers:                                          # x: packed, then pulled towards neighbours
        x = 0.0
        for v in lay:
            boxes[v].x = x + boxes[v].w / 2
            x += boxes[v].w + GAP_X
    for it in range(10):
        mode = ("down", "up", "both")[it % 3] if it < 9 else "both"
        rng = range(nlayers) if mode != "up" else range(nlayers - 1, -1, -1)
        for li in rng:
            lay = layers[li]
            if not lay:
                continue
            targets, weights = [], []
            for v in lay:
                nb = (preds.get(v, []) if mode != "up" else []) + (vedges.get(v, []) if mode != "down" else [])
                targets.append(sum(boxes[u].x for u in nb) / len(nb) if nb else boxes[v].x)
                weights.append(1.0 if nb else 0.1)
            seps = [(boxes[a].w + boxes[b].w) / 2 + GAP_X for a, b in zip(lay, lay[1:])]
            for v, x in zip(lay, _isotonic(targets, seps, weights)):
                boxes[v].x = x
    left = min(b.x - b.w / 2 for b in boxes)
    for b in boxes:
        b.x += MARGIN - left

    y = 0.0
    layer_h = []
    for lay in layers:
        h = max((boxes[v].h for v in lay), default=0.0)
        for v in lay:
            boxes[v].y = y
            if boxes[v].dummy:
                boxes[v].h = h
        layer_h.append(h)
        y += h + LAYER_GAP

    node_pos = {}
    for b in boxes:
        for m in b.members:
            rx, ry = b.rel[m]
            node_pos[m] = (b.x - b.w / 2 + rx, b.y + ry, _node_w(nodes[m]))
    routed = []
    for p, n in edges:
        (px, py, _), (nx_, ny, _) = node_pos[p], node_pos[n]
        pts = [(px, py + NODE_H)]
        for d in route.get((box_of[p], box_of[n]), ()):
            pts += [(boxes[d].x, boxes[d].y), (boxes[d].x, boxes[d].y + boxes[d].h)]
        pts.append((nx_, ny))
        routed.append((p, n, pts))
    width = max(b.x + b.w / 2 for b in boxes) + MARGIN
    return Layout(width, max(y - LAYER_GAP, 0.0), boxes, node_pos, routed)
