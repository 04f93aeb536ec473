"""The main job: compile a model-zoo model with backend="fuse", print eager vs fuse time and kernel counts.

    python3 demo.py [--model llama_layer] [--size small|bench] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
import argparse
import time

import torch

import fusebackend
import models


def wall_ms(fn, device, reps=5, min_s=0.2):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    fn(); sync()
    t0 = time.perf_counter(); fn(); sync()
    n = max(3, min(1000, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        sync(); t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(); times.append((time.perf_counter() - t0) / n * 1e3)
    return sorted(times)[reps // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_layer", choices=sorted(models.ZOO))
    ap.add_argument("--size", default="small", choices=["small", "bench"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    model, inputs = models.get(a.model).make(size=a.size, device=a.device, dtype=dtype, seed=0)
    model.eval()
    with torch.no_grad():
        rep = fusebackend.explain(model, *inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fuse")
        t0 = time.perf_counter(); out = compiled(*inputs); compile_s = time.perf_counter() - t0
        ref = model(*inputs)
        outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
        err = max(((o.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
                  for o, r in zip(outs, refs))
        eager = wall_ms(lambda: model(*inputs), a.device)
        fused = wall_ms(lambda: compiled(*inputs), a.device)
    print(rep)
    print()
    print("model %s (%s, %s, %s)" % (a.model, a.size, a.device, a.dtype))
    print("  eager   %9.3f ms/call" % eager)
    print("  fuse    %9.3f ms/call   (%.2fx)   compile %.2f s   relative error %.2e"
          % (fused, eager / fused, compile_s, err))
    print("  per call: %d fused kernels, %d ATen calls, %d views (%d ATen nodes in the graph)"
          % (rep.num_kernels, rep.num_aten_calls, rep.num_views,
             sum(len(r.graph) for r in rep.graph_reports)))


if __name__ == "__main__":
    main()
