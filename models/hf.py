"""Tiny random-weight Hugging Face models (GPT-2, Llama, Mixtral, Qwen2-MoE, BERT), built from configs, no downloads.

Registered only where `transformers` is installed; transformers itself is imported lazily, when a model is
built, because importing it takes seconds. Written against transformers 4.4x and 5.x: settings that one
version lacks are passed as config attributes, which the other version ignores.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class HFConfig:
    batch: int
    seq: int
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    experts: int = 0


class TensorOutput(nn.Module):
    """Calls the HF model with input_ids and returns one tensor (logits or last_hidden_state)."""

    def __init__(self, inner: nn.Module, field: str):
        super().__init__()
        self.inner = inner
        self.field = field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "return_dict": True}
        if self.field == "logits":
            kwargs["use_cache"] = False  # no KV-cache object: plain tensors in, one tensor out
        return getattr(self.inner(**kwargs), self.field)


# Shared by every config: no dropout (train-mode tests compare against eager), SDPA attention, and the
# experts loop of MixtralSparseMoeBlock rather than transformers 5's default grouped_mm.
_COMMON = {"attn_implementation": "sdpa", "experts_implementation": "eager", "tie_word_embeddings": False}


def _transformers():
    try:
        return importlib.import_module("transformers")
    except Exception as e:  # a broken install is reported, not hidden
        raise ImportError(f"models.hf needs a working transformers install: {e}") from e


def _instantiate(model_cls, config) -> nn.Module:
    # Constructor kwargs are not enough in every version: set the implementations on the config as well.
    for key in ("attn_implementation", "experts_implementation"):
        try:
            setattr(config, "_" + key, _COMMON[key])
        except Exception:  # older versions reject unknown implementation names; their defaults are fine
            pass
    return model_cls(config)


def _build_gpt2(c: HFConfig) -> nn.Module:
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=c.vocab, n_positions=c.seq, n_embd=c.dim, n_layer=c.layers, n_head=c.heads, n_inner=c.ffn,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **_COMMON,
    )
    return TensorOutput(_instantiate(tf.GPT2LMHeadModel, config), "logits")


def _build_llama(c: HFConfig) -> nn.Module:
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.seq,
        attention_dropout=0.0, **_COMMON,
    )
    return TensorOutput(_instantiate(tf.LlamaForCausalLM, config), "logits")


def _build_mixtral(c: HFConfig) -> nn.Module:
    tf = _transformers()
    config = tf.MixtralConfig(
        vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.seq,
        num_local_experts=c.experts, num_experts_per_tok=2, attention_dropout=0.0, router_jitter_noise=0.0,
        **_COMMON,
    )
    return TensorOutput(_instantiate(tf.MixtralForCausalLM, config), "logits")


def _build_qwen2_moe(c: HFConfig, top_k: int = 2, shared_ffn: int | None = None) -> nn.Module:
    """Qwen2-MoE: `c.experts` routed experts of width `c.ffn` (top_k per token) plus a gated shared expert of
    width `shared_ffn` (default 2 * c.ffn); q/k/v with bias, every layer sparse."""
    tf = _transformers()
    config = tf.Qwen2MoeConfig(
        vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=shared_ffn or 2 * c.ffn,
        moe_intermediate_size=c.ffn, shared_expert_intermediate_size=shared_ffn or 2 * c.ffn,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.seq, num_experts=c.experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        decoder_sparse_step=1, attention_dropout=0.0, **_COMMON,
    )
    return TensorOutput(_instantiate(tf.Qwen2MoeForCausalLM, config), "logits")


def _build_bert(c: HFConfig) -> nn.Module:
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=c.vocab, hidden_size=c.dim, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.ffn, max_position_embeddings=c.seq, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **_COMMON,
    )
    return TensorOutput(_instantiate(tf.BertModel, config), "last_hidden_state")


def _token_ids(c: HFConfig, gen: torch.Generator) -> tuple:
    return (torch.randint(0, c.vocab, (c.batch, c.seq), generator=gen),)


def _entry(name, description, build, small: HFConfig, bench: HFConfig) -> ZooEntry:
    return ZooEntry(name=name, description=description, trainable=True,
                    configs={"small": small, "bench": bench}, build=build, inputs=_token_ids)


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def entries() -> list[ZooEntry]:
    """The hf_* entries, or none where transformers is not installed."""
    if not available():
        return []
    return [
        _entry("hf_gpt2", "HF GPT2LMHeadModel, 2 tiny layers, random weights; returns logits", _build_gpt2,
               HFConfig(2, 16, 128, 64, 2, 4, 4, 256),
               HFConfig(8, 1024, 50257, 768, 12, 12, 12, 3072)),
        _entry("hf_llama", "HF LlamaForCausalLM, 2 tiny layers, GQA, random weights; returns logits", _build_llama,
               HFConfig(2, 16, 128, 64, 2, 4, 2, 128),
               HFConfig(8, 1024, 32000, 2048, 4, 16, 4, 5632)),
        _entry("hf_mixtral", "HF MixtralForCausalLM, 2 tiny layers, 4 experts top-2 (eager experts loop); logits",
               _build_mixtral,
               HFConfig(2, 8, 128, 32, 2, 4, 2, 64, experts=4),
               HFConfig(8, 512, 32000, 2048, 2, 16, 4, 5632, experts=8)),
        _entry("hf_bert", "HF BertModel, 2 tiny layers, random weights; returns last_hidden_state", _build_bert,
               HFConfig(2, 16, 128, 64, 2, 4, 4, 128),
               HFConfig(8, 512, 30522, 768, 12, 12, 12, 3072)),
    ]
