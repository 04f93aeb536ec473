"""The batch entry of a CUDA kernel: many problems (operands and sizes of their own) in one launch.

The entry's body is the kernel's own body with three substitutions: the problem's pointers come from its slice
of the by-value pointer array, its sizes and strides from its row of a device-side meta table, and the block
index and grid size from the problem's own range of blocks (`fb::BArgs`, fb_cuda.h). The source holds both
entries; `-DFB_BATCH` compiles the batch entry alone, so a kernel that never runs in a batch costs nothing.
"""
from __future__ import annotations

import re

LOOKUP = """const int fb_b = (int)blockIdx.x;
int fb_prob = 0;
for (int fb_hi = A.nprob; fb_hi - fb_prob > 1;) {
  const int fb_mid = (fb_prob + fb_hi) >> 1;
  if (A.start[fb_mid] <= fb_b) fb_prob = fb_mid; else fb_hi = fb_mid;
}
const int64_t fb_bid = fb_b - A.start[fb_prob], fb_nblk = A.start[fb_prob + 1] - A.start[fb_prob];
const int fb_q = fb_prob * %(np)d;
const int64_t* __restrict__ fb_M = A.meta + (int64_t)fb_prob * %(nm)d;"""

_SUBS = [(re.compile(r"\bA\.p\[(\d+)\]"), r"A.p[fb_q + \1]"), (re.compile(r"\bA\.m\["), "fb_M["),
         (re.compile(r"\bblockIdx\.x\b"), "fb_bid"), (re.compile(r"\bgridDim\.x\b"), "fb_nblk")]


def max_problems(np_: int, param_bytes: int) -> int:
    """Problems per launch: as many as fit the parameter limit (pointers, then the int32 block starts)."""
    return max(0, (param_bytes - 16 - 4) // (8 * np_ + 4))


def batch_kernel(name: str, body: list, np_: int, nm: int, bound: int, k: int) -> str:
    lines = (LOOKUP % {"np": np_, "nm": nm}).split("\n")
    for line in body:
        for pat, rep in _SUBS:
            line = pat.sub(rep, line)
        lines.append(line)
    return ('extern "C" __global__ void __launch_bounds__(%d) %s_batch(const fb::BArgs<%d, %d> A) {\n'
            % (bound, name, np_, k) + "\n".join("  " + l for l in lines) + "\n}\n")
