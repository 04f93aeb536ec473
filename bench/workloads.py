"""The benchmark workloads of shared/ANCHORS.md (same names, definitions, sizes and byte counts).

Each workload is a tuple ``(name, fn, make_args, bytes_moved)``:
  fn          a function or an ``nn.Module`` (already on its device, eval mode),
  make_args   ``make_args(device, generator) -> tuple`` of random (randn) input tensors,
  bytes_moved the bytes that must cross memory at least once per call (for the floor), or None.

``gpu_workloads(device)`` gives the seven GPU anchors, ``cpu_workloads()`` the five scaled-down CPU ones.
"""
import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
F32 = torch.float32


# ---------------------------------------------------------------- the computations
def pointwise_chain(x, y):
    """gelu(x*1.5 + y) * sigmoid(x) - tanh(y)*0.5"""
    a = F.gelu(x * 1.5 + y)
    return a * torch.sigmoid(x) - 0.5 * torch.tanh(y)


def masked_softmax(x, mask):
    """softmax(x*0.125 + mask) over the last dimension"""
    return torch.softmax(x * 0.125 + mask, dim=-1)


def add_layernorm_gelu(x, r, w, b):
    """gelu(layer_norm(x + r)) with affine weight and bias over the last dimension"""
    h = x + r
    return F.gelu(F.layer_norm(h, (h.shape[-1],), w, b))


def rmsnorm(x, w):
    """RMS norm in float32, cast back to the input dtype, then scaled by w"""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    return (xf * inv).to(x.dtype) * w


def horizontal(*xs):
    """100 independent small pointwise problems, one output each"""
    return [torch.relu(x * 2.0 + 1.0) for x in xs]


class DecodeMLPBlock(torch.nn.Module):
    """Llama-style RMSNorm + SwiGLU MLP + residual, applied 4 times with the same weights (batch 1)."""

    def __init__(self, hidden=2048, ffn=5632, repeats=4):
        super().__init__()
        self.repeats = repeats
        self.w_norm = torch.nn.Parameter(torch.ones(hidden))
        self.gate = torch.nn.Linear(hidden, ffn, bias=False)
        self.up = torch.nn.Linear(hidden, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        for _ in range(self.repeats):
            n = rmsnorm(x, self.w_norm)
            x = x + self.down(F.silu(self.gate(n)) * self.up(n))
        return x


class MoETop2(torch.nn.Module):
    """Mixtral-style sparse MoE layer: router, top-k of E experts, a Python loop over all experts."""

    def __init__(self, hidden=1024, ffn=3584, experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        lin = lambda i, o: torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for _ in range(experts))
        self.w1, self.w3, self.w2 = lin(hidden, ffn), lin(hidden, ffn), lin(ffn, hidden)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float)
        topw, topi = torch.topk(probs, self.top_k, dim=-1)
        topw = (topw / topw.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(len(self.w1)):
            gate = (topw * (topi == e)).sum(dim=-1, keepdim=True)
            y = self.w2[e](F.silu(self.w1[e](x)) * self.w3[e](x))
            out = out + y * gate
        return out


# ---------------------------------------------------------------- inputs
def _randn(device, g, *shape, dtype=F32):
    return torch.randn(*shape, device=device, dtype=dtype, generator=g)


def _args_pointwise(n):
    return lambda d, g: (_randn(d, g, n), _randn(d, g, n))


def _args_softmax(rows, cols):
    return lambda d, g: (_randn(d, g, rows, cols), _randn(d, g, rows, cols))


def _args_add_ln(rows, cols, dtype):
    return lambda d, g: (_randn(d, g, rows, cols, dtype=dtype), _randn(d, g, rows, cols, dtype=dtype),
                         _randn(d, g, cols, dtype=dtype), _randn(d, g, cols, dtype=dtype))


def _args_rmsnorm(rows, cols):
    return lambda d, g: (_randn(d, g, rows, cols, dtype=BF16), _randn(d, g, cols, dtype=BF16))


HORIZONTAL_SHAPES = [(64 + 32 * (i % 8), 256) for i in range(100)]
HORIZONTAL_NUMEL = sum(r * c for r, c in HORIZONTAL_SHAPES)


def _args_horizontal(d, g):
    return tuple(_randn(d, g, *s) for s in HORIZONTAL_SHAPES)


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _module(cls, device):
    torch.manual_seed(0)  # deterministic weights (nn.Linear's default init draws from the global RNG)
    return cls().to(device=device, dtype=BF16).eval()


# ---------------------------------------------------------------- the two suites
def gpu_workloads(device="cuda", only=None):
    """The seven GPU anchors; modules are built on `device` only when selected by `only`."""
    n, rows, h = 1 << 26, 16384, 4096
    out = [
        ("pointwise_chain_f32_64M", pointwise_chain, _args_pointwise(n), 3 * n * 4),
        ("masked_softmax_f32_16kx4k", masked_softmax, _args_softmax(rows, h), 3 * rows * h * 4),
        ("add_layernorm_gelu_bf16_16kx4k", add_layernorm_gelu, _args_add_ln(rows, h, BF16), 3 * rows * h * 2),
        ("rmsnorm_bf16_16kx4k", rmsnorm, _args_rmsnorm(rows, h), 2 * rows * h * 2),
        ("horizontal_100_small", horizontal, _args_horizontal, 2 * HORIZONTAL_NUMEL * 4),
    ]
    if not only or only in "decode_mlp_block_x4_bs1_bf16":
        blk = _module(DecodeMLPBlock, device)
        out.append(("decode_mlp_block_x4_bs1_bf16", blk,
                    lambda d, g: (_randn(d, g, 1, 2048, dtype=BF16),), 4 * _n_params(blk) * 2))
    if not only or only in "moe_top2of8_16tok_bf16":
        moe = _module(MoETop2, device)
        out.append(("moe_top2of8_16tok_bf16", moe,
                    lambda d, g: (_randn(d, g, 16, 1024, dtype=BF16),), _n_params(moe) * 2))
    return [w for w in out if not only or only in w[0]]


def cpu_workloads(only=None):
    """The five scaled-down CPU anchors (floor not given for horizontal_100_small, as in ANCHORS.md)."""
    n, rows, h = 1 << 22, 1024, 4096
    out = [
        ("pointwise_chain_f32_4M", pointwise_chain, _args_pointwise(n), 3 * n * 4),
        ("masked_softmax_f32_1kx4k", masked_softmax, _args_softmax(rows, h), 3 * rows * h * 4),
        ("add_layernorm_gelu_f32_1kx4k", add_layernorm_gelu, _args_add_ln(rows, h, F32), 3 * rows * h * 4),
        ("rmsnorm_bf16_1kx4k", rmsnorm, _args_rmsnorm(rows, h), 2 * rows * h * 2),
        ("horizontal_100_small", horizontal, _args_horizontal, None),
    ]
    return [w for w in out if not only or only in w[0]]
