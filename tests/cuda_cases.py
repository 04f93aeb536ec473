"""The graphs the CUDA tests compile (tests/test_cuda.py): name -> (fn, make_args(device)), and which of
them are row reductions."""
from __future__ import annotations

import torch

F = torch.nn.functional

def _t(*s, dtype=torch.float32, device="cpu"):
    return torch.randn(*s, device=device).to(dtype)


def _pos(*s, device="cpu"):
    return torch.rand(*s, device=device) + 0.5


def _misaligned(*s, dtype=torch.float32, device="cpu"):
    n = 1
    for v in s:
        n *= v
    return torch.randn(n + 1, device=device).to(dtype)[1:].view(*s)


def _rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def _causal_layers(x, w):
    """Two softmax layers reading one causal mask built from arange (rematerialised into both kernels)."""
    i = torch.arange(x.shape[-1], device=x.device)
    mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(x.dtype)
    return torch.softmax(torch.softmax(x + mask, -1) @ w + mask, -1)


def _packed_mask(c):
    """HF's packed-sequence mask: two-tensor `index` takes of the sequence ids, causal (one kernel)."""
    b = torch.arange(c.shape[0], device=c.device).view(-1, 1, 1, 1)
    q = torch.arange(c.shape[1], device=c.device).view(1, 1, -1, 1)
    kv = torch.arange(c.shape[1], device=c.device).view(1, 1, 1, -1)
    return (c[b, q] == c[b, kv]) & (kv <= q)


def _embed_ln(ids, word, pos, w, b):
    """Word + position embeddings and their layer norm: one row kernel reading both tables (takes)."""
    h = F.embedding(ids, word) + F.embedding(torch.arange(ids.shape[1], device=ids.device), pos)
    return F.layer_norm(h, (word.shape[1],), w, b)


BF, HF = torch.bfloat16, torch.float16

# name -> (fn, make_args(device))
CASES = {
    "pointwise_chain": (lambda x, y: F.gelu(x * 1.5 + y) * torch.sigmoid(x) - torch.tanh(y) * 0.5,
                        lambda d: (_t(1000, 37, device=d), _t(1000, 37, device=d))),
    "pointwise_tail": (lambda x, y: x * y + 2, lambda d: (_t(999, 37, device=d), _t(999, 37, device=d))),
    "pointwise_misaligned": (lambda x, y: x * y + 2,
                             lambda d: (_misaligned(100, 64, device=d), _t(100, 64, device=d))),
    "broadcast_bias": (lambda x, b, m: torch.relu(x + b) * m,
                       lambda d: (_t(64, 256, device=d), _t(256, device=d), _t(64, 1, device=d))),
    "transposed": (lambda x, y: x.t() * y + 1, lambda d: (_t(256, 64, device=d), _t(64, 256, device=d))),
    "sliced": (lambda x: torch.exp(x[:, ::2]) + x[:, 1::2], lambda d: (_t(64, 256, device=d),)),
    "sliced_1d": (lambda x: (x[2:8] * 2).exp(), lambda d: (_t(10, device=d),)),
    "softmax": (lambda x, m: torch.softmax(x * 0.125 + m, -1),
                lambda d: (_t(64, 4096, device=d), _t(64, 4096, device=d))),
    "softmax_short": (lambda x: torch.softmax(x, -1), lambda d: (_t(300, 100, device=d),)),
    "softmax_long": (lambda x: torch.softmax(x, -1), lambda d: (_t(4, 50000, device=d),)),
    "softmax_odd": (lambda x: torch.softmax(x, -1), lambda d: (_t(33, 3001, device=d),)),
    "softmax_misaligned": (lambda x: torch.softmax(x, -1), lambda d: (_misaligned(64, 4096, device=d),)),
    "softmax_transposed": (lambda x: torch.softmax(x.t(), -1), lambda d: (_t(2048, 16, device=d),)),
    "softmax_dim0": (lambda x: torch.softmax(x, 0), lambda d: (_t(300, 40, device=d),)),
    "layernorm_gelu_bf16": (lambda x, r, w, b: F.gelu(F.layer_norm(x + r, (1024,), w, b)),
                            lambda d: (_t(64, 1024, dtype=BF, device=d), _t(64, 1024, dtype=BF, device=d),
                                       _t(1024, dtype=BF, device=d), _t(1024, dtype=BF, device=d))),
    "layernorm_f32": (lambda x, w, b: F.layer_norm(x, (4096,), w, b),
                      lambda d: (_t(32, 4096, device=d), _t(4096, device=d), _t(4096, device=d))),
    "layernorm_misaligned_bf16": (lambda x, w, b: F.layer_norm(x, (1024,), w, b),
                                  lambda d: (_misaligned(16, 1024, dtype=BF, device=d),
                                             _t(1024, dtype=BF, device=d), _t(1024, dtype=BF, device=d))),
    "rmsnorm_bf16": (_rms, lambda d: (_t(64, 4096, dtype=BF, device=d), _t(4096, dtype=BF, device=d))),
    "rmsnorm_3d_bf16": (_rms, lambda d: (_t(4, 8, 2048, dtype=BF, device=d), _t(2048, dtype=BF, device=d))),
    "sum_dim0": (lambda x: x.sum(0), lambda d: (_pos(300, 77, device=d),)),
    "amax_dims02": (lambda x: x.amax(dim=(0, 2)), lambda d: (_t(6, 50, 40, device=d),)),
    "mean_mid": (lambda x: x.mean(1, keepdim=True) * x, lambda d: (_pos(8, 33, 16, device=d),)),
    "sum_all": (lambda x: x.sum(), lambda d: (_pos(1000, 100, device=d),)),
    "amax_misaligned": (lambda x: x.amax(-1), lambda d: (_misaligned(64, 256, device=d),)),
    "var_mean": (lambda x: torch.var_mean(x, -1), lambda d: (_t(64, 512, device=d),)),
    "f16_chain": (lambda x, y: (x * y + 1).sigmoid() * 2,
                  lambda d: (_t(100, 200, dtype=HF, device=d), _t(100, 200, dtype=HF, device=d))),
    "bf16_chain": (lambda x, y: torch.where(x > y, x - y, x * y).exp(),
                   lambda d: (_t(128, 130, dtype=BF, device=d), _t(128, 130, dtype=BF, device=d))),
    "int_ops": (lambda x, y: (x * 3 + y) // 2 - (x % 5),
                lambda d: (torch.randint(-100, 100, (64, 100), dtype=torch.int32, device=d),
                           torch.randint(1, 100, (64, 100), dtype=torch.int32, device=d))),
    "int64_sum": (lambda x: x.sum(-1), lambda d: (torch.randint(-100, 100, (64, 1000), device=d),)),
    "bool_ops": (lambda x, y: (x > 0) & (y < 0) | (x > y), lambda d: (_t(50, 64, device=d), _t(50, 64, device=d))),
    "any_all": (lambda x: (x > 2).any(-1) | (x > -5).all(-1), lambda d: (_t(40, 300, device=d),)),
    "uint8_add": (lambda x, y: x + y,
                  lambda d: (torch.randint(0, 100, (1000,), dtype=torch.uint8, device=d),
                             torch.randint(0, 100, (1000,), dtype=torch.uint8, device=d))),
    "double_chain": (lambda x: torch.exp(x) * 2 - x, lambda d: (_t(100, 10, dtype=torch.float64, device=d),)),
    "scalar_out": (lambda x: (x * 2).sum() + 1, lambda d: (_t(37, device=d),)),
    "cat_rotary": (lambda x, c, s: x * c + torch.cat([-x[..., 32:], x[..., :32]], -1) * s,
                   lambda d: (_t(2, 4, 16, 64, device=d), _t(16, 64, device=d), _t(16, 64, device=d))),
    "cat_uneven_last": (lambda a, b: torch.cat([a.exp(), b], -1) * 2,
                        lambda d: (_t(33, 3, device=d), _t(33, 13, device=d))),
    "cat_dim0_int64": (lambda a, b: torch.cat([a * 3, b], 0) - 1,
                       lambda d: (torch.randint(-9, 9, (5, 64), device=d), torch.randint(-9, 9, (3, 64), device=d))),
    "cat_mid_bf16": (lambda a, b, c: torch.cat([a, b * c, c], 1).sigmoid(),
                     lambda d: (_t(4, 2, 64, dtype=BF, device=d), _t(4, 3, 64, dtype=BF, device=d),
                                _t(4, 3, 64, dtype=BF, device=d))),
    "clone_permuted": (lambda x: (x * 2).permute(2, 0, 1).clone(memory_format=torch.contiguous_format),
                       lambda d: (_t(8, 16, 32, device=d),)),
    "split_gate": (lambda x: (lambda a, b: a * torch.sigmoid(b))(*x.split([64, 64], -1)),
                   lambda d: (_t(32, 128, device=d),)),
    "arange_add": (lambda x: x + torch.arange(0, 3 * 256, 3, device=x.device),
                   lambda d: (torch.randint(-9, 9, (8, 256), device=d),)),
    "div_floor": (lambda a, b: 1.0 / torch.div(a, b, rounding_mode="floor"),
                  lambda d: (_t(64, 33, device=d), _pos(64, 33, device=d) - 1.0)),
    "causal_mask_layers": (_causal_layers, lambda d: (_t(2, 3, 64, 64, device=d), _t(64, 64, device=d))),
    "causal_mask_layers_bf16": (_causal_layers, lambda d: (_t(2, 3, 64, 64, dtype=BF, device=d),
                                                            _t(64, 64, dtype=BF, device=d))),
    "embedding_layernorm_bf16": (_embed_ln, lambda d: (
        torch.randint(0, 500, (4, 64), device=d), _t(500, 256, dtype=BF, device=d), _t(64, 256, dtype=BF, device=d),
        _t(256, dtype=BF, device=d), _t(256, dtype=BF, device=d))),
    "gather_index_select": (lambda x, i, j: torch.gather(x, 1, i) + torch.index_select(x, 1, j)[:, :3] * x[j[:3]][:1, :3],
                            lambda d: (_t(64, 40, device=d), torch.randint(0, 40, (64, 3), device=d),
                                       torch.randint(0, 40, (5,), device=d))),
    "take_reduced_mid": (lambda x, i: x[i].amin(1) + x[i].sum(-1, keepdim=True).squeeze(-1)[:, :1],
                         lambda d: (_t(7, 40, device=d), torch.randint(-7, 7, (7, 7), device=d))),
    "packed_mask_index2": (lambda c, x: torch.where(_packed_mask(c), x, -1e4),
                           lambda d: (torch.randint(0, 2, (4, 64), device=d).cumsum(-1), _t(4, 2, 64, 64, device=d))),
    "empty": (lambda x: x * 2, lambda d: (_t(0, 5, device=d),)),
    "zero_length_rows": (lambda x: x.sum(-1), lambda d: (_t(5, 0, device=d),)),
}
ROW_CASES = ["softmax", "softmax_dim0", "softmax_misaligned", "layernorm_gelu_bf16",
             "layernorm_misaligned_bf16", "var_mean", "mean_mid", "causal_mask_layers_bf16",
             "embedding_layernorm_bf16"]
