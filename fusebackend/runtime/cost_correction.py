"""Online correction of the cost model from the hybrid MoE layer's own measurements (runtime/hybrid_moe.py)."""
from __future__ import annotations

import math


class CostCorrection:
    """Online correction of the cost model from what the layer measures, per side:
      cpu   the worker's compute wall time of a call vs the schedule's CPU side (contention included)
      link  the copy stream's timing events of the call's own fills vs the schedule's link side
      gpu   the compute stream's events around the resident experts vs the model's time for them
    Each side keeps a factor f (measured / model), an EWMA in log space of the factor each observation implies:
    log f <- (1 - alpha) log f + alpha log(f_used * measured / predicted), f_used the factor the prediction was
    made with (link and GPU observations arrive a call or more late). Bounded: one observation's ratio is
    clipped to [1/clip, clip], f to [lo, hi]; predictions under min_pred_s (launch-dominated) are ignored.
    apply(profile) scales the profile's rates of each side by 1/f (CPU GEMV/GEMM rates and dispatch; h2d_bw; GPU
    bandwidth, matmul rate and launch), so any scheduler that reads the profile -- and the DRAM-contention model
    with it -- sees the measured machine. Factors are quantized (steps of 2**(1/32), ~2%) so the corrected
    profiles, and the cost model's per-profile caches, stay few. Share one object between the layers of a model:
    they run on the same CPU and link."""

    SIDES = ("cpu", "link", "gpu")
    MIN_PRED_S = {"cpu": 2e-4, "link": 2e-4, "gpu": 5e-5}

    def __init__(self, alpha=0.3, lo=0.25, hi=8.0, clip=3.0, min_pred_s=None, step=1.0 / 32):
        if not 0.0 < alpha <= 1.0 or not 0.0 < lo <= 1.0 <= hi or clip < 1.0:
            raise ValueError("CostCorrection: need 0 < alpha <= 1, 0 < lo <= 1 <= hi, clip >= 1")
        self.alpha, self.lo, self.hi, self.clip, self.step = alpha, lo, hi, clip, step
        self.min_pred_s = dict(self.MIN_PRED_S, **(min_pred_s or {}))
        self.factor = dict.fromkeys(self.SIDES, 1.0)
        self.observations = dict.fromkeys(self.SIDES, 0)
        # the CPU side's per-call overhead outside its compute (the worker's wake-up, its wait for the
        # activations' copy and for the previous output's): additive, so no rate factor can learn it
        self.cpu_fixed_s, self.n_fixed = 0.0, 0
        self._profiles = {}

    def observe(self, side, measured_s, predicted_s, used=None):
        """One measurement of `side`; `used`: the factor the prediction was made with (default: the current
        one). Returns whether it counted."""
        if side not in self.factor:
            raise ValueError("CostCorrection: side must be one of %s, got %r" % (self.SIDES, side))
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (measured_s, predicted_s))
        if not ok or measured_s <= 0 or predicted_s < self.min_pred_s[side]:
            return False
        r = min(self.clip, max(1.0 / self.clip, measured_s / predicted_s))
        used = self.factor[side] if used is None else used
        log_f = (1 - self.alpha) * math.log(self.factor[side]) + self.alpha * math.log(used * r)
        self.factor[side] = min(self.hi, max(self.lo, math.exp(log_f)))
        self.observations[side] += 1
        return True

    FIXED_MAX_S = 5e-3

    def observe_fixed(self, overhead_s) -> bool:
        """One call's CPU overhead (s): an EWMA, each observation clipped to [0, FIXED_MAX_S]."""
        if not isinstance(overhead_s, (int, float)) or not math.isfinite(overhead_s):
            return False
        x = min(self.FIXED_MAX_S, max(0.0, overhead_s))
        self.cpu_fixed_s = x if self.n_fixed == 0 else (1 - self.alpha) * self.cpu_fixed_s + self.alpha * x
        self.n_fixed += 1
        return True

    def quantized(self):
        q = lambda f: 2.0 ** (round(math.log2(f) / self.step) * self.step)     # noqa: E731
        return tuple(q(self.factor[s]) for s in self.SIDES)

    def apply(self, profile):
        """The profile with each side's rates divided by its (quantized) factor; the profile itself at 1."""
        fc, fl, fg = key = self.quantized()
        if key == (1.0, 1.0, 1.0) or profile is None:
            return profile
        got = self._profiles.get((id(profile), key))
        if got is not None and got[0] is profile:
            return got[1]
        tab = lambda t, f: {d: v / f for d, v in t.items()}                      # noqa: E731
        out = profile.replace(
            name=profile.name + " (corrected cpu x%.2f link x%.2f gpu x%.2f)" % key,
            cpu_gemv_bw=tab(profile.cpu_gemv_bw, fc), cpu_gemm_flops=tab(profile.cpu_gemm_flops, fc),
            cpu_dispatch_s=profile.cpu_dispatch_s * fc, h2d_bw=profile.h2d_bw / fl,
            gpu_mem_bw=profile.gpu_mem_bw / fg, gpu_matmul_flops=tab(profile.gpu_matmul_flops, fg),
            gpu_launch_s=profile.gpu_launch_s * fg)
        if len(self._profiles) >= 64:
            self._profiles.clear()
        self._profiles[id(profile), key] = (profile, out)
        return out

    def summary(self):
        return {s: round(self.factor[s], 3) for s in self.SIDES} | {
            "n_" + s: self.observations[s] for s in self.SIDES} | {"cpu_fixed_ms": round(1e3 * self.cpu_fixed_s, 3)}
