"""Whole MoE layers: a router's top-k, every routed expert of it, and how their results are combined.

The expert finder (pattern_experts.py) stops at each expert's FFN; to hand the layer to the hybrid runtime
(one op that decides per call where each expert runs) we also need what the layer does around them -- the
loop form of HF Mixtral / the zoo's mixtral_moe_captured, after AOT:

    idx_k, tok = nonzero(mask[e]) ...            (the expert's positions, from the top-k indices)
    x_e  = index(hidden, [None, tok])            (its tokens: the FFN's entry)
    y_e  = FFN_e(x_e)                            (the FFN's exit)
    w_e  = index(W[..., None], [tok, idx_k])     (W [T, k]: the routing weights, from the top-k values)
    acc  = index_put(acc, [tok], y_e * w_e, accumulate=True)   (or index_add(acc, 0, tok, ...)); acc0 = zeros
    out  = the last acc

and the grouped form of HF 5.x (`grouped_mm` experts over one 3-D gate_up and one down parameter):

    perm = sort(idx.view(-1))[1];  x_s = index(hidden, [perm // k]);  w_s = index(W.view(-1), [perm])
    y_s  = grouped_mm(silu(gate) * up of grouped_mm(x_s, gate_up^T, offsets), down^T, offsets) * w_s[:, None]
    out  = sum(index(y_s, [inverse perm]).view(T, k, H), 1)

A layer is reported only when all of it is there: every expert of the router in the loop form with separate
gate / up / down weights (whole 2-D inputs, or one expert's slice of a 3-D one), one W for all, one chain of
scatter-adds from a zero tensor, nothing else reading its intermediate sums. Anything else: not a layer (the
experts are still placed one by one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..graph import FusionGraph, Ref
from .pattern_types import CASTS, Patterns, arg, meta, op, tensor_args

PASS_THROUGH = {"view", "_unsafe_view", "reshape", "alias", "unsqueeze", "squeeze", "clone"} | CASTS
SCATTERS = {"index_put", "index_add"}
ZEROS = {"full", "zeros", "new_zeros", "zeros_like", "full_like"}


@dataclass(frozen=True)
class MoELayer:
    layer: int
    router: str                 # the top-k node
    hidden: Ref                 # [T, H]: what every expert gathers its tokens from
    idx: Ref                    # [T, k]: the top-k indices
    weights: Ref                # [T, k]: the routing weights as the experts' results are multiplied by them
    output: str                 # the last scatter-add: the layer's result [T, H]
    init: str                   # the zero tensor the sum starts from
    experts: tuple              # ExpertCandidate per expert id 0..E-1
    expert_weights: tuple       # layout 0: ((gate, up, down) WeightUse) per expert id; 1: ((gate_up, down),)
    layout: int = 0             # 1: one 3-D gate_up [E, 2F, H] and down [E, H, F] parameter (HF 5.x grouped_mm)


def _through(fg, name: str) -> str:
    """Follow single-user reshapes and casts forward."""
    while True:
        users = fg.users(name)
        if len(users) != 1 or op(fg, users[0]) not in PASS_THROUGH or name in fg.output_names():
            return name
        name = users[0]


def _back(fg, ref: Ref, through=PASS_THROUGH) -> Ref:
    while ref.item is None and op(fg, ref.name) in through and tensor_args(fg, ref.name):
        ref = tensor_args(fg, ref.name)[0]
    return ref


def _index_list(fg, name: str, pos: int):
    idx = arg(fg, name, pos)
    return list(idx) if isinstance(idx, (list, tuple)) else None


def _weighted(fg, exit_name: str):
    """(the mul of the expert's result by its gathered routing weights, that gather) or None: the one user of
    the result (through reshapes and casts) must be a mul whose other operand is an index op."""
    end = _through(fg, exit_name)
    users = fg.users(end)
    if len(users) != 1 or op(fg, users[0]) != "mul":
        return None
    others = [r for r in tensor_args(fg, users[0]) if r.name != end]
    if len(others) != 1:
        return None
    gathered = _back(fg, others[0])
    if op(fg, gathered.name) != "index" or gathered.item is not None:
        return None
    return users[0], gathered


def _combine(fg, c, topk: str):
    """(W Ref, token-index Ref, scatter node, accumulator Ref) of one loop-form expert, or None."""
    got = _weighted(fg, c.exit)
    if got is None:
        return None
    mul, gathered = got
    # the weights as multiplied: a cast before the gather (W.to(hidden dtype)) stays, as eager rounds there
    w = _back(fg, tensor_args(fg, gathered.name)[0], PASS_THROUGH - CASTS)
    w_meta, topk_meta = meta(fg, w), meta(fg, Ref(topk, 0))
    if w_meta is None or topk_meta is None or tuple(w_meta.shape) != tuple(topk_meta.shape):
        return None
    positions = [p for p in (_index_list(fg, gathered.name, 1) or []) if p is not None]
    if len(positions) != 2:
        return None
    scatter = _through(fg, mul)
    users = fg.users(scatter)
    if len(users) != 1 or op(fg, users[0]) not in SCATTERS:
        return None
    s = users[0]
    if op(fg, s) == "index_put":
        tok = [p for p in (_index_list(fg, s, 1) or []) if p is not None]
        if len(tok) != 1 or arg(fg, s, 3, fg.node(s).kwargs.get("accumulate", False)) is not True:
            return None
        tok, acc = tok[0], arg(fg, s, 0)
    else:
        if arg(fg, s, 1) != 0 or len(fg.node(s).args) > 4:
            return None
        tok, acc = arg(fg, s, 2), arg(fg, s, 0)
    if not isinstance(tok, Ref) or tok != positions[0] or not isinstance(acc, Ref):
        return None
    # the tokens gathered are the ones scattered back to
    entry = _back(fg, c.entry)
    if op(fg, entry.name) != "index":
        return None
    gather_idx = [p for p in (_index_list(fg, entry.name, 1) or []) if p is not None]
    if gather_idx != [tok]:
        return None
    src = tensor_args(fg, entry.name)[0]
    while src.item is None and (meta(fg, src) is None or meta(fg, src).rank != 2) and op(fg, src.name) in PASS_THROUGH:
        src = tensor_args(fg, src.name)[0]            # x[None, tok]: the unsqueeze before the gather
    return w, tok, s, acc, src


def _role_weights(c):
    by_role = {w.role: w for w in c.weights}
    if set(by_role) != {"gate", "up", "down"} or len(c.weights) != 3:
        return None                 # fused gate_up, biases: not the hybrid layer's expert shape
    return by_role["gate"], by_role["up"], by_role["down"]


def _layer(fg: FusionGraph, router, experts) -> Optional[MoELayer]:
    mine = sorted((c for c in experts if c.router == router.topk and c.kind == "routed"),
                  key=lambda c: -1 if c.expert is None else c.expert)
    if (not mine or len(mine) != router.experts or any(c.form != "loop" for c in mine)
            or [c.expert for c in mine] != list(range(len(mine)))):
        return None
    hidden, ws, chain, w_ref = None, [], {}, None
    for c in mine:
        got, roles = _combine(fg, c, router.topk), _role_weights(c)
        if got is None or roles is None:
            return None
        w, _, scatter, acc, src = got
        if w_ref not in (None, w) or hidden not in (None, src):
            return None
        w_ref, hidden = w, src
        chain[scatter] = acc
        ws.append(roles)
    inits = [a for a in chain.values() if a.name not in chain]
    if len(inits) != 1 or op(fg, inits[0].name) not in ZEROS:
        return None
    init = inits[0].name
    if op(fg, init) in ("full", "full_like", "new_full") and arg(fg, init, 1) not in (0, 0.0):
        return None
    fed = {a.name for a in chain.values()}
    last = [s for s in chain if s not in fed]
    if len(last) != 1 or any(len(fg.users(s)) != 1 for s in fed if s in chain) or len(fg.users(init)) != 1:
        return None
    hm, om = meta(fg, hidden), meta(fg, last[0])
    if hm is None or om is None or tuple(hm.shape) != tuple(om.shape) or hm.dtype != om.dtype or hm.rank != 2:
        return None
    if any(u.dtype != hm.dtype for trio in ws for u in trio):
        return None
    return MoELayer(router.layer, router.topk, hidden, Ref(router.topk, 1), w_ref, last[0], init, tuple(mine),
                    tuple(ws))


def _grouped_layer(fg: FusionGraph, router, experts) -> Optional[MoELayer]:
    mine = [c for c in experts if c.router == router.topk and c.kind == "routed" and c.form == "grouped"]
    if not mine or len(mine) != router.experts or len({c.nodes for c in mine}) != 1:
        return None
    c = mine[0]
    by_role = {w.role: w for w in c.weights}
    if set(by_role) != {"gate_up", "down"} or len(c.weights) != 2:
        return None
    gu, dn = by_role["gate_up"], by_role["down"]
    gum, dnm = meta(fg, gu.input), meta(fg, dn.input)
    E, H, Fn = router.experts, c.hidden, c.ffn
    if tuple(gum.shape) != (E, 2 * Fn, H) or tuple(dnm.shape) != (E, H, Fn) or gum.dtype != dnm.dtype:
        return None
    if not _gate_first(fg, c, Fn):
        return None
    k = router.top_k
    # the weighted products: y_s * w_s[:, None], w_s = W.view(-1)[perm]
    got = _weighted(fg, c.exit)
    if got is None:
        return None
    mul, ws = got
    if len(_index_list(fg, ws.name, 1) or []) != 1:
        return None
    perm = _index_list(fg, ws.name, 1)[0]
    if not isinstance(perm, Ref) or perm.item != 1 or op(fg, perm.name) != "sort":
        return None
    if _back(fg, tensor_args(fg, perm.name)[0]) != Ref(router.topk, 1):
        return None
    w = _back(fg, tensor_args(fg, ws.name)[0], PASS_THROUGH - CASTS)
    if meta(fg, w) is None or tuple(meta(fg, w).shape) != tuple(meta(fg, Ref(router.topk, 0)).shape):
        return None
    # the gather of the tokens: hidden[perm // k]
    entry = _back(fg, c.entry)
    gather = _index_list(fg, entry.name, 1) if op(fg, entry.name) == "index" else None
    if not gather or len(gather) != 1 or op(fg, gather[0].name) != "div" or tensor_args(fg, gather[0].name)[0] != perm:
        return None
    if arg(fg, gather[0].name, 1) != k:
        return None
    hidden = tensor_args(fg, entry.name)[0]
    # back in token order, the k terms summed: sum(index(y, [inv]).view(T, k, H), 1)
    scatter = _through(fg, mul)
    users = fg.users(scatter)
    if len(users) != 1 or op(fg, users[0]) != "index":
        return None
    back = _through(fg, users[0])
    users = fg.users(back)
    if len(users) != 1 or op(fg, users[0]) != "sum" or list(arg(fg, users[0], 1) or []) != [1]:
        return None
    out = users[0]
    hm, om = meta(fg, hidden), meta(fg, out)
    if hm is None or om is None or tuple(hm.shape) != tuple(om.shape) or hm.rank != 2 or hm.dtype != gum.dtype:
        return None
    return MoELayer(router.layer, router.topk, hidden, Ref(router.topk, 1), w, out, "", tuple(mine), ((gu, dn),),
                    layout=1)


def _gate_first(fg, c, ffn) -> bool:
    """The fused product's first F columns are the gate (they reach the nonlinearity), as from_3d assumes."""
    for n in c.nodes:
        if op(fg, n) == "slice" and arg(fg, n, 2) == 0 and arg(fg, n, 3) == ffn:
            stack, seen = [n], set()
            while stack:
                cur = stack.pop()
                for u in fg.users(cur):
                    if u in c.nodes and u not in seen:
                        if op(fg, u) in ("sigmoid", "silu"):
                            return True
                        seen.add(u)
                        if op(fg, u) in PASS_THROUGH:
                            stack.append(u)
    return False


def find_moe_layers(fg: FusionGraph, patterns: Patterns) -> list:
    """Every complete loop-form MoE layer of the graph (see the module doc), in router order."""
    out = []
    for r in patterns.routers:
        try:
            layer = _layer(fg, r, patterns.experts) or _grouped_layer(fg, r, patterns.experts)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            layer = None
        if layer is not None:
            out.append(layer)
    return out
