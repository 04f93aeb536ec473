"""llama_layer: one Llama decoder layer, written the way HF's modeling_llama writes it.

RMSNorm upcasts to float32 and casts back before the weight multiply; rotary embedding reads precomputed
cos/sin buffers and uses rotate_half; grouped-query attention repeats the KV heads with expand + reshape
(HF's repeat_kv) before SDPA; the MLP is SwiGLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class LlamaConfig:
    batch: int
    seq: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()  # statistics in float32 even for bf16 activations
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(kv: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * n_rep, s, d) through a broadcasting view, as HF does."""
    b, h, s, d = kv.shape
    if n_rep == 1:
        return kv
    return kv[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Rotary(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        t = torch.arange(cfg.seq, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # (seq, head_dim)
        # precomputed tables; not persistent, they are a function of the config
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        s = q.shape[-2]
        cos = self.cos[:s].to(q.dtype)
        sin = self.sin[:s].to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class GQAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.rotary = Rotary(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k)
        n_rep = self.heads // self.kv_heads
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = GQAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def _inputs(cfg: LlamaConfig, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen),)


ENTRY = ZooEntry(
    name="llama_layer",
    description="Llama decoder layer: float32 RMSNorm, rotary (rotate_half), GQA via SDPA, SwiGLU MLP",
    trainable=True,
    configs={
        "small": LlamaConfig(batch=2, seq=16, dim=64, heads=4, kv_heads=2, ffn=128),
        # one Llama-3-8B layer: 32 query heads, 8 KV heads, ffn 14336
        "bench": LlamaConfig(batch=8, seq=1024, dim=4096, heads=32, kv_heads=8, ffn=14336, rope_theta=500000.0),
    },
    build=LlamaLayer,
    inputs=_inputs,
)
