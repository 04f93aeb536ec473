"""Placed execution (issue "Placement I") on the GPU machine: a Mixtral-shaped MoE layer whose weights live in
host memory, compiled with gpu_memory_budget at several budgets, against eager on the GPU (all weights
resident) and eager on the CPU. Per budget: max relative error vs eager-GPU, ms per call, peak GPU memory
allocated during a call against the budget, and the placement the pass chose.

    python3 bench/placed.py [--dim 2048 --ffn 7168 --experts 8 --tokens 1 16 64] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusebackend.capture import records  # noqa: E402
from models.mixtral import MoEConfig, SparseMoE  # noqa: E402


def timed(fn, x, reps=5):
    fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--executions", nargs="+", default=["hybrid", "simple"],
                    help="hybrid: a whole MoE layer as one op on the hybrid CPU/GPU runtime; simple: each expert "
                         "where the plan put it (FUSEBACKEND_HYBRID_MOE=0)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []
    for tokens in args.tokens:
        cfg = MoEConfig(batch=1, seq=tokens, dim=args.dim, ffn=args.ffn, experts=args.experts)
        model = SparseMoE(cfg).to(dt).eval()
        gpu_model = SparseMoE(cfg).to(dt).eval()
        gpu_model.load_state_dict(model.state_dict())
        gpu_model = gpu_model.cuda()
        expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
        fixed = sum(p.numel() * p.element_size() for p in model.parameters()) - expert_bytes
        x = torch.randn(1, tokens, args.dim, dtype=dt)
        with torch.no_grad():
            ref = gpu_model(x.cuda()).float().cpu()
            gpu_ms = timed(lambda v: gpu_model(v), x.cuda())
            cpu_ms = timed(lambda v: model(v), x, reps=2)
        for share, execution in [(s, e) for s in args.shares for e in args.executions]:
            os.environ["FUSEBACKEND_HYBRID_MOE"] = "1" if execution == "hybrid" else "0"
            budget = fixed + int(share * expert_bytes)
            torch._dynamo.reset()
            with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), \
                    warnings.catch_warnings(record=True) as caught, records.collect() as reps:
                warnings.simplefilter("always")
                compiled = torch.compile(model, backend="fuse", options={"gpu_memory_budget": budget})
                t0 = time.perf_counter()
                out = compiled(x)
                compile_s = time.perf_counter() - t0
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = timed(compiled, x)
                peak = torch.cuda.max_memory_allocated()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            plan = next((r.placement for r in reps if r.placement is not None), None)
            modes = sorted(s.mode for s in plan.subgraphs) if plan else []
            row = dict(tokens=tokens, share=share, execution=execution, budget=budget, err=err, ms=ms, eager_gpu_ms=gpu_ms,
                       eager_cpu_ms=cpu_ms, compile_s=compile_s, resident_bytes=base, peak_bytes=peak,
                       # above the budget: activations and the one streamed expert in flight
                       over_budget_bytes=peak - budget,
                       modes={m: modes.count(m) for m in set(modes)},
                       predicted_ms=plan.predicted_step_ms() if plan else None,
                       warnings=sorted({str(w.message)[:120] for w in caught if "fusebackend" in str(w.message)}))
            rows.append(row)
            print("%-6s tokens %3d budget %4.0f%% of experts: err %.1e  fuse %8.3f ms (pred %s)  eager-gpu %.3f  "
                  "eager-cpu %.3f  peak %.2f GB / budget %.2f GB (resident %.2f)  %s%s"
                  % (execution, tokens, share * 100, err, ms, "%.3f" % row["predicted_ms"] if plan else "-", gpu_ms, cpu_ms,
                     peak / 1e9, budget / 1e9, base / 1e9, row["modes"],
                     "  warnings: %s" % row["warnings"] if row["warnings"] else ""), flush=True)
            del compiled
            torch.cuda.empty_cache()
    # inputs already on the GPU with the weights in host memory: what does the user get?
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            y = torch.compile(model, backend="fuse", options={"gpu_memory_budget": fixed})(x.cuda())
        print("cuda input: output on %s, err %.1e" % (y.device, ((y.float().cpu() - ref).norm() / ref.norm()).item()))
    except Exception as e:          # report, not hide: this is what a user sees
        print("cuda input: %s: %s" % (type(e).__name__, str(e).splitlines()[0][:200]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
