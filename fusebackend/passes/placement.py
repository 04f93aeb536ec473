"""Placement: under a GPU memory budget, a home for every weight and a device for every candidate subgraph.

Inputs are plain data: the graph's patterns (passes/patterns.py), the hardware profile, the budget left, and
which graph inputs are weights. Weights that no candidate owns (embeddings, attention projections, norms,
the router) must be resident; a budget below them is a PlacementError naming both numbers. Expert weights
compete for the rest by benefit per byte: the time saved per step by keeping the expert resident rather than
running it the best other way (CPU, or streamed over the link), weighted by its share of the tokens. An
expert left in host memory computes where the cost model says it is faster at this graph's token count.
Attention stays on the GPU here (its KV cache is an activation); its predicted times are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..options import OptionError
from .cost_model import attention_cost, expert_cost


class PlacementError(OptionError):
    """The GPU memory budget cannot hold what must stay on the GPU."""


@dataclass
class PlacedSubgraph:
    """One row of the placement table."""
    name: str                 # "layer0.expert3", "layer1.attention", "ffn" (a graph holding one expert)
    kind: str                 # "expert" | "shared_expert" | "attention"
    nodes: frozenset
    weights: tuple            # placeholder names of the weights it owns
    bytes: int                # weight bytes (KV bytes for attention)
    home: str                 # "gpu" | "host"
    device: str               # where it computes: "cuda" | "cpu"
    mode: str                 # "resident" | "streamed" | "cpu"
    tokens: int               # the token count (experts) or context (attention) the times are for
    predicted_ms: dict        # {"resident": ms, "streamed": ms, "cpu": ms}


@dataclass
class PlacementPlan:
    budget_bytes: int
    fixed_bytes: int                      # weights that must be resident
    placed_resident_bytes: int            # expert weights given a GPU home
    input_homes: dict                     # placeholder name -> "gpu" | "host"
    subgraphs: list = field(default_factory=list)
    profile_name: str = ""
    per_call: bool = False                # one candidate whose weights change per call: homes chosen at run time
    staging_slots: int = 0                # expert-sized GPU buffers reserved for streaming (hybrid layers)
    staging_bytes: int = 0
    hybrid_layers: list = field(default_factory=list)   # MoE layers whose experts are scheduled per call
    expert_homes: dict = field(default_factory=dict)    # (layer, expert) -> home, for sliced 3-D weights
    hybrid_predicted_ms: dict = field(default_factory=dict)  # layer -> the scheduled (overlapped) layer time
    shared_staging_slots: int = 0         # streaming buffers an earlier graph of the model holds (used here too)

    @property
    def resident_bytes(self) -> int:
        return self.fixed_bytes + self.placed_resident_bytes + self.staging_bytes

    def predicted_step_ms(self) -> float:
        """Sum of each subgraph's time in its mode (the simple, serial execution of this issue)."""
        return sum(s.predicted_ms[s.mode] for s in self.subgraphs)


def _mib(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


def _tokens(c, hint):
    return c.tokens if isinstance(c.tokens, int) else max(1, int(hint or 1))


def routed_token_hint(fg, patterns, rows_hint=None):
    """Tokens an expert sees per call on average, where its count is data-dependent: the router's rows x
    top-k / experts (uniform routing), or rows_hint (capture's example size) when no router is in the graph."""
    for r in patterns.routers:
        meta = fg.meta_of(r.input)
        lead = meta.shape[:-1] if meta is not None else ("?",)
        rows = 1
        for d in lead:
            rows = rows * d if isinstance(d, int) and isinstance(rows, int) else None
        rows = rows or rows_hint
        if rows and isinstance(r.top_k, int) and r.experts:
            return max(1, rows * r.top_k // r.experts)
    return rows_hint


def expert_modes(profile, c, tokens) -> dict:
    cost = expert_cost(profile, tokens, c.hidden, c.ffn, c.dtype)
    return {"resident": cost.gpu_resident_s * 1e3, "streamed": cost.gpu_streamed_s * 1e3, "cpu": cost.cpu_s * 1e3}


def best_offloaded(modes: dict) -> str:
    return "cpu" if modes["cpu"] <= modes["streamed"] else "streamed"


def plan_placement(fg, patterns, profile, budget_bytes: int, weight_inputs, weight_bytes: dict,
                   already_resident: int = 0, popularity: Optional[dict] = None,
                   token_hint: Optional[int] = None, fixed_homes: Optional[dict] = None,
                   staging_slot_bytes: int = 0, staging_slots: int = 2, sliced_layers=()) -> PlacementPlan:
    """Homes for `weight_inputs` (placeholder names; `weight_bytes` gives each one's size) of this graph.

    already_resident: bytes other graphs of the same model already hold on the GPU. fixed_homes: weights
    whose home an earlier graph chose (a weight shared by graphs keeps one home). popularity:
    {layer: [share per expert]}; uniform when None. staging_slot_bytes: one expert's bytes, when the hybrid
    runtime will stream experts (0: nothing to reserve): if the experts do not all fit, up to `staging_slots`
    such buffers come out of the budget first (fewer if it cannot hold them; none below one). sliced_layers:
    layers whose experts share 3-D weights but are homed one by one (plan.expert_homes[(layer, expert)])."""
    fixed_homes = dict(fixed_homes or {})
    weight_inputs = [w for w in fg.inputs if w in set(weight_inputs)]
    owned = {w for c in patterns.experts for w in _weights(c)}
    homes, fixed = {}, 0
    for w in weight_inputs:
        if w not in owned:
            homes[w] = "gpu"
            if fixed_homes.get(w) != "gpu":
                fixed += weight_bytes[w]
    left = budget_bytes - already_resident - fixed
    if left < 0:
        raise PlacementError(
            "fusebackend: option 'gpu_memory_budget' is %s, but the weights that must stay on the GPU "
            "(embeddings, attention, norms, routers: everything but the experts) need at least %s%s"
            % (_mib(budget_bytes), _mib(budget_bytes - left),
               " (%s of it held by earlier graphs)" % _mib(already_resident) if already_resident else ""))
    staged, staging = 0, 0
    expert_bytes = sum(weight_bytes[w] for w in owned if fixed_homes.get(w) != "gpu")
    if staging_slot_bytes > 0 and expert_bytes > left:
        staged = max(0, min(staging_slots, left // staging_slot_bytes))
        staging = staged * staging_slot_bytes
        left -= staging
    # the whole graph is one expert FFN that Dynamo compiled once for every expert: weights arrive per call
    per_call = len(patterns.experts) == 1 and patterns.experts[0].form == "graph"
    rows, ranked = [], []
    sliced_ids = set(sliced_layers)

    def sliced(c):                   # a routed expert's slice of a sliced layer's 3-D weights
        return c.layer in sliced_ids and c.kind == "routed" and c.form in ("grouped", "batched")
    for unit in _units(patterns.experts, sliced):
        c = unit[0]
        tokens = _tokens(c, token_hint)
        # batched/grouped: `tokens` counts every token-expert pair of the layer; each expert sees its share
        per = len(unit) if not sliced(c) else sum(1 for e in patterns.experts if e.nodes == c.nodes)
        each = [max(1, _tokens(e, token_hint) // per) for e in unit]
        tokens = tokens if not sliced(c) else each[0]
        modes = _sum_modes([expert_modes(profile, e, t) for e, t in zip(unit, each)])
        share = sum(_share(popularity, e) for e in unit)
        saved = (modes[best_offloaded(modes)] - modes["resident"]) * share
        ws = sorted({w for e in unit for w in _weights(e)})
        size = sum(weight_bytes[w] for w in ws) if not sliced(c) else c.weight_bytes
        ranked.append((saved / max(size, 1), unit, ws, modes, size, tokens))
    placed, expert_homes = 0, {}
    for w in {w for c in patterns.experts if sliced(c) for w in _weights(c)}:
        homes[w] = "host"            # the 3-D parameter stays in host memory; resident slices are copies
    # equal benefit (uniform routing): take the layers in turn, so every layer keeps some experts resident
    # (the runtime re-chooses them per layer from observed routing) rather than layer 0 holding them all
    seen, turn = {}, []
    for r in ranked:
        layer = r[1][0].layer
        turn.append(seen.get(layer, 0))
        seen[layer] = turn[-1] + 1
    order = sorted(range(len(ranked)), key=lambda i: (-ranked[i][0], turn[i]))
    for _, unit, ws, modes, size, tokens in (ranked[i] for i in order):
        c = unit[0]
        if sliced(c):                # one expert's slice of a layer's 3-D weights, homed on its own
            home = "gpu" if size <= left - placed else "host"
            placed += size if home == "gpu" else 0
            expert_homes[(c.layer, c.expert)] = home
            mode = "resident" if home == "gpu" else best_offloaded(modes)
            rows.append(PlacedSubgraph(_name(c), "expert", frozenset(c.nodes), tuple(ws), size, home,
                                       "cpu" if mode == "cpu" else "cuda", mode, tokens, modes))
            continue
        known = {fixed_homes.get(w) for w in ws} - {None}
        if known:
            home = "gpu" if known == {"gpu"} else "host"
        else:
            home = "gpu" if size <= left - placed else "host"
        if home == "gpu":
            placed += size if not known else 0
            mode = "resident"
        else:
            mode = best_offloaded(modes)
        for w in ws:
            homes[w] = home
        kind = "shared_expert" if c.kind == "shared" else "expert"
        rows.append(PlacedSubgraph(_name(c) if len(unit) == 1 else "layer%d.experts" % c.layer, kind,
                                   frozenset(c.nodes), tuple(ws), size, home, "cpu" if mode == "cpu" else "cuda",
                                   mode, tokens, modes))
    for a in patterns.attention:
        rows.append(_attention_row(profile, a, token_hint))
    rows.sort(key=lambda r: r.name)
    plan = PlacementPlan(budget_bytes, fixed, placed, homes, rows, getattr(profile, "name", ""), per_call,
                         staged, staging)
    plan.expert_homes = expert_homes
    return plan


def _units(experts, sliced=lambda c: False) -> list:
    """Candidates that share one node set (batched or grouped experts of a layer: one bmm reads every
    expert's slice of a 3-D weight) are placed as one unit; the others one by one -- and so are those of the
    `sliced` layers, whose hybrid op homes each expert's slice on its own."""
    units = {}
    for c in experts:
        if sliced(c):
            units[(c.layer, c.expert)] = [c]
            continue
        units.setdefault(frozenset(c.nodes), []).append(c)
    return list(units.values())


def _sum_modes(modes) -> dict:
    return {k: sum(m[k] for m in modes) for k in ("resident", "streamed", "cpu")}


def _weights(c):
    return [u.input for u in c.weights]


def _share(popularity, c) -> float:
    if not popularity or c.expert is None or c.layer not in popularity:
        return 1.0
    shares = popularity[c.layer]
    total = sum(shares) or 1.0
    return shares[c.expert] / total * len(shares) if c.expert < len(shares) else 1.0


def _name(c) -> str:
    if c.expert is None:
        return "layer%d.%s" % (c.layer, "shared_expert" if c.kind == "shared" else "expert")
    return "layer%d.expert%d" % (c.layer, c.expert)


def _attention_row(profile, a, hint) -> PlacedSubgraph:
    ctx = a.context if isinstance(a.context, int) else max(1, int(hint or 1))
    batch = a.batch if isinstance(a.batch, int) else 1
    cost = attention_cost(profile, batch, a.q_heads, a.kv_heads, ctx, a.head_dim, a.dtype)
    modes = {"resident": cost.gpu_resident_s * 1e3, "streamed": cost.gpu_streamed_s * 1e3,
             "cpu": cost.cpu_s * 1e3}
    return PlacedSubgraph("layer%d.attention" % a.layer, "attention", frozenset(a.nodes), tuple(a.kv_inputs),
                          int(cost.kv_bytes), "gpu", "cuda", "resident", ctx, modes)


def format_plan(plan: PlacementPlan) -> str:
    """The placement table `explain` and `fusebackend dump` print."""
    lines = ["placement: budget %s, must stay on the GPU %s, experts resident %s%s (profile %s)%s"
             % (_mib(plan.budget_bytes), _mib(plan.fixed_bytes), _mib(plan.placed_resident_bytes),
                ", streaming buffers %d x %s" % (plan.staging_slots, _mib(plan.staging_bytes // plan.staging_slots))
                if plan.staging_slots else "", plan.profile_name,
                "; homes chosen per call (one graph serves every expert)" if plan.per_call else "")]
    if not plan.subgraphs:
        lines.append("  no MoE expert or attention subgraph found: every weight is resident")
        return "\n".join(lines)
    lines.append("  %-22s %-13s %11s %-4s %-6s %-9s %7s %12s %12s %9s"
                 % ("subgraph", "kind", "bytes", "home", "device", "mode", "tokens", "resident ms", "streamed ms",
                    "cpu ms"))
    for s in plan.subgraphs:
        p = s.predicted_ms
        lines.append("  %-22s %-13s %11s %-4s %-6s %-9s %7d %12.3f %12.3f %9.3f"
                     % (s.name, s.kind, _mib(s.bytes), s.home, s.device, s.mode, s.tokens, p["resident"],
                        p["streamed"], p["cpu"]))
    lines.append("  predicted time of the placed subgraphs per call: %.3f ms" % plan.predicted_step_ms())
    for layer in plan.hybrid_layers:
        pred = plan.hybrid_predicted_ms.get(layer)
        lines.append("  layer%d: one hybrid op; its host experts go to the CPU or the link per call, by their token "
                     "counts (mode above: the average call's)%s" % (
                         layer, "; at these token counts, scheduled and overlapped: %.3f ms" % pred if pred else ""))
    return "\n".join(lines)
