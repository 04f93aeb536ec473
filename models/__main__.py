"""python3 -m models [--size small|bench] [--device cpu|cuda] [--dtype float32|bfloat16] [--run] [names...]

Lists the zoo with its shapes; with --run, builds each model and times one eager forward (a smoke test of
the bench sizes on a GPU: they must build, fit and run).
"""
from __future__ import annotations

import argparse
import time

import torch

from . import SIZES, ZOO, get


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_one(name: str, size: str, device: str, dtype: torch.dtype) -> str:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, inputs = get(name).make(size=size, device=device, dtype=dtype)
    _sync(device)
    built = time.perf_counter() - t0
    with torch.no_grad():
        out = model(*inputs)  # warm-up (cuBLAS handles, allocator)
        _sync(device)
        t0 = time.perf_counter()
        out = model(*inputs)
        _sync(device)
    fwd_ms = 1e3 * (time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    peak = f" peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
    return (f"params {params / 1e6:.1f}M out {tuple(out.shape)} build {built:.1f}s "
            f"eager fwd {fwd_ms:.2f} ms{peak}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 -m models", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="zoo models (default: all)")
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--run", action="store_true", help="build each model and time one eager forward")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    for name in args.names or list(ZOO):
        entry = get(name)
        line = f"{name:22s} {entry.config(args.size)}"
        if args.run:
            try:
                line += "\n    " + _run_one(name, args.size, args.device, dtype)
            except Exception as e:  # report and go on: one model's failure says nothing of the others
                line += f"\n    FAILED: {type(e).__name__}: {e}"
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        print(line, flush=True)


if __name__ == "__main__":
    main()
