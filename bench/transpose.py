"""GPU benchmark of layout changes: eager vs Inductor vs fuse, where fuse's tiled kernel (emit/cuda_tiled.py) runs.

    python3 bench/transpose.py [--reps N] [--only SUBSTR]

A 4096x4096 float32 transpose copy, an NCHW -> NHWC bfloat16 clone of 64x256x56x56, and batch norm (inference)
+ relu reading NHWC and writing NCHW. GPU ms per call from CUDA events (median of reps), the floor from the
bytes moved (read once, written once) over the measured copy bandwidth (timing.copy_bandwidth). One JSON
line per workload, then a table.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from timing import copy_bandwidth, format_table, json_line, rel_err  # noqa: E402

F = torch.nn.functional


def _bn_relu(x, rm, rv, w, b):
    return torch.relu(F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)).contiguous()


def workloads(dev):
    def transpose():
        return (lambda x: x.t().contiguous()), (torch.randn(4096, 4096, device=dev),)

    def nchw_to_nhwc():
        x = torch.randn(64, 256, 56, 56, device=dev, dtype=torch.bfloat16)
        return (lambda x: x.contiguous(memory_format=torch.channels_last)), (x,)

    def bn_relu():
        x = torch.randn(32, 256, 56, 56, device=dev).contiguous(memory_format=torch.channels_last)
        c = lambda: torch.randn(256, device=dev)
        return _bn_relu, (x, c(), torch.rand(256, device=dev) + 0.5, c(), c())
    return {"transpose_4096_f32": transpose, "nchw_to_nhwc_bf16": nchw_to_nhwc, "bn_relu_nhwc_to_nchw_f32": bn_relu}


def event_ms(fn, args, iters=20, reps=7):
    """Median over reps of the GPU time per call between two CUDA events around `iters` calls."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*args)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    samples.sort()
    return samples[len(samples) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available")
    import fusebackend  # noqa: F401  (registers the "fuse" backend)
    dev = "cuda"
    bw = copy_bandwidth(dev, 1 << 30)
    rows = []
    for name, make in workloads(dev).items():
        if opts.only not in name:
            continue
        fn, args = make()
        with torch.no_grad():
            ref = fn(*args)
            moved = sum(a.numel() * a.element_size() for a in args) + ref.numel() * ref.element_size()
            row = {"name": name, "floor_ms": moved / bw * 1e3, "eager_ms": event_ms(fn, args, reps=opts.reps)}
            for key, compiled in (("ind", torch.compile(fn)), ("fuse", torch.compile(fn, backend="fuse"))):
                torch._dynamo.reset()
                try:
                    out = compiled(*args)
                    row[key + "_err"] = rel_err(out, ref)
                    row[key + "_ms"] = event_ms(compiled, args, reps=opts.reps)
                except Exception as e:          # one failing variant does not hide the others
                    row[key + "_error"] = "%s: %s" % (type(e).__name__, str(e)[:200])
        if "fuse_ms" in row and "ind_ms" in row:
            row["fuse_over_ind"] = row["fuse_ms"] / row["ind_ms"]
        print(json_line(row), flush=True)
        rows.append(row)
    print("copy bandwidth %.0f GB/s (read + write)" % (bw / 1e9))
    print(format_table(rows, [("workload", "name", None, None), ("eager", "eager_ms", "ms", None),
                              ("ind", "ind_ms", "ms", "ind"), ("fuse", "fuse_ms", "ms", "fuse"),
                              ("floor", "floor_ms", "ms", None), ("fuse/ind", "fuse_over_ind", "ratio", None)]))


if __name__ == "__main__":
    main()
