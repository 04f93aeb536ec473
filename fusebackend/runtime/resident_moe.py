"""The all-resident MoE layer's sync-free paths (runtime/hybrid_moe.py picks one per call, hybrid_plan's
fast_path_mode says which):

  grouped  every expert in one stacked device buffer [E, 3*F*H] (gate, up, down per row, expert_layout's order):
           the routing is sorted by expert on the device, the per-expert end offsets found by searchsorted (no
           bincount: on CUDA it reads its maximum back to the host), and two grouped matmuls
           (torch._grouped_mm) run only the routed experts' rows -- ~10 launches a layer, nothing waits for the
           host, so the host's queue runs ahead of the GPU as it does without offload.
  dense    each resident expert over every row, times its column of the [T, E] combine matrix (0 where not
           routed): for torch builds without grouped matmuls; it pays only where nearly every expert is routed.

Both sum each token's k terms in float32 (index_add_ / addcmul_) and round once, as the sorted path does.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .cpu_worker import expert_ffn, expert_layout
from .hybrid_plan import fast_path_mode


def grouped_mm_fn():
    """torch._grouped_mm, or None where this torch has none."""
    return getattr(torch, "_grouped_mm", None)


def grouped_layout_ok(hidden, ffn, dtype) -> bool:
    """Grouped matmuls want 16-byte aligned row strides and expert strides (CUTLASS on sm_90)."""
    es = torch.empty((), dtype=dtype).element_size()
    return grouped_mm_fn() is not None and (hidden * es) % 16 == 0 and (ffn * es) % 16 == 0


def stacked_views(stack, ffn, hidden):
    """gate_up [E, 2F, H] and down [E, H, F] views of the stacked buffer [E, 3*F*H] (no copies)."""
    E, n = stack.shape[0], ffn * hidden
    return stack[:, :2 * n].view(E, 2 * ffn, hidden), stack[:, 2 * n:].view(E, hidden, ffn)


def grouped_forward(stack, hidden, idx, weights, ffn, acc_dtype, arange):
    """hidden [T, H], idx / weights [T, k] -> [T, H] in hidden's dtype, from the stacked resident experts.
    arange: the layer's cached 0..E-1 on the device (idx's dtype)."""
    E, (T, H), k = stack.shape[0], hidden.shape, idx.shape[-1]
    flat = idx.reshape(-1)
    # padding ids (outside [0, E)) sort last, past every expert's rows: no group computes them, and their
    # output rows (never written by the grouped matmul) are masked out of the sum below
    e_sorted, order = torch.sort(torch.where((flat >= 0) & (flat < E), flat, E), stable=True)
    tok = torch.div(order, k, rounding_mode="floor")
    offs = torch.searchsorted(e_sorted, arange, right=True).to(torch.int32)   # each expert's end row
    gate_up, down = stacked_views(stack, ffn, H)
    gmm = grouped_mm_fn()
    xs = hidden.index_select(0, tok)
    p = gmm(xs, gate_up.transpose(1, 2), offs=offs)              # [T*k, 2F]: gate then up, as expert_ffn
    h = F.silu(p[:, :ffn]) * p[:, ffn:]
    y = gmm(h, down.transpose(1, 2), offs=offs)                  # [T*k, H]
    terms = y.to(acc_dtype) * weights.reshape(-1).index_select(0, order).to(acc_dtype)[:, None]
    terms = torch.where((e_sorted < E)[:, None], terms, 0.0)
    acc = torch.zeros((T, H), dtype=acc_dtype, device=hidden.device).index_add_(0, tok, terms)
    return acc if acc_dtype == hidden.dtype else acc.to(hidden.dtype)


def dense_forward(buffers, hidden, idx, weights, ffn, acc_dtype, arange):
    """buffers {expert: flat buffer}: each expert over every row, weighted by its combine column."""
    cw = ((idx.unsqueeze(-1) == arange) * weights.unsqueeze(-1).to(acc_dtype)).sum(1)   # [T, E]
    acc = None
    for e in sorted(buffers):
        y = expert_ffn(hidden, *expert_layout(buffers[e], ffn, hidden.shape[1]))
        if acc is None:
            acc = y * cw[:, e:e + 1]                     # acc_dtype by promotion
        else:
            acc.addcmul_(y, cw[:, e:e + 1])
    if acc.dtype != acc_dtype:
        acc = acc.to(acc_dtype)
    return acc if acc_dtype == hidden.dtype else acc.to(hidden.dtype)


def try_grouped(stack, hidden, idx, weights, ffn, acc_dtype, arange):
    """grouped_forward, or None (with one warning naming the error) when this build's grouped matmul refuses
    the problem: the caller then falls back to the sorted path for good."""
    try:
        return grouped_forward(stack, hidden, idx, weights, ffn, acc_dtype, arange)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        warnings.warn("fusebackend: grouped matmul over the resident experts failed (%s: %s); this layer uses "
                      "the per-expert path with one routing copy per call" % (type(e).__name__, str(e)[:200]))
        return None


def fast_predicted_s(terms, mode, tokens, k, experts):
    """The cost model's GPU time of an all-resident call (the trace's prediction): dense runs every expert
    over all rows; grouped the routed ones, min(T * k, E) of them expected, over their share of the rows."""
    if mode == "dense":
        return experts * terms.gpu(tokens)
    hit = min(tokens * k, experts)
    return hit * terms.gpu(max(1, -(-tokens * k // hit))) if hit else 0.0


class ResidentPaths:
    """HybridMoELayer's all-resident calls, a mixin: it reads the layer's fast_path, score, gpu, _stack,
    _loading, _arange, num_experts and ffn."""

    def _fast_mode(self, T, k, terms):
        """The all-resident call's path: the forced one where it can run, else fast_path_mode's choice."""
        if self.fast_path == "sorted":
            return "sorted"
        if self.fast_path == "dense":
            return "dense"
        return fast_path_mode(T, k, self.score, sorted(self.gpu), terms and terms.gpu,
                              grouped=self._stack is not None)

    def _fast_call(self, fast, hidden, idx, weights, acc_dtype, main):
        """An all-resident call on a sync-free path (None: none runs it, take the sorted path)."""
        if fast is None:
            return None
        self._wait_loading(main, list(self._loading))
        if self._arange is None or self._arange.device != idx.device or self._arange.dtype != idx.dtype:
            self._arange = torch.arange(self.num_experts, device=idx.device, dtype=idx.dtype)
        if fast == "dense":
            return dense_forward(self.gpu, hidden, idx, weights, self.ffn, acc_dtype, self._arange)
        out = try_grouped(self._stack, hidden, idx, weights, self.ffn, acc_dtype, self._arange)
        if out is None:
            self._stack = None                   # refused once: the per-expert paths from now on
        return out
