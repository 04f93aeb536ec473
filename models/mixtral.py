"""mixtral_moe: a Mixtral sparse-MoE layer in the HF MixtralSparseMoeBlock pattern (transformers 4.x).

Router linear, softmax in float32, top-2, renormalise, a one-hot expert mask, then a Python loop over the
experts that gathers each expert's tokens with torch.where, runs its SwiGLU FFN and scatters the weighted
result back with index_add_. torch.where(mask) has a data-dependent output size, so Dynamo breaks the graph
there; as the break falls inside a loop, Dynamo runs the whole block eagerly and only each expert's FFN
reaches the backend (one graph, recompiled once with a dynamic token count).

mixtral_moe_captured is the same layer compiled with capture_dynamic_output_shape_ops: no graph break, one
graph holding router, experts and index_add_, with unbacked (data-dependent) token counts per expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class MoEConfig:
    batch: int
    seq: int
    dim: int
    ffn: int
    experts: int
    top_k: int = 2


class ExpertFFN(nn.Module):
    """Mixtral's MixtralBlockSparseTop2MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.experts, cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.experts, bias=False)
        self.experts = nn.ModuleList(ExpertFFN(cfg) for _ in range(cfg.experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)

        final = torch.zeros((batch * seq, dim), dtype=hidden_states.dtype, device=hidden_states.device)
        # (experts, top_k, tokens): expert_mask[e, k, t] == 1 when token t picked expert e as its k-th choice
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, dim)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final.reshape(batch, seq, dim)


def _inputs(cfg: MoEConfig, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen),)


_CONFIGS = {
    "small": MoEConfig(batch=2, seq=8, dim=32, ffn=64, experts=4),
    # Mixtral-8x7B layer shapes: 8 experts of 4096 -> 14336 -> 4096, top-2
    "bench": MoEConfig(batch=8, seq=512, dim=4096, ffn=14336, experts=8),
}

ENTRIES = [
    ZooEntry(
        name="mixtral_moe",
        description="Mixtral sparse MoE layer (HF loop: softmax, top-2, one_hot mask, where, index_add_)",
        trainable=True,
        configs=_CONFIGS,
        build=SparseMoE,
        inputs=_inputs,
    ),
    ZooEntry(
        name="mixtral_moe_captured",
        description="mixtral_moe traced whole: capture_dynamic_output_shape_ops, unbacked expert token counts",
        trainable=True,
        configs=_CONFIGS,
        build=SparseMoE,
        inputs=_inputs,
        dynamo_config={"capture_dynamic_output_shape_ops": True},
    ),
]
