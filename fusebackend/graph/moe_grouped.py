"""The moe_experts op's own execution (graph/moe_op.py, no handler bound): one host sync per layer.

The loop of HF Mixtral asks the device for each expert's tokens (a nonzero per expert: a device -> host sync
each, 8 per Mixtral layer). Here the (token, slot) pairs are sorted by expert on the device, and the one
small copy to the host is the per-expert boundaries of that order; then each expert that got tokens runs its
FFN on a contiguous row block of the gathered hidden states, writing its rows of one buffer; one multiply
scales every row by its routing weight in float32 (the input dtype for float64), and one index_add_ puts every
row back on its token:

    order = sort(idx.view(-1), stable);  e_s = idx.view(-1)[order];  tok = order // k
    bounds = searchsorted(e_s, 0..E)                 (on the device; bounds.tolist() is the one sync)
    x_s = hidden[tok];  ys[a:b] = down_e(silu(gate_e x_s[a:b]) * up_e x_s[a:b])   for each expert e, [a, b)
    terms = float32(ys) * float32(weights.view(-1))[order][:, None]
    out = zeros(T, H, float32).index_add_(0, tok, terms), rounded to hidden's dtype once

This is reference_moe's arithmetic term by term (products in the input dtype, each term converted to float32
and multiplied by the float32 routing weight, sums in float32): the stable sort keeps each token's terms in
expert order, so on the CPU the single index_add_ adds them in the order reference_moe's per-expert ones do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def fused_gate_up(gate, up):
    """A [2n, H] view over gate and up when up directly follows gate in memory (HF's gate_up_proj, the hybrid
    layer's staging layout): one matmul instead of two. None otherwise.

    Adjacent addresses are not enough: two allocations can sit back to back (the CUDA caching allocator splits a
    freed block that way, a host malloc may too) while each is its own storage, and a [2n, H] view of gate's
    storage then runs past its end ("setStorage: ... out of bounds"). Both must be views of one storage that
    holds the whole [2n, H] span."""
    if (gate.device != up.device or gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_contiguous()
            or not up.is_contiguous()
            or up.data_ptr() != gate.data_ptr() + gate.numel() * gate.element_size()):
        return None
    st = gate.untyped_storage()
    if st.data_ptr() != up.untyped_storage().data_ptr() or (
            (gate.storage_offset() + 2 * gate.numel()) * gate.element_size() > st.nbytes()):
        return None
    return gate.as_strided((2 * gate.shape[0], gate.shape[1]), (gate.shape[1], 1))


def swiglu(x, gate, up, down, out):
    """out = down(silu(gate x) * up x), gate and up as one product where they are one span of memory."""
    gu = fused_gate_up(gate, up)
    if gu is not None:
        p = F.linear(x, gu)
        n = gate.shape[0]
        h = F.silu(p[:, :n]) * p[:, n:]
    else:
        h = F.silu(F.linear(x, gate)) * F.linear(x, up)
    return torch.mm(h, down.t(), out=out)


def expert_bounds(idx, experts: int):
    """(order, bounds): the flat (token, slot) pairs sorted by expert (stable), and the device tensor of the
    E + 1 positions where each expert's run starts in that order (the last: T * k)."""
    flat = idx.reshape(-1)
    e_sorted, order = torch.sort(flat, stable=True)
    marks = torch.arange(experts + 1, device=flat.device, dtype=e_sorted.dtype)
    return order, torch.searchsorted(e_sorted, marks)


def sorted_moe(hidden, idx, weights, trios):
    """moe_experts' formula over `trios` [(gate, up, down)] with one device -> host copy (module doc)."""
    acc_dtype = torch.float32 if hidden.dtype in HALF else hidden.dtype
    dev, k = hidden.device, idx.shape[-1]
    order, bounds = expert_bounds(idx, len(trios))
    offs = bounds.tolist()                              # the one sync: where each expert's rows are
    lo, hi = offs[0], offs[-1]                          # ids outside 0..E-1 (none from a top-k) add nothing
    tok = torch.div(order[lo:hi], k, rounding_mode="floor")
    x = hidden.index_select(0, tok)
    ys = torch.empty((hi - lo, hidden.shape[1]), dtype=hidden.dtype, device=dev)   # each row one expert's y
    for e, trio in enumerate(trios):
        a, b = offs[e] - lo, offs[e + 1] - lo
        if a == b:
            continue
        g, u, d = trio if trio[0].device == dev else (t.to(dev) for t in trio)
        swiglu(x[a:b], g, u, d, ys[a:b])
    w = weights.reshape(-1).to(acc_dtype).index_select(0, order[lo:hi]).unsqueeze(1)
    terms = torch.mul(ys, w)                            # y converted to float32 times the float32 weight
    acc = torch.zeros(hidden.shape, dtype=acc_dtype, device=dev).index_add_(0, tok, terms)
    return acc if acc_dtype == hidden.dtype else acc.to(hidden.dtype)
