"""What a hybrid MoE layer's step is predicted to cost under a plan: at the graph's own token count, and at a
decode step (few routed picks, most experts idle), from which capture picks between streaming buffers and
resident experts for the whole model.

At a decode step a layer sees `pairs` token-expert picks (rows x top-k), fewer than its experts: which experts
they hit is random, so the step's cost is an expectation over how many picks land on resident experts (the
mean from the routing shares, interpolated between the two neighbouring whole counts). Uniform costs are not
linear in that count (CPU and link overlap), which is why an average token count per expert would mislead:
it spreads 2 picks over all 8 experts of Mixtral and predicts eight CPU experts where the step runs two.
"""
from __future__ import annotations

import math

from .cost_schedule import schedule_experts

# capture's choice weighs one prefill call against this many decode steps per prompt row: a generation as long
# as its prompt (decode dominates a chat; a pure-prefill user still sees the prefill term in the sum)
DECODE_STEPS_PER_PROMPT_ROW = 1.0


def routed_pairs(fg, patterns, rows_hint=None):
    """{layer: rows x top-k} of each router whose counts are static (or taken from rows_hint)."""
    out = {}
    for r in patterns.routers:
        meta = fg.meta_of(r.input)
        rows = 1
        for d in (meta.shape[:-1] if meta is not None else ("?",)):
            rows = rows * d if isinstance(d, int) and isinstance(rows, int) else None
        rows = rows or rows_hint
        if rows and isinstance(r.top_k, int):
            out[r.layer] = rows * r.top_k
    return out


def _routed(plan, patterns, layer):
    rows = {s.name: s for s in plan.subgraphs}
    mine = [c for c in patterns.experts if c.layer == layer and c.kind == "routed" and c.expert is not None]
    return mine, [(c.expert, rows[_name(c)]) for c in mine if _name(c) in rows]


def _name(c):
    return "layer%d.expert%d" % (c.layer, c.expert)


def layer_step_ms(plan, patterns, profile, layer, pairs=None, shares=None):
    """One hybrid layer's predicted step (ms), or None when it has no routed experts in the table.
    pairs: the step's token-expert picks; None or at least the experts: every expert at its table token count."""
    mine, experts = _routed(plan, patterns, layer)
    if not experts:
        return None
    c = mine[0]

    def sched(entries):          # no streaming buffer: the runtime has no link to use (placed_moe._cpu_only)
        return 1e3 * schedule_experts(profile, entries, c.hidden, c.ffn, c.dtype,
                                      link=plan.staging_slots + plan.shared_staging_slots > 0).predicted_s
    if pairs is None or pairs >= len(experts):
        return sched([(e, row.tokens, row.home == "gpu") for e, row in experts])
    res = [e for e, row in experts if row.home == "gpu"]
    far = [e for e, row in experts if row.home != "gpu"]
    share = shares or {}
    total = sum(share.get(e, 1.0) for e, _ in experts) or 1.0
    hit = pairs * sum(share.get(e, 1.0) for e in res) / total       # expected picks on resident experts
    lo = min(int(math.floor(hit)), len(res))

    def at(k):             # k picks on resident experts, the rest on distinct host experts, one token each
        k = min(k, len(res), pairs)
        n_far = min(pairs - k, len(far))
        return sched([(e, 1, True) for e in res[:k]] + [(e, 1, False) for e in far[:n_far]])
    frac = hit - lo
    return at(lo) if frac <= 0 or lo >= len(res) else (1 - frac) * at(lo) + frac * at(lo + 1)


def predict_hybrid(plan, patterns, profile, pairs=None, shares=None) -> None:
    """plan.hybrid_predicted_ms: each hybrid layer's step as the runtime would schedule it at the plan's token
    counts (cost_schedule.schedule_experts: CPU, link and GPU overlapped), not the serial sum of the table.
    pairs: {layer: rows x top-k} of this graph (routed_pairs); shares: {layer: {expert: routing share}}."""
    for layer in plan.hybrid_layers:
        ms = layer_step_ms(plan, patterns, profile, layer, (pairs or {}).get(layer), (shares or {}).get(layer))
        if ms is not None:
            plan.hybrid_predicted_ms[layer] = ms


def decode_step_ms(plan, patterns, profile, decode_rows=1, shares=None) -> float:
    """The hybrid layers' summed step at a decode call of `decode_rows` rows (top-k picks per row)."""
    total = 0.0
    for layer in plan.hybrid_layers:
        top_k = next((r.top_k for r in patterns.routers if r.layer == layer and isinstance(r.top_k, int)), None)
        ms = layer_step_ms(plan, patterns, profile, layer, decode_rows * top_k if top_k else None,
                           (shares or {}).get(layer))
        total += ms or 0.0
    return total


def choice_cost_ms(plan, patterns, profile, pairs, decode_rows=1, shares=None) -> float:
    """What capture minimises over staging-buffer counts: this graph's call (plan.hybrid_predicted_ms, at
    `pairs`) plus the decode steps that follow it: DECODE_STEPS_PER_PROMPT_ROW per row of a prompt-sized call
    (its rows: pairs / top-k); a decode-sized graph counts its own step once more."""
    top = {r.layer: r.top_k for r in patterns.routers if isinstance(r.top_k, int) and r.top_k > 0}
    rows = max([pairs[l] // top[l] for l in pairs if l in top] or [1])
    steps = max(1.0, DECODE_STEPS_PER_PROMPT_ROW * rows / max(decode_rows, 1))
    return sum(plan.hybrid_predicted_ms.values()) + steps * decode_step_ms(plan, patterns, profile, decode_rows,
                                                                           shares)
