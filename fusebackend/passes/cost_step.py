"""Whole-step prediction: the time of one forward step from every placed subgraph's decision and cost.

The model, kept simple on purpose:
- A step is a sequence of phases (layer 0 attention, layer 0 MoE, layer 1 attention, ...); a phase starts when
  the previous one ends (its inputs are that phase's outputs) and ends when all of its parts have.
- Three timelines run in parallel inside a phase: the GPU compute stream, one CPU worker (every CPU thread), and
  the copy stream (host -> device). CPU work overlaps GPU work and transfers; CPU work and transfers of the same
  phase share host DRAM (cost_model.overlap_time).
- A streamed subgraph's GPU compute waits for its transfer; the GPU runs resident work first, so the phase's GPU
  side ends at max(all its GPU compute, transfers done + the smallest streamed compute).
- The copy stream is one queue: a phase's own transfers first, then the prefetches of the next phase. A
  decision marked `prefetch` has its transfer issued when the previous phase starts (e.g. the next layer's likely
  experts while this layer's attention runs), so only what does not fit in the previous phase is waited for.
- A phase with CPU work pays one sync to hand its results back.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost_model import AttentionCost, ExpertCost, overlap_time
from .hardware_profile import HardwareProfile

PLACES = ("gpu", "cpu", "stream", "split")


@dataclass(frozen=True)
class Decision:
    """One placed subgraph. `where`: gpu (resident), cpu, stream (weights/KV over the link, computed on the GPU),
    split (part on the CPU, part streamed). Times are alone-times; bytes are host-DRAM bytes of each part."""
    name: str
    phase: int
    where: str
    gpu_s: float = 0.0
    cpu_s: float = 0.0
    link_s: float = 0.0
    cpu_bytes: float = 0.0
    link_bytes: float = 0.0
    prefetch: bool = False

    def __post_init__(self):
        if self.where not in PLACES:
            raise ValueError("decision %r: where must be one of %s, got %r" % (self.name, PLACES, self.where))
        for f in ("gpu_s", "cpu_s", "link_s", "cpu_bytes", "link_bytes"):
            if not getattr(self, f) >= 0:
                raise ValueError("decision %r: %s must be >= 0, got %r" % (self.name, f, getattr(self, f)))
        if self.where == "gpu" and (self.cpu_s or self.link_s):
            raise ValueError("decision %r: a resident subgraph has no CPU or link time" % self.name)
        if self.where == "cpu" and (self.gpu_s or self.link_s):
            raise ValueError("decision %r: a CPU subgraph has no GPU or link time" % self.name)
        if self.where == "stream" and self.cpu_s:
            raise ValueError("decision %r: a streamed subgraph has no CPU time" % self.name)
        if self.prefetch and self.where not in ("stream", "split"):
            raise ValueError("decision %r: only a transfer can be prefetched" % self.name)

    @classmethod
    def of(cls, name: str, phase: int, where: str, cost, cpu_part=None, prefetch: bool = False) -> "Decision":
        """From an ExpertCost / AttentionCost. For `split`, `cost` is the streamed part and `cpu_part` the CPU
        part (each computed with its row or context fraction)."""
        nbytes = cost.weight_bytes if isinstance(cost, ExpertCost) else cost.kv_bytes
        if where == "gpu":
            return cls(name, phase, where, gpu_s=cost.gpu_resident_s)
        if where == "cpu":
            return cls(name, phase, where, cpu_s=cost.cpu_s, cpu_bytes=nbytes)
        if where == "stream":
            return cls(name, phase, where, gpu_s=cost.gpu_resident_s, link_s=cost.transfer_s, link_bytes=nbytes,
                       prefetch=prefetch)
        if where == "split":
            if not isinstance(cpu_part, (ExpertCost, AttentionCost)):
                raise ValueError("decision %r: a split needs the cost of its CPU part" % name)
            cb = cpu_part.weight_bytes if isinstance(cpu_part, ExpertCost) else cpu_part.kv_bytes
            return cls(name, phase, where, gpu_s=cost.gpu_resident_s, cpu_s=cpu_part.cpu_s,
                       link_s=cost.transfer_s, cpu_bytes=cb, link_bytes=nbytes, prefetch=prefetch)
        raise ValueError("decision %r: where must be one of %s, got %r" % (name, PLACES, where))


@dataclass(frozen=True)
class PhaseTime:
    phase: int
    start_s: float
    end_s: float
    cpu_s: float          # CPU worker busy, contention included
    link_s: float         # copy stream busy in this phase (own transfers and the next phase's prefetches)
    gpu_s: float          # GPU compute


@dataclass(frozen=True)
class StepPrediction:
    total_s: float
    phases: tuple


def predict_step(profile: HardwareProfile, decisions) -> StepPrediction:
    """Predicted seconds for one step made of `decisions` (see the module docstring for what overlaps)."""
    by_phase = {}
    for d in decisions:
        by_phase.setdefault(d.phase, []).append(d)
    phases = sorted(by_phase)
    t, link_free, out = 0.0, 0.0, []
    for n, ph in enumerate(phases):
        ds, start = by_phase[ph], t
        first = n == 0          # nothing runs before the first phase: its prefetches are ordinary transfers
        own = [d for d in ds if d.link_s and (first or not d.prefetch)]
        nxt = [d for d in by_phase[phases[n + 1]] if d.prefetch] if n + 1 < len(phases) else []
        own_s, nxt_s = sum(d.link_s for d in own), sum(d.link_s for d in nxt)
        link_bytes = sum(d.link_bytes for d in own) + sum(d.link_bytes for d in nxt)
        cpu_alone = sum(d.cpu_s for d in ds)
        cpu_s, link_s = overlap_time(sum(d.cpu_bytes for d in ds), cpu_alone, link_bytes, own_s + nxt_s, profile)
        stretch = link_s / (own_s + nxt_s) if own_s + nxt_s > 0 else 1.0
        link_start = max(start, link_free)
        # one FIFO queue: this phase's prefetches (issued last phase) are ahead of its own transfers, so when
        # its own transfers are done all of its weights are on the device
        own_end = link_start + own_s * stretch
        link_free = own_end + nxt_s * stretch
        streamed = [d.gpu_s for d in ds if d.where in ("stream", "split")]
        gpu = sum(d.gpu_s for d in ds)
        gpu_end = start + gpu
        if streamed:
            gpu_end = max(gpu_end, own_end + min(streamed))
        cpu_end = start + cpu_s + (profile.sync_s if cpu_alone > 0 else 0.0)
        t = max(start, gpu_end, cpu_end)
        out.append(PhaseTime(ph, start, t, cpu_s, link_free - link_start, gpu))
    return StepPrediction(t, tuple(out))
