"""Whole MoE layers in the dense masked form: every expert runs on every token, weighted by a masked gate.

bench/workloads.py's MoETop2 (and MoE code written without a gather) computes, after AOT:

    g_e  = sum(W * eq(idx, e), [-1], keepdim)     (W [T, k]: the routing weights; idx: the router's top-k ids)
    y_e  = FFN_e(hidden)                          (all T tokens)
    acc  = add(acc, y_e * g_e);  acc0 = zeros     (out = the last acc)

g_e[t] is W[t, j] where idx[t, j] == e and 0 elsewhere (top-k ids are distinct per token), so the layer is
the routed sum sum_j W[t, j] * FFN_idx[t, j](hidden[t]) of moe_experts (graph/moe_op.py), which computes each
expert on its own tokens only. The finder checks what makes that so: one router's idx and one W for all, the
expert ids 0..E-1 each once, one chain of adds from a zero tensor whose partial sums nothing else reads, each
expert's FFN a gate / up / down SwiGLU on the same 2-D hidden input. (Where eager's FFN of a token not routed
to an expert gives inf or NaN, eager's 0 * inf is NaN and the routed sum skips it.)
"""
from __future__ import annotations

from typing import Optional

from ..graph import FusionGraph, Ref
from .pattern_moe_layer import PASS_THROUGH, ZEROS, MoELayer, _back, _role_weights, _through
from .pattern_types import CASTS, Patterns, arg, meta, op, tensor_args


def _expert_id(fg, ref: Ref, idx: Ref) -> Optional[int]:
    """e where `ref` is eq(idx, e) (through views and casts), else None."""
    ref = _back(fg, ref)
    if ref.item is not None or op(fg, ref.name) != "eq":
        return None
    e = arg(fg, ref.name, 1)
    src = arg(fg, ref.name, 0)
    if not isinstance(e, int) or isinstance(e, bool) or not isinstance(src, Ref) or _back(fg, src) != idx:
        return None
    return e


def _mask_gate(fg, gate: Ref, idx: Ref, rows):
    """(e, W) where `gate` [T, 1] is sum(W * eq(idx, e), -1): W as multiplied (its casts kept), else None."""
    m = meta(fg, gate)
    if m is None or tuple(m.shape) != (rows, 1):
        return None
    s = _back(fg, gate, PASS_THROUGH - CASTS)          # a cast after the sum would round W: not the layer's W
    if s.item is not None or op(fg, s.name) != "sum" or list(arg(fg, s.name, 1) or []) not in ([-1], [1]):
        return None
    prod = _back(fg, tensor_args(fg, s.name)[0], PASS_THROUGH - CASTS)
    if prod.item is not None or op(fg, prod.name) != "mul" or len(tensor_args(fg, prod.name)) != 2:
        return None
    a, b = tensor_args(fg, prod.name)
    for mask, w in ((a, b), (b, a)):
        e = _expert_id(fg, mask, idx)
        if e is not None:
            w = _back(fg, w, PASS_THROUGH - CASTS)
            wm, im = meta(fg, w), meta(fg, idx)
            if wm is None or im is None or tuple(wm.shape) != tuple(im.shape) or not wm.dtype.is_floating_point:
                return None
            return e, w
    return None


def _combine(fg, c, idx: Ref):
    """(e, W, the add, its accumulator Ref) of one dense expert, or None."""
    end = _through(fg, c.exit)
    users = fg.users(end)
    if len(users) != 1 or op(fg, users[0]) != "mul":
        return None
    mul = users[0]
    others = [r for r in tensor_args(fg, mul) if r.name != end]
    hm = meta(fg, c.entry)
    if len(others) != 1 or hm is None or hm.rank != 2:
        return None
    got = _mask_gate(fg, others[0], idx, hm.shape[0])
    if got is None:
        return None
    total = _through(fg, mul)
    users = fg.users(total)
    if len(users) != 1 or op(fg, users[0]) != "add" or fg.node(users[0]).kwargs.get("alpha", 1) != 1:
        return None
    add = users[0]
    accs = [r for r in tensor_args(fg, add) if r.name != total]
    if len(accs) != 1 or len(tensor_args(fg, add)) != 2 or len(fg.node(add).args) > 2:
        return None
    return got[0], got[1], add, accs[0]


def _dense_layer(fg: FusionGraph, router, experts) -> Optional[MoELayer]:
    idx = Ref(router.topk, 1)
    found = {}
    for c in experts:
        if c.router != router.topk or c.form != "dense":
            continue
        got, roles = _combine(fg, c, idx), _role_weights(c)
        if got is None or roles is None:
            continue                                   # not one of the masked experts (a shared expert)
        e = got[0]
        if e in found:
            return None
        found[e] = (c, roles) + got[1:]
    if sorted(found) != list(range(router.experts)):
        return None
    rows = [found[e] for e in range(router.experts)]
    if len({r[0].entry for r in rows}) != 1 or len({r[2] for r in rows}) != 1:
        return None                                    # one hidden input, one W
    hidden, w_ref = rows[0][0].entry, rows[0][2]
    chain = {r[3]: r[4] for r in rows}
    inits = [a for a in chain.values() if a.name not in chain]
    if len(inits) != 1 or inits[0].item is not None or op(fg, inits[0].name) not in ZEROS:
        return None
    init = inits[0].name
    if op(fg, init) in ("full", "full_like", "new_full") and arg(fg, init, 1) not in (0, 0.0):
        return None
    fed = {a.name for a in chain.values()}
    last = [s for s in chain if s not in fed]
    if len(last) != 1 or any(len(fg.users(s)) != 1 for s in fed if s in chain) or len(fg.users(init)) != 1:
        return None
    hm, om = meta(fg, hidden), meta(fg, last[0])
    if hm is None or om is None or tuple(hm.shape) != tuple(om.shape) or hm.dtype != om.dtype:
        return None
    if any(u.dtype != hm.dtype or u.expert_index is not None for r in rows for u in r[1]):
        return None
    return MoELayer(router.layer, router.topk, hidden, idx, w_ref, last[0], init, tuple(r[0] for r in rows),
                    tuple(r[1] for r in rows))


def find_dense_moe_layers(fg: FusionGraph, patterns: Patterns) -> list:
    """Every complete dense masked MoE layer of the graph (see the module doc), in router order."""
    out = []
    for r in patterns.routers:
        try:
            layer = _dense_layer(fg, r, patterns.experts)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            layer = None
        if layer is not None:
            out.append(layer)
    return out
