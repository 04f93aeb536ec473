"""GPT-2's LM head (x[8192, 768] @ W[50257, 768].t(), bf16) in the layouts cuBLAS can be handed, to choose
how decomp_pad_mm pads: N = 50257 leaves the output's row pitch off 16 bytes.

    python3 bench/lm_head_layouts.py [--m 8192]

Prints ms per call of each variant (CUDA events via bench/timing.wall_ms), whether its output is
contiguous, and the strides of Inductor's compiled output, all from one run on one card.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from timing import wall_ms  # noqa: E402
import fusebackend  # noqa: E402,F401  (registers backend="fuse")


def _pad_w(w, pn):
    return F.pad(w, (0, 0, 0, pn))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192)
    opts = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(opts.m, 768, device="cuda", generator=g).bfloat16()
    w = (torch.randn(50257, 768, device="cuda", generator=g) * 0.05).bfloat16()
    n, pn = w.shape[0], -w.shape[0] % 8
    ref = x @ w.t()
    variants = {
        "x @ W.t() (eager)": lambda: x @ w.t(),
        "x @ W.t().contiguous()": lambda: x @ w.t().contiguous(),
        "(W @ x.t()).t()": lambda: (w @ x.t()).t(),
        "pad W, mm, slice (strided out)": lambda: (x @ _pad_w(w, pn).t())[:, :n],
        "pad W, mm, slice, contiguous": lambda: (x @ _pad_w(w, pn).t())[:, :n].contiguous(),
        "pad W only": lambda: _pad_w(w, pn),
        "contiguous copy of the logits": lambda: ref[:, :n - 1].contiguous(),
    }
    print("%-36s %9s  %s" % ("variant", "ms", "contiguous / max err"))
    for name, fn in variants.items():
        out = fn()
        ms = wall_ms(fn, torch.cuda.synchronize)
        err = (out.float() - ref.float()).abs().max().item() if out.shape == ref.shape else float("nan")
        print("%-36s %9.4f  %s / %.3g" % (name, ms, out.is_contiguous(), err))
    lin = lambda x, w: F.linear(x, w)
    for backend in ("inductor", "fuse"):
        torch._dynamo.reset()
        try:
            c = torch.compile(lin, backend=backend)
            out = c(x, w)
            ms = wall_ms(lambda: c(x, w), torch.cuda.synchronize)
            print("%-36s %9.4f  strides %s, max err %.3g" % ("compiled " + backend, ms, out.stride(),
                                                             (out.float() - ref.float()).abs().max().item()))
        except Exception as e:  # report and go on
            print("compiled %s failed: %s" % (backend, e))


if __name__ == "__main__":
    main()
