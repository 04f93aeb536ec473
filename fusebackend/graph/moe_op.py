"""`fusebackend::moe_experts`: one MoE layer's routed SwiGLU experts as a single op of the graph.

The placement pass (passes/placement_moe.py) replaces a layer's per-expert gathers, FFNs, routing-weight
multiplies and scatter-adds by this op, so that the runtime can decide per call which expert runs where
(runtime/placed_moe.py: the hybrid CPU/GPU layer). It is a real torch op so that every layer treats it like
any ATen op: FX and fake tensors give its meta, the runtime calls it as an ATen step.

    moe_experts(hidden [T, H], idx [T, k] int, weights [T, k], experts, layer int, layout int) -> [T, H]
    layout 0: experts = [gate0, up0, down0, gate1, ...] (each expert's own 2-D weights);
    layout 1: experts = [gate_up [E, 2F, H] (gate rows first), down [E, H, F]] (HF 5.x's 3-D parameters)
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t),  e = idx[t, j]
    (gate, up: [F, H]; down: [H, F]; products as F.linear.)

`layer` selects the handler the runtime installed (HANDLERS); without one (UNBOUND, the key of layers rewritten
without a memory budget: capture/moe_layers.py) the op computes the formula itself with one device -> host
sync (graph/moe_grouped.py: float32 accumulation, rounded once, as the hybrid layer does), wherever its tensors
are. `reference_moe` is the same formula spelled per expert, one nonzero each.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .moe_grouped import sorted_moe

UNBOUND = 0              # the `layer` key no handler is ever installed under (placement's keys start at 1)

# layer key -> an object with .forward(hidden, idx, weights, experts, layout) (the runtime's hybrid layer); held
# weakly: the compiled program owns its layers
HANDLERS = weakref.WeakValueDictionary()


def expert_triples(experts, layout: int) -> list:
    """[(gate [F, H], up [F, H], down [H, F])] per expert: views, no copies."""
    if layout == 1:
        gate_up, down = experts
        f = gate_up.shape[1] // 2
        return [(gate_up[e, :f], gate_up[e, f:], down[e]) for e in range(gate_up.shape[0])]
    return [tuple(experts[3 * e:3 * e + 3]) for e in range(len(experts) // 3)]


def reference_moe(hidden, idx, weights, experts, layout: int = 0):
    """The op's formula on whatever devices its tensors are (weights are moved to hidden's device)."""
    acc_dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    acc = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
    for e, trio in enumerate(expert_triples(experts, layout)):
        tok, j = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        g, u, d = (w.to(hidden.device) for w in trio)
        x = hidden.index_select(0, tok)
        y = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        acc.index_add_(0, tok, y.to(acc_dtype) * weights[tok, j, None].to(acc_dtype))
    return acc.to(hidden.dtype)


@torch.library.custom_op("fusebackend::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: list[torch.Tensor],
                layer: int, layout: int = 0) -> torch.Tensor:
    handler = HANDLERS.get(layer)
    if handler is not None:
        return handler.forward(hidden, idx, weights, experts, layout)
    return sorted_moe(hidden, idx, weights, expert_triples(experts, layout))


@moe_experts.register_fake
def _(hidden, idx, weights, experts, layer, layout=0):
    return torch.empty_like(hidden)


OP = torch.ops.fusebackend.moe_experts.default
