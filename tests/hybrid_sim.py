"""Helpers of the hybrid MoE layer tests (test_hybrid_moe.py, test_hybrid_prefetch.py): random experts and
routing, eager's result, a forced scheduler, and a stand-in for the CUDA calls (same orchestration code, no
streams)."""
import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fusebackend.runtime import cpu_worker as cw
from fusebackend.runtime import hybrid_moe as hm


def make_experts(E, H, Fn, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(dtype)   # noqa: E731
    return [(mk(Fn, H), mk(Fn, H), mk(H, Fn)) for _ in range(E)]


def make_routing(T, E, k, seed=1, force=()):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    for t, e in enumerate(force):           # token t is routed to expert e first
        logits[t, e] = 100.0
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def eager_moe(x, idx, w, experts):
    """The HF 5.x eager loop (MixtralExperts.forward), in x's dtype."""
    out = torch.zeros_like(x)
    for e, (g, u, d) in enumerate(experts):
        tok, slot = torch.where(idx == e)
        if tok.numel():
            y = F.linear(F.silu(F.linear(x[tok], g)) * F.linear(x[tok], u), d)
            out.index_add_(0, tok, (y * w[tok, slot, None].to(x.dtype)).to(out.dtype))
    return out


def assert_like_eager(out, x, idx, w, experts, factor=2.0):
    eager = eager_moe(x, idx, w, experts)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    if x.dtype == torch.float32:
        scale = eager.abs().max().item()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6 * max(1.0, scale))
        return
    to64 = lambda ws: [tuple(t.double().cpu() for t in e) for e in ws]          # noqa: E731
    ref = eager_moe(x.double().cpu(), idx.cpu(), w.double().cpu(), to64(experts))
    scale = ref.abs().max().item()
    mine = (out.double().cpu() - ref).abs().max().item() / scale
    theirs = (eager.double().cpu() - ref).abs().max().item() / scale
    assert mine <= factor * max(theirs, torch.finfo(x.dtype).eps), (mine, theirs)


class Forced:
    """A fake scheduler: resident experts stay resident; the split expert is split; the others go where told."""

    def __init__(self, default="cpu", cpu=(), streamed=(), split=None):
        self.default, self.cpu, self.streamed, self.split, self.seen = default, set(cpu), set(streamed), split, []
        self.busy = []

    def __call__(self, profile, experts, hidden, ffn, dtype, allow_split=True, link_busy_s=0.0):
        self.seen.append(list(experts))
        self.busy.append(link_busy_s)
        d = SimpleNamespace(cpu=[], streamed=[], resident=[], split=None, predicted_s=1e-3, cpu_s=5e-4,
                            link_s=6e-4, gpu_s=1e-4)
        for e, _, res in experts:
            if self.split and e == self.split[0] and not res:
                d.split = self.split
            else:
                where = "resident" if res else "cpu" if e in self.cpu else "streamed" if e in self.streamed \
                    else self.default
                getattr(d, where).append(e)
        return d


class _Ev:
    def record(self, stream=None): pass
    def synchronize(self): pass
    def query(self): return True
    def elapsed_time(self, other): return 0.0


class _Stream:
    def wait_event(self, ev): pass
    def wait_stream(self, s): pass


class SimApi(cw.CudaApi):
    """CudaApi's calls on the CPU: device buffers start as NaN, so a read of an unfilled slot shows."""
    simulated = True

    def __init__(self):
        self.device, self.copies2d, self.pinned_tensors = torch.device("cpu"), 0, []

    def current_stream(self): return _Stream()
    def new_stream(self): return _Stream()
    def stream(self, s): return contextlib.nullcontext()
    def event(self, timing=False): return _Ev()
    def empty(self, shape, dtype): return torch.full(shape, float("nan"), dtype=dtype)
    def pinned(self, shape, dtype): return torch.empty(shape, dtype=dtype)
    def pin(self, t): self.pinned_tensors.append(t); return t
    def unpin(self, t): self.pinned_tensors[:] = [p for p in self.pinned_tensors if p is not t]   # by identity
    def record_stream(self, t, s): pass
    def can_copy2d(self): return True

    def copy2d(self, dst, src, stream):
        assert src.stride(1) == 1 and src.stride(0) > src.shape[1] and dst.is_contiguous()
        self.copies2d += 1
        dst.copy_(src)


class CountingApi(SimApi):
    """SimApi counting the routing waits (non-timing events synchronized): each is a host round trip."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def event(self, timing=False):
        api = self

        class Ev(_Ev):
            def synchronize(self):          # the routing event (timing events are only read back, done)
                api.syncs += not timing
        return Ev()


def sim_layer(experts, **kw):
    return hm.HybridMoELayer(experts, api=SimApi(), **kw)
