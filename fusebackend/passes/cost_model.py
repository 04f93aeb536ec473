"""Placement cost model: predicted seconds for one MoE expert or one attention call resident on the GPU, streamed
over the link, or run on the CPU; host-DRAM contention; the whole-expert bound of ANCHORS.md.

Pure functions of a HardwareProfile (no measuring). The per-step expert scheduler is in cost_schedule.py, the
whole-step prediction in cost_step.py.

Models (checked against the H200 anchors in tests/test_cost_model.py):
- GPU: roofline, max(bytes / gpu_mem_bw, FLOPs / matrix rate) + one launch per kernel. gpu_mem_bw is the copy rate
  (read + write); a GEMV reads its weight at about that rate.
- Link: bytes / h2d_bw + one launch per copy.
- CPU expert: *additive*, weight bytes / cpu_gemv_bw + FLOPs / cpu_gemm_flops + dispatch + activation copies. At
  few rows the CPU streams a weight panel and then computes on it, so the two do not hide each other: the anchors
  (5.5, 6.9, 9.1, 10.3 ms at 1, 16, 32, 64 tokens) fit a sum within 10%; a max or a p-norm blend (p = 1.5, 2)
  misses by 15-18% at 16-32 tokens.
- CPU attention (a fused decode kernel): reads K/V once, max(kv bytes / cpu_mem_bw, FLOPs / float32 rate).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .hardware_profile import HardwareProfile, dtype_name, dtype_size

ROW_GRAIN = 64          # split experts / contexts move in 1/64 steps (14336 rows -> 224-row slices)
ATTN_GPU_KERNELS = 4    # a decode SDPA call on the GPU: split-KV attention, combine, and the q/out layout kernels


@dataclass(frozen=True)
class ExpertCost:
    weight_bytes: float
    gpu_resident_s: float   # compute with the weights already on the device
    transfer_s: float       # the weights over the link
    gpu_streamed_s: float   # transfer, then compute (nothing overlapped)
    cpu_s: float            # on the CPU, activations copied there and back, dispatch included
    flops: float


@dataclass(frozen=True)
class AttentionCost:
    kv_bytes: float
    gpu_resident_s: float
    transfer_s: float       # K and V over the link
    gpu_streamed_s: float
    cpu_s: float            # fused CPU decode kernel, q copied there and the output (and its LSE) back
    flops: float


def _need(cond, what):
    if not cond:
        raise ValueError("cost model: " + what)


def _count(v, name, minimum):
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, "%s must be an int >= %d, got %r"
          % (name, minimum, v))


def _fraction(v, name):
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
          "%s must be in (0, 1], got %r" % (name, v))


class ExpertTerms:
    """The expert model's coefficients for one shape and dtype, so a per-step scheduler pays a few multiplies per
    (tokens, row fraction) instead of a full expert_cost call. expert_cost is built on it (one model)."""

    def __init__(self, profile: HardwareProfile, hidden: int, ffn: int, dtype, n_mats: int = 3):
        _count(hidden, "hidden", 1)
        _count(ffn, "ffn", 1)
        _count(n_mats, "n_mats", 1)
        es, name = dtype_size(dtype), dtype_name(dtype)
        p = self.profile = profile
        self.weight_bytes = float(n_mats * hidden * ffn * es)         # all rows
        self.flops_per_token = 2.0 * hidden * ffn * n_mats
        n_ops = 2 * n_mats - 1       # the matmuls, plus activation and gating multiply between them
        self.link_per_byte, self.link_fixed = 1.0 / p.h2d_bw, n_mats * p.gpu_launch_s
        self.gpu_per_byte = 1.0 / p.gpu_mem_bw
        self.gpu_per_flop, self.gpu_fixed = 1.0 / p.rate("gpu_matmul_flops", name), n_ops * p.gpu_launch_s
        # CPU: additive (see the module docstring); x to the host and y back, a sync each way
        self.cpu_per_byte = 1.0 / p.rate("cpu_gemv_bw", name)
        self.cpu_per_flop = 1.0 / p.rate("cpu_gemm_flops", name)
        self.cpu_per_token = hidden * es * (1.0 / p.d2h_bw + 1.0 / p.h2d_bw)
        self.cpu_fixed = n_ops * p.cpu_dispatch_s + 2 * p.sync_s

    def transfer(self, f=1.0):
        return f * self.weight_bytes * self.link_per_byte + self.link_fixed

    def gpu(self, tokens, f=1.0):
        if tokens == 0:
            return 0.0
        return max(f * self.weight_bytes * self.gpu_per_byte, f * tokens * self.flops_per_token * self.gpu_per_flop) \
            + self.gpu_fixed

    def cpu(self, tokens, f=1.0):
        if tokens == 0:
            return 0.0
        return (f * (self.weight_bytes * self.cpu_per_byte + tokens * self.flops_per_token * self.cpu_per_flop)
                + tokens * self.cpu_per_token + self.cpu_fixed)


@functools.lru_cache(maxsize=64)
def expert_terms(profile: HardwareProfile, hidden: int, ffn: int, dtype, n_mats: int = 3) -> ExpertTerms:
    """ExpertTerms, cached: a model has a handful of expert shapes and the scheduler asks every step."""
    return ExpertTerms(profile, hidden, ffn, dtype, n_mats)


def expert_cost(profile: HardwareProfile, tokens: int, hidden: int, ffn: int, dtype, n_mats: int = 3,
                row_fraction: float = 1.0) -> ExpertCost:
    """One gated-MLP expert (SwiGLU: gate and up [F, H], down [H, F]) over `tokens` rows. `row_fraction`: only
    that share of the F rows (of gate/up; columns of down) is moved and computed -- one side of a split expert.
    A zero-token expert is not routed: it computes nothing anywhere (its transfer is still what a move costs)."""
    _count(tokens, "tokens", 0)
    _fraction(row_fraction, "row_fraction")
    m, f = expert_terms(profile, hidden, ffn, dtype, n_mats), row_fraction
    gpu, transfer = m.gpu(tokens, f), m.transfer(f)
    return ExpertCost(f * m.weight_bytes, gpu, transfer, transfer + gpu, m.cpu(tokens, f),
                      f * tokens * m.flops_per_token)


def attention_cost(profile: HardwareProfile, batch: int, q_heads: int, kv_heads: int, context: int, head_dim: int,
                   dtype, new_tokens: int = 1, context_fraction: float = 1.0) -> AttentionCost:
    """Attention of `new_tokens` queries per sequence over a K/V cache of `context` positions (GQA when
    kv_heads < q_heads). `context_fraction`: only that share of the positions -- one side of a split context."""
    for v, n in ((batch, "batch"), (q_heads, "q_heads"), (kv_heads, "kv_heads"), (context, "context"),
                 (head_dim, "head_dim"), (new_tokens, "new_tokens")):
        _count(v, n, 1)
    _need(q_heads % kv_heads == 0, "q_heads (%d) must be a multiple of kv_heads (%d)" % (q_heads, kv_heads))
    _fraction(context_fraction, "context_fraction")
    es, name = dtype_size(dtype), dtype_name(dtype)
    ctx = context * context_fraction
    kv_bytes = 2.0 * batch * kv_heads * ctx * head_dim * es
    flops = 4.0 * batch * q_heads * new_tokens * ctx * head_dim          # q.K^T and P.V
    gpu = max(kv_bytes / profile.gpu_mem_bw, flops / profile.rate("gpu_matmul_flops", name)) \
        + ATTN_GPU_KERNELS * profile.gpu_launch_s
    transfer = kv_bytes / profile.h2d_bw + 2 * profile.gpu_launch_s
    q_bytes = batch * q_heads * new_tokens * head_dim * es
    out_bytes = q_bytes + batch * q_heads * new_tokens * 4               # output + float32 LSE for the merge
    cpu = (max(kv_bytes / profile.cpu_mem_bw, flops / profile.rate("cpu_gemm_flops", "float32"))
           + profile.cpu_dispatch_s + q_bytes / profile.d2h_bw + out_bytes / profile.h2d_bw + 2 * profile.sync_s)
    return AttentionCost(kv_bytes, gpu, transfer, transfer + gpu, cpu, flops)


def overlap_time(cpu_bytes: float, cpu_s_alone: float, dma_bytes: float, dma_s_alone: float,
                 profile: HardwareProfile) -> tuple[float, float]:
    """(cpu_s, dma_s) when CPU work reading `cpu_bytes` and a host->device copy of `dma_bytes` start together.

    Fluid model with the link first: each side alone demands bytes / time. While both run and their demands
    add up to more than shared_dram_bw, the DMA engine keeps its own rate (up to shared_dram_bw) and the CPU
    cores get what is left; once the shorter one ends the other is back at its own rate. Why the link first:
    on the H200 machine a CPU expert at 1 token and a streamed expert (cost_model_check.py) go from 6.59 / 6.47
    ms alone to 9.33 / 6.80 ms at once -- the copy barely slows, the cores stall on DRAM. (A model that slows
    both alike predicted 7.98 / 7.86 ms there; this one 8.9 / 6.47.)
    """
    if min(cpu_bytes, cpu_s_alone, dma_bytes, dma_s_alone) <= 0:
        return cpu_s_alone, dma_s_alone
    rc, rd, shared = cpu_bytes / cpu_s_alone, dma_bytes / dma_s_alone, profile.shared_dram_bw
    if rc + rd <= shared:
        return cpu_s_alone, dma_s_alone
    rd_both = min(rd, shared)
    rc_both = min(rc, max(shared - rd_both, 0.0))
    dma_end = dma_bytes / rd_both
    if rc_both * dma_end >= cpu_bytes:              # the CPU ends first, at its contended rate
        cpu_end = cpu_bytes / rc_both
        return cpu_end, cpu_end + (dma_bytes - rd_both * cpu_end) / rd
    return dma_end + (cpu_bytes - rc_both * dma_end) / rc, dma_end


def shared_bw_from_overlap(cpu_bytes: float, cpu_alone: float, cpu_together: float, dma_bytes: float,
                           dma_alone: float, dma_together: float) -> float:
    """The shared_dram_bw that overlap_time's model needs to reproduce a measured pair of runs (its inverse): the
    bytes both sides moved while both ran, over the time both ran (after the first ends the other is taken to
    run at its alone rate). Without measurable slowdown: the sum of the alone rates (no contention)."""
    rc, rd = cpu_bytes / cpu_alone, dma_bytes / dma_alone
    if cpu_together <= cpu_alone * 1.01 and dma_together <= dma_alone * 1.01:
        return rc + rd
    if dma_together <= cpu_together:
        first, first_bytes, rest_bytes, rest_rate, rest_t = dma_together, dma_bytes, cpu_bytes, rc, cpu_together
    else:
        first, first_bytes, rest_bytes, rest_rate, rest_t = cpu_together, cpu_bytes, dma_bytes, rd, dma_together
    during = min(max(rest_bytes - rest_rate * (rest_t - first), 0.0), rest_bytes)
    return max(min((first_bytes + during) / first, rc + rd), 1.0)


def whole_expert_bound(profile: HardwareProfile, experts, hidden: int, ffn: int, dtype, n_mats: int = 3) -> float:
    """ANCHORS.md's "bound, whole experts" for one layer-step: the non-resident experts split between the CPU and
    the link at expert granularity, optimally, both fully overlapped with the GPU and with each other and without
    DRAM contention: min over splits of max(CPU sum, link sum, all-experts-resident GPU time).

    `experts`: (expert_id, tokens, resident) as for schedule_experts. Exact: all experts cost the same on the
    link, so for k streamed experts the best choice is the k most expensive ones on the CPU."""
    gpu_all, cpu, link = 0.0, [], 0.0
    for _, tokens, resident in experts:
        if tokens <= 0:
            continue
        c = expert_cost(profile, tokens, hidden, ffn, dtype, n_mats)
        gpu_all += c.gpu_resident_s
        if not resident:
            cpu.append(c.cpu_s)
            link = c.transfer_s
    cpu.sort(reverse=True)
    rest, best = sum(cpu), float("inf")
    for k in range(len(cpu) + 1):        # stream the k most expensive on the CPU
        best = min(best, max(rest, k * link, gpu_all))
        if k < len(cpu):
            rest -= cpu[k]
    return best
