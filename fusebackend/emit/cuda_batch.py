"""The batch entries of CUDA kernels: many problems (operands and sizes of their own) in one launch.

A kernel's own batch entry runs its body for every problem; a divergent kernel holds the bodies of several
kernels (chains) and switches on each problem's chain id. Both take `fb::BArgs<NP, K>` (fb_cuda.h) by value
and find their problem from the block index the same way:

* argument mode (the entry as compiled with -DFB_BATCH): up to K problems; pointers by value in `p` (NP a
  problem), the problems' first blocks in `start`;
* table mode (entry `<name>_t`, compiled beside the other with -DFB_TABLE): any number of problems; the
  pointer table and the block starts live in device memory, their addresses in `p[0]` and `p[1]` of a small
  `fb::BArgs<2, 1>` (runtime/cuda_batch.py uploads the pointers only when they change).

Sizes and strides (and, divergent, the chain id first) are a row per problem of the device-side meta table.
A body is the kernel's own with four substitutions: its pointers come from its problem's slice of the
pointer table, its sizes and strides from its row, the block index and grid size from its own range of
blocks. The source holds both entries of a kernel; `-DFB_BATCH` compiles the batch entry alone, so a kernel
that never runs in a batch costs nothing.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

ARGS_LOOKUP = """const int fb_b = (int)blockIdx.x;
int fb_prob = 0;
for (int fb_hi = A.nprob; fb_hi - fb_prob > 1;) {
  const int fb_mid = (fb_prob + fb_hi) >> 1;
  if (A.start[fb_mid] <= fb_b) fb_prob = fb_mid; else fb_hi = fb_mid;
}
const int64_t fb_bid = fb_b - A.start[fb_prob], fb_nblk = A.start[fb_prob + 1] - A.start[fb_prob];
#define FB_PTR(i) A.p[fb_q + (i)]"""

TABLE_LOOKUP = """const int fb_b = (int)blockIdx.x;
void* const* __restrict__ fb_pt = (void* const*)A.p[0];
const int64_t* __restrict__ fb_st = (const int64_t*)A.p[1];
int fb_prob = 0;
for (int fb_hi = A.nprob; fb_hi - fb_prob > 1;) {
  const int fb_mid = (fb_prob + fb_hi) >> 1;
  if (fb_st[fb_mid] <= fb_b) fb_prob = fb_mid; else fb_hi = fb_mid;
}
const int64_t fb_s0 = fb_st[fb_prob];
const int64_t fb_bid = fb_b - fb_s0, fb_nblk = fb_st[fb_prob + 1] - fb_s0;
#define FB_PTR(i) fb_pt[fb_q + (i)]"""

COMMON = """const int fb_q = fb_prob * %(np)d;
const int64_t* __restrict__ fb_M = A.meta + (int64_t)fb_prob * %(row)d + %(skip)d;"""

BODY, END = "// fb:body", "// fb:end"
_SUBS = [(re.compile(r"\bA\.p\[(\d+)\]"), r"FB_PTR(\1)"), (re.compile(r"\bA\.m\["), "fb_M["),
         (re.compile(r"\bblockIdx\.x\b"), "fb_bid"), (re.compile(r"\bgridDim\.x\b"), "fb_nblk")]
TABLE_ARGS = (2, 1)       # fb::BArgs<2, 1>: the table entry's arguments (two table addresses, meta, count)


def max_problems(np_: int, param_bytes: int) -> int:
    """Problems per launch in argument mode: as many as fit the parameter limit (pointers, then the int32
    block starts); at least 2 pointer slots, which table mode reuses for the tables' addresses."""
    k = max(0, (param_bytes - 16 - 4) // (8 * np_ + 4))
    return k if k * np_ >= 2 else 0


def _substitute(body: list) -> list:
    out = []
    for line in body:
        for pat, rep in _SUBS:
            line = pat.sub(rep, line)
        out.append(line)
    return out


def _entry(name: str, bound: int, np_: int, k: int, lines: list, row: int, skip: int) -> str:
    """The argument-mode entry `name` and, where FB_TABLE is defined, the table-mode entry `name`_t beside it
    (one compile gives both: a table-mode batch launches in argument mode while a CUDA graph is captured)."""
    common = (COMMON % {"np": np_, "row": row, "skip": skip}).split("\n")
    out = []
    for suffix, args, head in (("_t", TABLE_ARGS, TABLE_LOOKUP), ("", (np_, k), ARGS_LOOKUP)):
        text = ('extern "C" __global__ void __launch_bounds__(%d) %s%s(const fb::BArgs<%d, %d> A) {\n'
                % ((bound, name, suffix) + tuple(args))
                + "\n".join("  " + l for l in head.split("\n") + common + lines) + "\n#undef FB_PTR\n}\n")
        out.append("#ifdef FB_TABLE\n" + text + "#endif\n" if suffix else text)
    return "".join(out)


def batch_kernel(name: str, body: list, np_: int, nm: int, bound: int, k: int) -> str:
    """The kernel's own batch entry, `<name>_batch`: its body (between markers a divergent kernel finds)."""
    return _entry(name + "_batch", bound, np_, k, [BODY] + _substitute(body) + [END], nm, 0)


def chain_body(source: str) -> list:
    """The substituted body of a kernel's batch entry, read back from its source."""
    lines = source.split("\n")
    try:
        a = next(i for i, l in enumerate(lines) if l.strip() == BODY)
        b = next(i for i in range(a + 1, len(lines)) if lines[i].strip() == END)
    except StopIteration:
        raise ValueError("the kernel source has no batch entry body") from None
    return [l[2:] if l.startswith("  ") else l for l in lines[a + 1:b]]


def launch_class(spec) -> tuple:
    """Kernels of one class can share a divergent kernel: one launch shape and one launch bound, so one block
    size serves every problem (the largest any asks for) and the bodies agree on what a block is."""
    return (spec.launch.get("shape"), spec.launch.get("bound"))


@dataclass
class DivergentSource:
    name: str
    source: str
    nptr: int       # pointer slots per problem (the most any chain takes)
    nrow: int       # int64 per meta-table row: the chain id, then the most meta values any chain takes
    k: int          # problems per launch in argument mode
    bound: int
    chains: int


def divergent_kernel(specs: list, param_bytes: int) -> DivergentSource:
    """One kernel running specs[c]'s body for the problems of chain c (specs: KernelSources of one
    launch_class, each with a batch entry)."""
    if len({launch_class(s) for s in specs}) != 1:
        raise ValueError("the chains of a divergent kernel must share a launch shape and bound")
    np_ = max(s.num_operands for s in specs)
    row = 1 + max(s.num_meta for s in specs)
    k = max_problems(np_, param_bytes)
    if not k:
        raise ValueError("%d operands exceed the kernel parameter limit" % np_)
    bound = int(specs[0].launch["bound"])
    # an if-chain, not a switch: nvcc lowers a switch to an indirect branch and spills around it
    lines = ["const int fb_chain = (int)fb_M[-1];"]
    for c, s in enumerate(specs):
        lines += ["%sif (fb_chain == %d) {" % ("} else " if c else "", c)] + ["  " + l for l in chain_body(s.source)]
    lines.append("}")
    digest = hashlib.sha256(_entry("fb_cu_div", bound, np_, k, lines, row, 1).encode()).hexdigest()[:12]
    name = "fb_cu_div_%s" % digest
    source = '#include "fb_cuda.h"\n' + _entry(name, bound, np_, k, lines, row, 1)
    return DivergentSource(name, source, np_, row, k, bound, len(specs))
