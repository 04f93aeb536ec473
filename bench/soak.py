"""Soak: one compiled decode step called many times; host (and device) memory must stay flat.

    python3 bench/soak.py --device cuda --steps 100000          # the GPU soak (H200), ~minutes
    python3 bench/soak.py --device cpu --steps 10000            # the CPU soak (tests/test_soak.py runs one too)

The step is a small decoder layer (RMS norm, attention over a static KV cache written in place at the step's
position, a gated MLP), compiled with backend="fuse"; the position cycles through the cache so every call
has the same shapes. Memory is read after a warm-up and at the end: host RSS, and on CUDA the caching
allocator's allocated and reserved bytes. Prints one JSON line; exits 1 when memory grew beyond the tolerance,
the step recompiled, or the result drifted from eager.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

MIB = 1 << 20


class DecodeStep(nn.Module):
    def __init__(self, dim=256, heads=4, ffn=512, cache=512, batch=1):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)
        self.n1, self.n2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.register_buffer("k", torch.zeros(batch, heads, cache, dim // heads))
        self.register_buffer("v", torch.zeros(batch, heads, cache, dim // heads))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w

    def forward(self, x, pos):
        b = x.shape[0]
        q, k, v = self.qkv(self.rms(x, self.n1)).view(b, 1, 3, self.heads, self.hd).unbind(2)
        self.k.index_copy_(2, pos, k.transpose(1, 2))
        self.v.index_copy_(2, pos, v.transpose(1, 2))
        seen = (torch.arange(self.k.shape[2], device=x.device) <= pos)[None, :]
        a = F.scaled_dot_product_attention(q.transpose(1, 2), self.k, self.v, attn_mask=seen)
        x = x + self.o(a.transpose(1, 2).reshape(b, 1, -1))
        h = self.rms(x, self.n2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(device) -> dict:
    gc.collect()
    out = {"rss_mib": rss() / MIB}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["allocated_mib"] = torch.cuda.memory_allocated() / MIB
        out["reserved_mib"] = torch.cuda.memory_reserved() / MIB
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=0, help="stop early after this many seconds (0: no limit)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cudagraphs", action="store_true")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--host-tolerance-mib", type=float, default=16.0)
    ap.add_argument("--device-tolerance-mib", type=float, default=1.0)
    a = ap.parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    model = DecodeStep().to(device, dtype).eval()
    ref = DecodeStep().to(device, dtype).eval()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="fuse", options={"cudagraphs": a.cudagraphs})
    cache = model.k.shape[2]
    xs = [torch.randn(1, 1, model.k.shape[1] * model.hd, device=device, dtype=dtype) for _ in range(4)]
    poss = [torch.tensor([p], device=device) for p in range(cache)]
    torch._dynamo.utils.counters.clear()

    def drift() -> float:
        x, pos = xs[0], poss[7]
        with torch.no_grad():
            got, want = compiled(x, pos).float(), ref(x, pos).float()
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()

    with torch.no_grad():
        for i in range(a.warmup):
            compiled(xs[i % 4], poss[i % cache])
            ref(xs[i % 4], poss[i % cache])
        err0 = drift()
        before, t0, done = memory(device), time.time(), 0
        for i in range(a.steps):
            compiled(xs[i % 4], poss[i % cache])
            done += 1
            if a.seconds and i % 1000 == 0 and time.time() - t0 > a.seconds:
                break
        after = memory(device)
        elapsed = time.time() - t0
    err1 = drift()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    growth = {k: after[k] - before[k] for k in before}
    ok = (growth["rss_mib"] <= a.host_tolerance_mib and err0 <= tol and err1 <= tol and graphs <= 1
          and all(growth[k] <= a.device_tolerance_mib for k in growth if k != "rss_mib"))
    print(json.dumps({"device": str(device), "dtype": a.dtype, "cudagraphs": a.cudagraphs, "steps": done,
                      "us_per_step": 1e6 * elapsed / max(1, done), "before": before, "after": after,
                      "growth_mib": growth, "graphs": graphs, "rel_err_first": err0, "rel_err_last": err1,
                      "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
