"""Tiny HF models run through `generate()` (greedy, a few tokens), compiled with a given backend: the tokens,
the number of graphs Dynamo compiled, and fusebackend's warnings. Shared by the generate tests."""
from __future__ import annotations

import warnings

import pytest
import torch

from models import hf

# tiny, CPU: 2 layers, 64 wide, GQA for Llama; Mixtral (top-2) and Qwen2-MoE (top-2 + shared) with 4 experts
CONFIG = hf.HFConfig(batch=2, seq=32, vocab=128, dim=64, layers=2, heads=4, kv_heads=2, ffn=128, experts=4)
BUILD = {"gpt2": hf._build_gpt2, "llama": hf._build_llama, "mixtral": hf._build_mixtral,
         "qwen2_moe": hf._build_qwen2_moe}


def model(name: str, seed: int = 0, experts: str | None = None):
    """The HF model (no wrapper); `experts` sets a MoE's experts forward (transformers 5.x: "eager" loop,
    "grouped_mm"; in fp32 under compile grouped_mm is HF's opaque custom op), None keeps models.hf's."""
    if not hf.available():
        pytest.skip("transformers is not installed")
    torch.manual_seed(seed)
    m = BUILD[name](CONFIG).inner.eval()
    if experts is not None:
        m.config._experts_implementation = experts    # read per call by HF's experts dispatch
    return m


def prompt(seed: int, batch: int = 2, length: int = 6, left_pad: int = 0):
    """Random token ids and their attention mask, the first row left-padded by `left_pad` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids, mask


def generate(m, ids, mask, new_tokens: int, backend=None):
    """Greedy generate with `m.forward` compiled by `backend` (None: eager).
    Returns (tokens, graphs compiled, fusebackend warnings)."""
    forward = m.forward
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if backend is not None:
        m.forward = torch.compile(forward, backend=backend)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    finally:
        m.forward = forward
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fuse = [str(w.message) for w in caught if str(w.message).startswith("fusebackend")]
    return out, graphs, fuse
