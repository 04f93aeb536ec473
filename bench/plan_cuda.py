"""Predict what fuse launches for a model on CUDA, on a machine without a GPU (issue 5's kernel budgets).

    python3 bench/plan_cuda.py --zoo hf_llama hf_gpt2 [--batch 2 --seq 64] [--groups] [--out F.json]

The model runs under Dynamo on the CPU; each graph is retargeted to fake CUDA tensors (bench/fake_cuda.py)
and captured by AOT autograd with fuse's decompositions; then fuse's passes and its CUDA emitter run on
it as in a real compile -- nothing is compiled or launched. Printed per model: kernels (a horizontal batch
counts as the runtime launches it: one launch per launch class, up to MAX_CHAINS kernel bodies), ATen calls
(opaque ops and groups whose emit failed) and views, summed over the
forward graphs. A prediction, not a measurement: NVRTC could still reject a kernel on the GPU, and the SDPA
backend is chosen by fake_cuda.sdpa_sm90's rule. The H100 image has transformers 5.17; another version may
build other masks (put a 5.17 copy first on PYTHONPATH to match it). Batch and sequence length are cut to
keep the CPU run short; the model's other dims stay at bench size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._guards import detect_fake_mode  # noqa: E402

from fusebackend.capture import fake_cuda  # noqa: E402
from fusebackend.capture import decompositions, moe_layers  # noqa: E402
from fusebackend.capture.records import GraphReport  # noqa: E402
from fusebackend.emit import EmitError, emit_kernel  # noqa: E402
from fusebackend.graph import lower  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402
from fusebackend.passes import plan_groups  # noqa: E402
from fusebackend.passes.horizontal_cost import MAX_CHAINS  # noqa: E402
from fusebackend.runtime.batch import launch_sets  # noqa: E402


def plan_graph(gm, opts: FuseOptions) -> dict:
    """fuse's grouping of one ATen graph, with launches counted as the runtime would make them."""
    fg = lower(gm)
    moe_layers.rewrite(fg, opts, "inference", GraphReport(kind="inference", graph=fg))   # as compile_graph does
    groups, batches = plan_groups(fg, opts.max_group_nodes, opts.conv_layout)
    source, failed = {}, []
    for g in groups:
        if g.is_kernel:
            try:
                source[g.id] = emit_kernel(fg, g)
            except EmitError as e:
                failed.append((g, str(e)))
    merged = 0
    for b in batches:          # members with a batch entry share launches as the runtime groups them
        members = [SimpleNamespace(spec=source[g]) for g in b.groups if g in source and source[g].batch_name]
        if len(members) >= 2:
            merged += len(members) - len(launch_sets(members, MAX_CHAINS))
    return {"kernels": len(source) - merged,
            "aten_calls": sum(1 for g in groups if g.kind == "opaque") + sum(len(g.nodes) for g, _ in failed),
            "views": sum(1 for g in groups if g.kind == "view"),
            "failed": [(g.id, why.splitlines()[0]) for g, why in failed],
            "groups": [g.describe(fg) for g in groups if g.kind != "view"]}


def plan_model(model, inputs, opts: FuseOptions) -> list:
    """One plan per forward graph Dynamo makes of model(*inputs) (inference: no backward graphs)."""
    plans = []

    def planner(gm, example_inputs):
        plans.append(plan_graph(gm, opts))

        def not_runnable(*args):
            raise RuntimeError("plan_cuda: a planned graph is never run")
        return not_runnable

    def capture(gm, example_inputs):
        runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())     # the CPU graph runs the model
        fake = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs)
        aot_autograd(fw_compiler=planner, inference_compiler=planner,
                     decompositions=decompositions.table(opts.gemv_max_rows, opts.pad_matmul))(
            fake_cuda.retarget(gm), fake)
        return runnable.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*inputs)
    return plans


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", nargs="+", required=True, help="model-zoo names")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--groups", action="store_true", help="list every kernel and ATen group")
    ap.add_argument("--out", help="write the plans as JSON")
    args = ap.parse_args()
    import models
    opts, rows = FuseOptions(), {}
    for name in args.zoo:
        entry = models.get(name)
        cfg = entry.config("bench")
        cut = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if hasattr(cfg, k)}
        entry.configs["plan"] = dataclasses.replace(cfg, **cut) if cut else cfg
        model, inputs = entry.make(size="plan", device="cpu", dtype=torch.bfloat16, seed=0)
        with torch._dynamo.config.patch(**entry.dynamo_config):
            plans = plan_model(model, inputs, opts)
        rows[name] = {k: sum(p[k] for p in plans) for k in ("kernels", "aten_calls", "views")}
        rows[name].update(graphs=len(plans), failed=[f for p in plans for f in p["failed"]])
        if args.groups:
            for i, p in enumerate(plans):
                print("%s graph %d:\n  %s" % (name, i, "\n  ".join(p["groups"])))
    import transformers
    print("predicted CUDA launches per forward (torch %s, transformers %s, batch %d, seq %d, bf16)"
          % (torch.__version__, transformers.__version__, args.batch, args.seq))
    print("%-14s %8s %8s %6s %6s" % ("model", "kernels", "aten", "views", "graphs"))
    for name, r in rows.items():
        print("%-14s %8d %8d %6d %6d%s" % (name, r["kernels"], r["aten_calls"], r["views"], r["graphs"],
                                           "  emit failed: %s" % r["failed"] if r["failed"] else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "batch": args.batch, "seq": args.seq, "models": rows}, f, indent=1)


if __name__ == "__main__":
    main()
