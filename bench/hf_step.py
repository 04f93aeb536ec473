"""A training step (forward, a loss, backward) of the zoo's tiny HF models: eager vs Inductor vs fuse, ms per step.

    python3 bench/hf_step.py [--models hf_llama hf_gpt2 ...] [--rounds N] [--device cpu|cuda]

Each step runs the model (in eval mode: dropout off, gradients still computed) on fixed inputs, sums its output into a scalar loss and calls backward; gradients are
zeroed by setting them to None before each step (as `zero_grad()` does by default). Before timing, every
parameter's gradient from one compiled step is compared with eager's (max relative error over parameters).
Times: the median of interleaved reps (bench/timing.py), the minimum over --rounds. transformers must be
importable (it is not a dependency of fusebackend).
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusebackend  # noqa: E402,F401
import models  # noqa: E402
from timing import syncer, wall_ms_interleaved  # noqa: E402


def step_fn(model, inputs):
    def step():
        for p in model.parameters():
            p.grad = None
        out = model(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    return step


def grad_err(model, ref_model, inputs) -> float:
    """Max over parameters of ||g - g_eager|| / ||g_eager|| after one step of each (ref_model: a copy with
    its own parameters, run eagerly)."""
    step_fn(model, inputs)()
    step_fn(ref_model, inputs)()
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref_model.parameters()) if q.grad is not None]
    top = max((q.norm().item() for _, q in pairs), default=0.0)
    # a gradient that is zero in exact arithmetic (BERT's key bias: softmax ignores a per-row constant) is
    # rounding noise in eager and in any compiled step alike: compared to the largest gradient's scale
    return max(((g - q).norm() / max(q.norm().item(), 1e-6 * top)).item() for g, q in pairs) if pairs else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["hf_gpt2", "hf_llama", "hf_mixtral", "hf_bert"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    sync = syncer(a.device)
    print("%-12s %9s %9s %9s %9s %10s %10s" % ("model", "eager ms", "ind ms", "fuse ms", "fuse/ind", "ind err",
                                             "fuse err"))
    for name in a.models:
        entry = models.get(name)
        model, inputs = entry.make(size="small", seed=0)
        model = model.to(a.device).eval()       # dropout off, so the gradients can be compared with eager's
        inputs = tuple(x.to(a.device) if torch.is_tensor(x) else x for x in inputs)
        torch._dynamo.reset()
        compiled = {"eager": model, "ind": torch.compile(model), "fuse": torch.compile(model, backend="fuse")}
        ref = copy.deepcopy(model)             # its own parameters: eager's gradients to compare against
        errs = {k: grad_err(m, ref, inputs) for k, m in compiled.items() if k != "eager"}
        best = {}
        for _ in range(a.rounds):
            ms, failed = wall_ms_interleaved({k: step_fn(m, inputs) for k, m in compiled.items()}, sync, max_s=20)
            for k, v in ms.items():
                best[k] = min(best.get(k, v), v)
            for k, e in failed.items():
                print("  %s failed: %s" % (k, str(e)[:200]))
        ratio = best["fuse"] / best["ind"] if "fuse" in best and "ind" in best else float("nan")
        print("%-12s %9.3f %9.3f %9.3f %9.2f %10.1e %10.1e" % (name, best.get("eager", float("nan")),
              best.get("ind", float("nan")), best.get("fuse", float("nan")), ratio, errs["ind"], errs["fuse"]),
              flush=True)


if __name__ == "__main__":
    main()
