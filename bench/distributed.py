"""Distributed training steps, eager vs Inductor vs fuse, from one run: DDP, FSDP2 and DTensor tensor parallel.

The models, wrappings and checks of tests/test_distributed_{ddp,fsdp,tp}.py (tests/dist_harness.py) at a real
width, on 2 GPUs with NCCL (one process per GPU, mp.spawn; NVLink multicast off: NCCL_NVLS_ENABLE=0). Per
wrapping and backend, per rank: median training-step time (forward, loss, backward with the wrapping's
collectives, SGD step), peak memory (CUDA: max_memory_allocated; CPU: the process's max RSS, which only grows),
compile + first steps' seconds, the first loss's relative error against eager, and fuse's kernel / ATen-call
counts over its graphs.

    python3 bench/distributed.py                 # 2 GPUs, NCCL, bench size, bfloat16
    python3 bench/distributed.py --cpu --quick   # gloo on the CPU, the tests' tiny size (a smoke run)
    python3 bench/distributed.py --only tp --out /tmp/dist.json
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(BENCH_DIR), "tests"))

import torch                                   # noqa: E402
import torch.nn.functional as F                # noqa: E402

import dist_harness as H                       # noqa: E402

WRAPPINGS = ("ddp", "fsdp2", "tp")
BACKENDS = ("eager", "inductor", "fuse")
FULL = dict(layers=4, d=1024, heads=16, hidden=4096, batch=8, seq=512, steps=10, warmup=3)
QUICK = dict(layers=2, d=32, heads=2, hidden=64, batch=2, seq=8, steps=3, warmup=2)


def _model(wrapping, size, device, dtype, mesh):
    torch.manual_seed(0)
    if wrapping == "tp":
        from torch.distributed.tensor.parallel import parallelize_module
        from test_distributed_tp import _tp_plan
        base = torch.nn.Sequential(*(H.Block(size["d"], size["heads"], size["hidden"]) for _ in range(size["layers"])))
        plan = {k: v for i in range(size["layers"]) for k, v in _tp_plan("%d." % i).items()}
        return parallelize_module(base.to(device, dtype), mesh, plan), None
    m = H.Tiny(size["layers"], size["d"], size["heads"], size["hidden"]).to(device, dtype)
    if wrapping == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(m, device_ids=[device.index] if device.type == "cuda" else None), m
    from torch.distributed.fsdp import fully_shard
    for b in m.blocks:
        fully_shard(b)
    return fully_shard(m), m


def _compiled(wrapping, model, backend):
    if backend == "eager":
        return model
    if wrapping == "fsdp2":
        for b in model.blocks:
            b.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)


def _peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(rank, world, wrapping, backend, size, device, dtype, mesh):
    import torch.distributed as dist
    from fusebackend.capture import records
    same = wrapping == "tp"
    g = torch.Generator().manual_seed(100 + (0 if same else rank))
    x = torch.randn(size["batch"], size["seq"], size["d"], generator=g).to(device, dtype)
    y = torch.randn(size["batch"], size["seq"], size["d"], generator=g).to(device, dtype)
    torch._dynamo.reset()
    model, _ = _model(wrapping, size, device, dtype, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(c(x), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    with records.collect() as reps:
        c = _compiled(wrapping, model, backend)
        first = step().detach().float().cpu()
        for _ in range(size["warmup"] - 1):
            step()
    sync()
    dist.barrier()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(size["steps"]):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    graphs = H.graph_summary(reps) if backend == "fuse" else []
    return {"wrapping": wrapping, "backend": backend, "rank": rank, "ms": statistics.median(times),
            "peak_mib": _peak(device), "compile_s": compile_s, "first_loss": first.item(),
            "graphs": len(graphs), "kernels": sum(s["kernels"] for s in graphs),
            "aten": sum(s["aten"] for s in graphs), "fallbacks": sum(len(s["fallbacks"]) for s in graphs)}


def _worker(rank, world, wrappings, backends, size, cpu, dtype_name):
    from torch.distributed.device_mesh import init_device_mesh
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    mesh = init_device_mesh(device.type, (world,))
    dtype = getattr(torch, dtype_name)
    rows = []
    for w in wrappings:
        for b in backends:
            try:
                rows.append(_one(rank, world, w, b, size, device, dtype, mesh))
            except Exception as e:           # one column fails, the run goes on (every rank fails alike)
                rows.append({"wrapping": w, "backend": b, "rank": rank, "error": "%s: %s" % (type(e).__name__, e)})
    return rows


def table(rows) -> str:
    eager = {(r["wrapping"], r["rank"]): r.get("first_loss") for r in rows if r["backend"] == "eager"}
    lines = ["%-6s %-9s %4s %10s %10s %10s %9s %7s %5s %5s %4s" % (
        "wrap", "backend", "rank", "step ms", "peak MiB", "compile s", "loss err", "graphs", "kern", "aten", "fb")]
    for r in rows:
        if "error" in r:
            lines.append("%-6s %-9s %4d  ERROR %s" % (r["wrapping"], r["backend"], r["rank"], r["error"][:150]))
            continue
        ref = eager.get((r["wrapping"], r["rank"]))
        err = abs(r["first_loss"] - ref) / max(abs(ref), 1e-30) if ref is not None else float("nan")
        lines.append("%-6s %-9s %4d %10.2f %10.1f %10.1f %9.1e %7s %5s %5s %4s" % (
            r["wrapping"], r["backend"], r["rank"], r["ms"], r["peak_mib"], r["compile_s"], err,
            *(r[k] if r["backend"] == "fuse" else "" for k in ("graphs", "kernels", "aten", "fallbacks"))))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU instead of NCCL on the GPUs")
    ap.add_argument("--quick", action="store_true", help="the tests' tiny size and few steps")
    ap.add_argument("--only", help="comma-separated wrappings (%s)" % ",".join(WRAPPINGS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--dtype", help="float32 | bfloat16 (default: bfloat16 on GPUs, float32 on the CPU)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10, --quick 3)")
    ap.add_argument("--out", help="write the rows as JSON to this file")
    a = ap.parse_args()
    if not a.cpu and torch.cuda.device_count() < a.world:
        sys.exit("needs %d GPUs (found %d); --cpu runs gloo on the CPU" % (a.world, torch.cuda.device_count()))
    size = dict(QUICK if a.quick else FULL)
    size["steps"] = a.steps or size["steps"]
    wrappings = a.only.split(",") if a.only else list(WRAPPINGS)
    dtype = a.dtype or ("float32" if a.cpu else "bfloat16")
    t0 = time.time()
    per_rank = H.spawn(_worker, a.world, wrappings, a.backends.split(","), size, a.cpu, dtype,
                       backend="gloo" if a.cpu else "nccl", timeout=3600)
    rows = sorted((r for rs in per_rank for r in rs),
                  key=lambda r: (WRAPPINGS.index(r["wrapping"]), BACKENDS.index(r["backend"]), r["rank"]))
    print("distributed training step, %d ranks, %s, %s, size %s (%.0f s)" % (
        a.world, "gloo/CPU" if a.cpu else "NCCL/%s" % torch.cuda.get_device_name(0), dtype,
        {k: size[k] for k in ("layers", "d", "heads", "hidden", "batch", "seq")}, time.time() - t0))
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"size": size, "dtype": dtype, "cpu": a.cpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
