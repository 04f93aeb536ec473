"""Tiny random HF MoE models (transformers 5.x) for `fusebackend dump` placement plans:

    fusebackend dump bench/targets/hf_moe_tiny.py:mixtral --device cuda --options '{"gpu_memory_budget": "50%"}'
    fusebackend dump bench/targets/hf_moe_tiny.py:qwen2_moe --device cuda --options '{"gpu_memory_budget": 2000000}'

Experts run as `grouped_mm` (one graph: the routed experts' products are in it). HF's default "eager" experts
loop iterates a tensor, so Dynamo runs that loop eagerly: its matrix products reach no graph and cannot be
placed (they run where their weights are) -- see docs/architecture.md, "Placement".
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _make(family, experts_implementation="grouped_mm", batch=2, seq=8):
    import transformers as tf
    from models.hf import TensorOutput
    decoder = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=seq, tie_word_embeddings=False,
                   attention_dropout=0.0, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2)
    if family == "mixtral":
        cls, config = tf.MixtralForCausalLM, tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                              router_jitter_noise=0.0, **decoder)
    else:
        cls, config = tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=48,
            norm_topk_prob=True, **decoder)
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    model = TensorOutput(cls(config), "logits").eval()
    return model, (torch.randint(0, 128, (batch, seq)),)


def mixtral(experts_implementation="grouped_mm"):
    return _make("mixtral", experts_implementation)


def qwen2_moe(experts_implementation="grouped_mm"):
    return _make("qwen2_moe", experts_implementation)
