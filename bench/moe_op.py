"""MoE layers without CUDA graphs: eager vs Inductor vs fuse with and without the moe_experts rewrite, in ms.

    python3 bench/moe_op.py [--device cpu|cuda] [--dtype bf16|f32] [--tokens 16] [--hidden 1024] [--ffn 3584]
                            [--experts 8] [--top-k 2] [--only dense|loop] [--rounds 3] [--threads N]
                            [--clock wall|cpu]

Two spellings of one Mixtral-style layer (router, softmax, top-k, SwiGLU experts):
  dense   bench/workloads.py's MoETop2: every expert on every token, masked by its gate (the GPU anchor
          moe_top2of8_16tok_bf16 at the default sizes)
  loop    models/mixtral.py's SparseMoE captured whole (capture_dynamic_output_shape_ops): HF's loop, a
          torch.where (device -> host sync) per expert, index_add_
Columns: eager; Inductor (default mode); fuse with options={"moe_op": False} (the layer's own ops); fuse (the
layer as one moe_experts op: one sync per call, each expert on its own tokens; passes/moe_rewrite.py). Each
cell: the minimum over --rounds of the median of 5 interleaved reps of the mean wall time per call, on CUDA
synchronised after every rep (bench/timing.py); --clock cpu counts the process's CPU time instead (a loaded
CPU box, --threads 1). Outputs are checked against eager first: float32 to 1e-5 relative, half types within
max(1e-2, 2x eager's own error against float64) as bench/README.md's rule (WRONG is printed, the row is still
timed). The last column: layers rewritten into the op over the compiles (1 expected per layer).
"""
import argparse
import copy
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusebackend  # noqa: E402,F401
from fusebackend.capture import records  # noqa: E402
from fusebackend.capture.backend import fuse as fuse_backend  # noqa: E402
from models.mixtral import MoEConfig, SparseMoE  # noqa: E402
import timing  # noqa: E402
from timing import rel_err, syncer, wall_ms_interleaved  # noqa: E402
from workloads import MoETop2  # noqa: E402


def _model(kind, a, device, dtype):
    torch.manual_seed(0)
    if kind == "dense":
        m = MoETop2(a.hidden, a.ffn, a.experts, a.top_k)
    else:
        m = SparseMoE(MoEConfig(1, a.tokens, a.hidden, a.ffn, a.experts, a.top_k))
    return m.to(device=device, dtype=dtype).eval()


def _input(kind, a, device, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (a.tokens, a.hidden) if kind == "dense" else (1, a.tokens, a.hidden)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _tolerance(model, x, ref):
    if ref.dtype == torch.float32:
        return 1e-5
    with torch.no_grad():
        r64 = copy.deepcopy(model).double()(x.double())
    return max(2 * rel_err(ref, r64), 1e-2)          # bench/README.md: eager's own error, at least 1e-2


class _clock:
    """bench/timing.py's timer reading process CPU time instead of wall time, while inside."""

    def __init__(self, kind):
        self.kind = kind

    def __enter__(self):
        if self.kind == "cpu":
            self.saved = timing.time
            timing.time = types.SimpleNamespace(perf_counter=time.process_time)

    def __exit__(self, *exc):
        if self.kind == "cpu":
            timing.time = self.saved
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU seconds (time.process_time) instead of wall seconds -- on a "
                         "shared CPU box with --threads 1, what other processes' load does not inflate")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    sync = syncer(a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu, %d threads" % torch.get_num_threads()
    print("ms per call (%s clock; min over %d rounds of the median of 5 interleaved reps), %s, torch %s, %s, "
          "%d tokens, hidden %d, ffn %d, %d experts, top-%d" % (a.clock, a.rounds, where, torch.__version__, a.dtype,
                                                                a.tokens, a.hidden, a.ffn, a.experts, a.top_k))
    cols = ["eager", "inductor", "fuse (layer ops)", "fuse (moe op)"]
    print("  %-6s %10s %10s %17s %14s   moe ops" % ("", *cols))
    for kind in ("dense", "loop"):
        if a.only and a.only != kind:
            continue
        model, x = _model(kind, a, a.device, dtype), _input(kind, a, a.device, dtype)
        patch = {"capture_dynamic_output_shape_ops": kind == "loop"}
        torch._dynamo.reset()
        with torch.no_grad(), torch._dynamo.config.patch(**patch):
            ref = model(x)
            tol = _tolerance(model, x, ref)
            calls = {"eager": lambda: model(x)}
            variants = (("inductor", torch.compile(model)),
                        ("fuse (layer ops)", torch.compile(model, backend=fuse_backend, options={"moe_op": False})),
                        ("fuse (moe op)", torch.compile(model, backend=fuse_backend, options={"moe_op": True})))
            wrong = []
            with records.collect() as reps:
                for name, f in variants:
                    err = rel_err(f(x), ref)
                    if err > tol:
                        wrong.append("%s: relative error %.2e above %.1e" % (name, err, tol))
                    calls[name] = (lambda f=f: f(x))
            rewritten = sum(len(r.moe_layers) for r in reps)
            best = {}
            for _ in range(a.rounds):
                with _clock(a.clock):
                    times, errors = wall_ms_interleaved(calls, sync=sync, min_total=0.3, max_s=60)
                for k, ms in times.items():
                    best[k] = min(best.get(k, float("inf")), ms)
                for k, e in errors.items():
                    print("  %s: %s failed: %r" % (kind, k, e))
        cells = ["%.3f" % best[c] if c in best else "-" for c in cols]
        print("  %-6s %10s %10s %17s %14s   %d" % (kind, *cells, rewritten))
        for w in wrong:
            print("  %s: WRONG, %s" % (kind, w))


if __name__ == "__main__":
    main()
