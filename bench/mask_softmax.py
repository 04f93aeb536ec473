"""BERT's attention softmax at bench size (8 x 12 x 512 x 512, fp32) with HF's mask built from aranges:
the mask recomputed inside the softmax kernel (passes/remat.py) against the mask written once and read
back, and Inductor -- one run, one card.

    python3 bench/mask_softmax.py

Prints ms per call (bench/timing.wall_ms), kernel count, and the softmax kernel's launch shape and registers.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from timing import wall_ms  # noqa: E402
import fusebackend  # noqa: E402
from fusebackend.capture import backend  # noqa: E402

B, H, S = 8, 12, 512


def layers(scores, n=2):
    """n softmax layers reading one padding/bidirectional mask built from indices, as HF's sdpa_mask."""
    kv = torch.arange(S, device=scores.device)
    keep = (kv[None, None, None, :] >= 0).expand(B, 1, S, S)
    out = []
    for i in range(n):
        m = torch.where(keep, torch.zeros((), device=scores.device), torch.tensor(float("-inf"), device=scores.device))
        out.append(torch.softmax(scores[i] + m, -1))
    return out


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(2, B, H, S, S, device="cuda", generator=g)
    ref = layers(scores)
    rows = []
    for label, remat in (("fuse, mask recomputed", True), ("fuse, mask written once", False)):
        torch._dynamo.reset()
        fusebackend.reset()
        orig = backend.rematerialize
        if not remat:
            backend.rematerialize = lambda fg, *a, **k: fg
        try:
            rep = fusebackend.explain(layers, scores)
            torch._dynamo.reset()
            c = torch.compile(layers, backend="fuse")
            out = c(scores)
            ms = wall_ms(lambda: c(scores), torch.cuda.synchronize)
            err = max((o - r).abs().max().item() for o, r in zip(out, ref))
            shapes = [gr.program for gr in rep.graph_reports]
            desc = [s.launch.describe() for p in shapes for s in p.steps
                    if hasattr(getattr(s, "launch", None), "describe")]
        finally:
            backend.rematerialize = orig
        rows.append((label, ms, rep.num_kernels, err, desc))
    torch._dynamo.reset()
    c = torch.compile(layers)
    c(scores)
    rows.append(("inductor", wall_ms(lambda: c(scores), torch.cuda.synchronize), None, 0.0, []))
    for label, ms, nk, err, desc in rows:
        print("%-26s %8.4f ms  kernels %s  err %.2g" % (label, ms, nk, err))
        for d in desc:
            print("      %s grid %s block %s smem %s regs %s hints %s" % (d.get("name"), d.get("grid"), d.get("block"),
                                                                       d.get("smem"), d.get("regs"), d.get("hints")))


if __name__ == "__main__":
    main()
