"""Run the GPU anchors once each under fuse and under Inductor, for a profiler to watch (issue 3).

    ncu --clock-control none --kernel-name regex:'fb_|triton' python3 bench/profile_gpu.py [--only SUBSTR]
    python3 bench/profile_gpu.py --torch-profiler [--only SUBSTR]   # per-kernel GPU time, no ncu needed
    python3 bench/profile_gpu.py --torch-profiler --zoo hf_bert      # a model-zoo model at bench size (bf16)
    python3 bench/profile_gpu.py --torch-profiler --zoo hf_bert --groups   # + fuse's groups, every kernel row

Not a benchmark (bench/gpu.py is): each compiled function runs twice (the first call compiles), so the
profiler sees every kernel of the steady state. With --torch-profiler it prints, per workload and backend,
the GPU time of each kernel name summed over 20 calls / 20.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from workloads import gpu_workloads  # noqa: E402

BACKENDS = {"fuse": dict(backend="fuse"), "inductor": dict()}


def _kernel_table(fn, args, calls=20):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls, e.count // calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def _workloads(opts):
    """(name, fn, make_args, dynamo config) of the anchors, or of one zoo model at bench size in bf16."""
    if not opts.zoo:
        return [(n, f, m, {}) for n, f, m, _ in gpu_workloads("cuda", opts.only)]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import models
    entry = models.get(opts.zoo)
    model, inputs = entry.make(size="bench", device="cuda", dtype=torch.bfloat16, seed=0)
    return [(opts.zoo, model, lambda d, g: inputs, dict(getattr(entry, "dynamo_config", None) or {}))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--torch-profiler", action="store_true")
    ap.add_argument("--zoo", default=None, help="a model-zoo name instead of the anchors")
    ap.add_argument("--groups", action="store_true", help="print fuse's groups and every kernel row")
    ap.add_argument("--options", default=None, help="fuse backend options as JSON, e.g. '{\"conv_layout\": \"auto\"}'")
    ap.add_argument("--fuse-only", action="store_true", help="leave Inductor out")
    opts = ap.parse_args()
    backends = {"fuse": dict(backend="fuse", options=json.loads(opts.options)) if opts.options else BACKENDS["fuse"]}
    if not opts.fuse_only:
        backends["inductor"] = BACKENDS["inductor"]
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, fn, make_args, cfg in _workloads(opts):
        args = make_args("cuda", g)
        for bname, kw in backends.items():
            torch._dynamo.reset()
            cfn = torch.compile(fn, **kw)
            with torch.no_grad(), torch._dynamo.config.patch(**cfg):
                for _ in range(2):
                    cfn(*args)
                torch.cuda.synchronize()
                if opts.torch_profiler:
                    rows = _kernel_table(cfn, args)
                    total = sum(r[1] for r in rows)
                    from timing import wall_ms
                    wall = wall_ms(lambda: cfn(*args), torch.cuda.synchronize) * 1e3
                    print("== %s / %s: %.1f us GPU time, %.1f us wall per call, %d kernel launches"
                          % (name, bname, total, wall, sum(r[2] for r in rows)))
                    for key, us, n in (rows if opts.groups else rows[:12]):
                        print("   %8.1f us  x%-3d %s" % (us, n, key[:90]))
            sys.stdout.flush()
        if opts.groups:
            _print_groups(fn, args)


def _print_groups(fn, args):
    """Fuse's forward groups, one line each: which ops each kernel holds and what stays an ATen call."""
    import fusebackend
    with torch.no_grad():
        rep = fusebackend.explain(fn, *args)
    print("== fuse groups: %d kernels, %d ATen calls" % (rep.num_kernels, rep.num_aten_calls))
    for gr in rep.graph_reports:
        if gr.kind == "backward":
            continue
        fg = gr.graph
        for g in gr.groups:
            if g.kind == "view":
                continue
            ops = " ".join(fg.node(n).op_name.split(".")[0] for n in g.nodes)
            reads = " ".join("%s:%s" % (r.name, fg.node(r.name).op_name.split(".")[0]) for r in g.inputs)
            print("   %-9s %-22s %s%s\n             reads %s" % (
                g.kind, tuple(g.domain), ops, "  FALLBACK: %s" % g.fallback_reason if g.fallback_reason else "",
                reads))

if __name__ == "__main__":
    main()
