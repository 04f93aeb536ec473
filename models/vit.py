"""vit_block: a ViT encoder block (pre-LayerNorm, non-causal SDPA attention, erf-GELU MLP, residuals).

The token count of a real ViT (patches + class token, e.g. 197) is not a power of two, which exercises
the backend's tail handling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class ViTConfig:
    batch: int
    tokens: int
    dim: int
    heads: int
    mlp: int
    eps: float = 1e-6


class SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (b, n, 3, heads, head_dim) -> (3, b, heads, n, head_dim), the timm layout
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _inputs(cfg: ViTConfig, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.tokens, cfg.dim, generator=gen),)


ENTRY = ZooEntry(
    name="vit_block",
    description="ViT encoder block: LayerNorm, non-causal SDPA attention, GELU MLP, residuals",
    trainable=True,
    configs={
        "small": ViTConfig(batch=2, tokens=17, dim=64, heads=4, mlp=128),
        # ViT-L/16 at 224x224: 196 patches + class token
        "bench": ViTConfig(batch=32, tokens=197, dim=1024, heads=16, mlp=4096),
    },
    build=ViTBlock,
    inputs=_inputs,
)
