"""mlp: LayerNorm -> Linear -> GELU -> Linear, the simplest fusion target (norm prologue, GELU epilogue)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class MLPConfig:
    batch: int
    seq: int
    dim: int
    hidden: int


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _inputs(cfg: MLPConfig, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen),)


ENTRY = ZooEntry(
    name="mlp",
    description="2-layer MLP: LayerNorm, Linear, GELU (erf), Linear",
    trainable=True,
    configs={
        "small": MLPConfig(batch=2, seq=8, dim=32, hidden=128),
        "bench": MLPConfig(batch=8, seq=1024, dim=2048, hidden=8192),
    },
    build=MLP,
    inputs=_inputs,
)
