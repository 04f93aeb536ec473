"""A Mixtral-8x7B-shaped MoE layer (8 experts of 4096 -> 14336 -> 4096, top-2, bf16) for placement plans.

    fusebackend dump bench/targets/mixtral_8x7b_layer.py:make --device cuda \
        --options '{"gpu_memory_budget": 1500000000}' --hardware-profile FILE

The zoo's mixtral_moe_captured layer at the real width, with few tokens (16: a small decode batch) so that
its one eager run on a CPU machine (the dump runs the model once) takes seconds; weights are 2.8 GB.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from models.mixtral import MoEConfig, SparseMoE  # noqa: E402

DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True}


def make(tokens=16):
    torch.manual_seed(0)
    cfg = MoEConfig(batch=1, seq=tokens, dim=4096, ffn=14336, experts=8)
    with torch.device("meta"):
        model = SparseMoE(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval(), (torch.randn(1, tokens, 4096, dtype=torch.bfloat16),)
