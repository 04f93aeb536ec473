"""Every model-zoo model: eager, Inductor and fuse side by side, with kernel launches counted for both.

    python3 bench/zoo.py [--size bench|small] [--device cuda|cpu] [--dtype bfloat16|float32] [--only NAME] [--save]

Fuse's count is launches per forward call (fusebackend.inspection.explain: fused kernels; horizontal batches count once)
plus ATen calls; Inductor's is the number of kernels it generated for the same forward
(torch._inductor.metrics.generated_kernel_count) plus the extern calls it leaves to ATen.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusebackend  # noqa: E402
import models  # noqa: E402
from timing import base_info, format_table, rel_err, save_results, syncer, wall_ms_interleaved  # noqa: E402


def inductor_counts(model, inputs, cfg):
    from torch._inductor import metrics
    torch._dynamo.reset()
    metrics.reset()
    with torch._dynamo.config.patch(**cfg):
        c = torch.compile(model)
        t0 = time.perf_counter()
        c(*inputs)
        compile_s = time.perf_counter() - t0
    return c, metrics.generated_kernel_count, getattr(metrics, "num_extern_calls", None) or 0, compile_s


def one(name, a, device, dtype):
    opts = json.loads(a.options) if a.options else None
    entry = models.get(name)
    model, inputs = entry.make(size=a.size, device=device, dtype=dtype, seed=0)
    cfg = dict(getattr(entry, "dynamo_config", None) or {})
    row = {"name": name}
    sync = syncer(device)
    with torch.no_grad():
        ref = model(*inputs)
        with torch._dynamo.config.patch(**cfg):
            rep = fusebackend.explain(model, *inputs, options=opts)
        row.update(fuse_kernels=rep.num_kernels, fuse_aten=rep.num_aten_calls, fuse_graphs=rep.num_graphs)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(**cfg):
            cf = torch.compile(model, backend="fuse", options=opts) if opts else torch.compile(model, backend="fuse")
            t0 = time.perf_counter(); out = cf(*inputs); sync()
            row["fuse_compile_s"] = time.perf_counter() - t0
        row["fuse_err"] = rel_err(out, ref)
        ci, ik, iext, ics = inductor_counts(model, inputs, cfg)
        row.update(ind_kernels=ik, ind_extern=iext, ind_compile_s=ics)
        row["ind_err"] = rel_err(ci(*inputs), ref)
        with torch._dynamo.config.patch(**cfg):
            times, errors = wall_ms_interleaved({"eager": lambda: model(*inputs), "ind": lambda: ci(*inputs),
                                                 "fuse": lambda: cf(*inputs)}, sync=sync)
        row.update({k + "_ms": v for k, v in times.items()})
        row["errors"] = {k: repr(v)[:200] for k, v in errors.items()}
    row["fuse_over_ind"] = row.get("fuse_ms", float("nan")) / row.get("ind_ms", float("nan"))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="bench", choices=["small", "bench"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--only", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--options", default=None, help="fuse backend options as JSON, e.g. '{\"conv_layout\": \"auto\"}'")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    torch.backends.cuda.matmul.allow_tf32 = False
    info = base_info("zoo")
    info.update(size=a.size, device=a.device, dtype=str(dtype))
    rows = []
    for name in models.ZOO:
        if (a.only and a.only not in name) or (a.skip_hf and name.startswith("hf_")):
            continue
        try:
            row = one(name, a, a.device, dtype)
        except Exception as e:          # record and go on: one model must not stop the table
            row = {"name": name, "errors": {"run": repr(e)[:300]}}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    for r in rows:
        for k, v in r.get("errors", {}).items():
            r[k + "_error"] = v
    cols = [("model", "name", None, None), ("eager ms", "eager_ms", "ms", "eager"),
            ("ind ms", "ind_ms", "ms", "ind"), ("fuse ms", "fuse_ms", "ms", "fuse"),
            ("fuse/ind", "fuse_over_ind", "ratio", ""), ("ind kernels", "ind_kernels", "n", ""),
            ("fuse kernels", "fuse_kernels", "n", ""), ("fuse aten", "fuse_aten", "n", ""),
            ("fuse err", "fuse_err", "err", ""), ("ind comp s", "ind_compile_s", "s", ""),
            ("fuse comp s", "fuse_compile_s", "s", "")]
    table = format_table(rows, cols)
    print(table)
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    save_results(info, rows, table, out=a.out, save=a.save, card=card)


if __name__ == "__main__":
    main()
