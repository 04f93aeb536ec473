"""Attention in an ATen FusionGraph: SDPA ops, or matmul -> softmax -> matmul, with where its K/V come from.

Nodes of a candidate: the attention op (or both bmm's and the scale / mask / softmax between them) and the
layout ops that feed it only (GQA's repeat_kv unsqueeze/expand/clone/view, K's transpose, casts, a scalar
scale). q/k/v are the values before those: K/V as [batch, kv_heads, context, head_dim]. The KV cache
update (index_copy -> index_put, cat, slice_scatter of the new rows into a cache input) is reported in
kv_updates, not in nodes: it writes a graph input, which whoever places the cache places with it.
"""
from __future__ import annotations

from dataclasses import replace

from ..graph import FusionGraph, Ref
from .pattern_linear import linear_at
from .pattern_types import (AttentionCandidate, arg, common_label, is_input, meta, numel_bytes, op,
                            tensor_args)

LAYOUT = {"view", "_unsafe_view", "reshape", "alias", "unsqueeze", "squeeze", "expand", "clone", "_to_copy",
          "slice", "detach"}
UPDATES = {"index_put", "index_copy", "_unsafe_index_put", "slice_scatter", "select_scatter", "scatter",
           "cat", "copy"}
SCALE = {"mul", "div"}
_GUARD = (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError)


def _repeat(fg, name) -> int:
    """How many times an expand repeats heads (size-1 dims broadcast, batch and the last two aside)."""
    src, out = meta(fg, tensor_args(fg, name)[0]), meta(fg, name)
    if src is None or out is None or src.rank != out.rank:
        return 1
    rep = 1
    for i in range(1, out.rank - 2):
        if src.shape[i] == 1 and isinstance(out.shape[i], int) and out.shape[i] > 1:
            rep *= out.shape[i]
    return rep


def _is_swap(fg, n) -> bool:
    m = meta(fg, n)
    return op(fg, n) == "permute" and m is not None and \
        list(arg(fg, n, 1)) == list(range(m.rank - 2)) + [m.rank - 1, m.rank - 2]


def _operand(fg, ref: Ref, consumer: str, transpose: bool):
    """Walk back from an attention operand through layout ops used only by this attention: (the value
    they start from, their nodes, the GQA repeat, whether a last-two-dims transpose was passed). The value
    is the deepest 4-D one on the walk ([batch, heads, seq, head_dim]: before repeat_kv's 5-D detour,
    after a fused qkv's split)."""
    path, users_ok, outs, swaps = [ref], {consumer}, fg.output_names(), 0
    while ref.item is None and set(fg.users(ref.name)) <= users_ok and ref.name not in outs:
        n, o = ref.name, op(fg, ref.name)
        args = tensor_args(fg, n)
        scalar = o in SCALE and len(args) == 1 and not isinstance(arg(fg, n, 1), Ref)
        swap = transpose and swaps == 0 and _is_swap(fg, n)
        if not args or not (o in LAYOUT or scalar or swap):
            break
        swaps += swap
        users_ok, ref = {n}, args[0]
        path.append(ref)
    four = [i for i, r in enumerate(path) if meta(fg, r) is not None and meta(fg, r).rank == 4]
    i = four[-1] if four else len(path) - 1
    nodes = [r.name for r in path[:i]]
    rep = 1
    for n in nodes:
        rep *= _repeat(fg, n) if op(fg, n) == "expand" else 1
    return path[i], nodes, rep, any(_is_swap(fg, n) for n in nodes)


def _kv_source(fg, k: Ref, v: Ref):
    kinds, inputs, updates = set(), [], []
    for ref in (k, v):
        km = meta(fg, ref)
        if is_input(fg, ref.name):
            kinds.add("input")
            inputs.append(ref.name)
        elif op(fg, ref.name) in UPDATES:
            found = [a.name for a in tensor_args(fg, ref.name) if is_input(fg, a.name) and km is not None
                     and meta(fg, a) is not None and meta(fg, a).rank == km.rank and meta(fg, a).dtype == km.dtype]
            kinds.add("updated" if found else "computed")
            inputs += found
            updates += [ref.name] if found else []
        else:
            kinds.add("computed")
    kind = "updated" if "updated" in kinds else ("input" if kinds == {"input"} else "computed")
    return kind, tuple(dict.fromkeys(inputs)), tuple(updates)


def _label(fg, refs, labels):
    """The module prefix of the q/k/v projections' weights, looked for a few ops back."""
    found = []
    for ref in refs:
        stack, seen = [ref.name], set()
        while stack and len(seen) < 24:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            lin = linear_at(fg, n)
            if lin is not None:
                lab = labels.get(lin.weight.input)
                found.append(lab.rpartition(".")[0] if lab else None)     # the projection module
                continue
            if fg.node(n).kind not in ("placeholder", "constant", "opaque"):
                stack.extend(fg.producers(n))
    return common_label(found)


def _candidate(fg, form, main, nodes, q, kq, v, rep, k_swapped, exit_ref, labels):
    qm, km, vm = meta(fg, q), meta(fg, kq), meta(fg, v)
    if qm is None or km is None or vm is None or qm.rank != 4 or km.rank != 4 or vm.rank != 4:
        return None
    batch, q_heads, q_len, head_dim = qm.shape
    context = km.shape[-1] if (form == "matmul" and not k_swapped) else km.shape[-2]
    kv_heads = km.shape[1]
    if isinstance(q_heads, int) and isinstance(kv_heads, int) and rep > 1 and kv_heads * rep != q_heads:
        return None
    kind, inputs, updates = _kv_source(fg, kq, v)
    per_pos = 0
    for m, ctx_dim in ((km, 3 if form == "matmul" and not k_swapped else 2), (vm, 2)):
        rest = [s for i, s in enumerate(m.shape) if i != ctx_dim]
        per_pos += numel_bytes(m, rest) if all(isinstance(s, int) for s in rest) else 0
    side = set()
    for n in nodes:
        side |= {p for p in fg.producers(n) if p not in nodes and p not in (q.name, kq.name, v.name)}
    return AttentionCandidate(
        layer=0, form=form, nodes=frozenset(nodes), q=q, k=kq, v=v, exit=exit_ref, batch=batch, q_heads=q_heads,
        kv_heads=kv_heads, q_len=q_len, context=context, head_dim=head_dim, dtype=qm.dtype, kv_source=kind,
        kv_inputs=inputs, kv_updates=updates, kv_bytes=numel_bytes(km) + numel_bytes(vm),
        kv_bytes_per_position=per_pos, side_inputs=tuple(sorted(side)),
        label=_label(fg, (q, kq, v), labels))


def _sdpa(fg, name, labels):
    q, k, v = (arg(fg, name, i) for i in range(3))
    if not all(isinstance(r, Ref) for r in (q, k, v)):
        return None
    q, qn, _, _ = _operand(fg, q, name, False)
    k, kn, rep, _ = _operand(fg, k, name, False)
    v, vn, _, _ = _operand(fg, v, name, False)
    exit_ref = Ref(name, 0) if fg.node(name).multi_meta else Ref(name)
    return _candidate(fg, "sdpa", name, {name, *qn, *kn, *vn}, q, k, v, rep, False, exit_ref, labels)


def _matmul(fg, pv, labels):
    """pv = bmm(probs, v) where probs = softmax(scale/mask(bmm(q, k^T)))."""
    p_ref, v_ref = arg(fg, pv, 0), arg(fg, pv, 1)
    if not (isinstance(p_ref, Ref) and isinstance(v_ref, Ref)):
        return None
    seen, stops, stack = set(), set(), [p_ref.name]
    while stack:
        n = stack.pop()
        if n in seen or n in stops:
            continue
        if fg.node(n).kind not in ("pointwise", "view", "reduction"):
            stops.add(n)
            continue
        seen.add(n)
        if len(seen) > 64:
            return None
        stack.extend(fg.producers(n))
    qks = [s for s in stops if op(fg, s) == "bmm"]
    if not qks:
        return None
    qk = max(qks, key=lambda s: fg.node(s).index)
    region, stack = set(), [qk]
    while stack:
        for u in fg.users(stack.pop()):
            if u in seen and u not in region:
                region.add(u)
                stack.append(u)
    ops = {op(fg, n) for n in region}
    if not {"exp", "sum"} <= ops and not ops & {"_softmax", "_safe_softmax", "softmax"}:
        return None
    if any(not set(fg.users(n)) <= region | {pv} for n in region | {qk}):
        return None
    q, qn, _, _ = _operand(fg, arg(fg, qk, 0), qk, False)
    k, kn, rep, swapped = _operand(fg, arg(fg, qk, 1), qk, True)
    v, vn, rep_v, _ = _operand(fg, v_ref, pv, False)
    nodes = {qk, pv, *region, *qn, *kn, *vn}
    return _candidate(fg, "matmul", pv, nodes, q, k, v, max(rep, rep_v), swapped, Ref(pv), labels)


def find_attention(fg: FusionGraph, labels: dict) -> list:
    found = []
    for node in fg.nodes():
        o = op(fg, node.name)
        try:
            if o.startswith(("_scaled_dot_product", "scaled_dot_product")) and "backward" not in o:
                cand = _sdpa(fg, node.name, labels)
            elif o == "bmm" and linear_at(fg, node.name) is None:
                cand = _matmul(fg, node.name, labels)
            else:
                continue
        except _GUARD:
            continue
        if cand is not None and not any(cand.nodes & c.nodes for c in found):
            found.append(cand)
    return [replace(c, layer=i) for i, c in enumerate(found)]
