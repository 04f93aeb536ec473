"""gpt2_block: a GPT-2 transformer block (pre-LayerNorm, causal attention, tanh-GELU MLP, residuals).

Two attention flavours, because a backend sees very different graphs for them:
- "sdpa": F.scaled_dot_product_attention(is_causal=True), one opaque ATen op;
- "eager": explicit matmul, scale, causal mask, softmax, matmul, as HF GPT2's eager attention writes it,
  which leaves the scale/mask/softmax chain for the backend to fuse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class GPT2Config:
    batch: int
    seq: int
    dim: int
    heads: int
    attn: str = "sdpa"  # "sdpa" | "eager"
    eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.heads = cfg.heads
        self.attn = cfg.attn
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)  # fused q, k, v projection as in GPT-2
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        # bool lower-triangular mask, kept as a buffer like HF GPT2 does (only the eager flavour reads it)
        mask = torch.ones(cfg.seq, cfg.seq, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def _eager_attention(self, q, k, v):
        s = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = self.causal_mask[:s, :s]
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1)
        return torch.matmul(probs, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = self._eager_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _inputs(cfg: GPT2Config, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen),)


_SMALL = GPT2Config(batch=2, seq=16, dim=64, heads=4)
_BENCH = GPT2Config(batch=8, seq=1024, dim=1024, heads=16)  # GPT-2 medium width

ENTRIES = [
    ZooEntry(
        name="gpt2_block",
        description="GPT-2 block: LayerNorm, causal SDPA attention, tanh-GELU MLP, residuals",
        trainable=True,
        configs={"small": _SMALL, "bench": _BENCH},
        build=GPT2Block,
        inputs=_inputs,
    ),
    ZooEntry(
        name="gpt2_block_eager_attn",
        description="GPT-2 block with explicit matmul + causal mask + softmax attention (HF eager style)",
        trainable=True,
        configs={"small": replace(_SMALL, attn="eager"), "bench": replace(_BENCH, attn="eager")},
        build=GPT2Block,
        inputs=_inputs,
    ),
]
