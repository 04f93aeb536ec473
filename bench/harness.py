"""The per-workload measurement loop shared by bench/cpu.py and bench/gpu.py.

A *variant* is one compiled column group (e.g. "ind" = Inductor default, "fuse" = the fuse backend, cold).
Every variant runs inside its own try/except: a failure is recorded as row["<group>_error"] = repr(exc)
and shows as ERROR in the table; the run goes on.  Row keys per variant group G:
  G_compile_s  wall seconds of compile + first call (cold or warm, depending on the variant)
  G_err        relative norm error of the first output vs eager;  G_ok  whether G_err <= row["tol"]
  G_rebuild_s  seconds to rebuild it for the timing phase (from the caches the compile filled)
  G_ms         ms per call, when the variant is timed; eager_ms for eager
Two phases per workload: (1) each variant compiled in turn, cold, after torch._dynamo.reset();
(2) all timed variants rebuilt side by side and timed interleaved with eager (timing.wall_ms_interleaved),
so that clock/thermal drift during the run affects every column alike.
"""
import argparse
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import traceback

import torch

from timing import (BENCH_DIR, copy_bandwidth, detach_copy, flat_tensors, format_table, gpu_state, json_line,
                    rel_err, save_results, syncer, timed_first_call, wall_ms_interleaved)

ROOT = os.path.dirname(BENCH_DIR)
F32_TOL = 1e-5   # DESIGN.md: float32 within 1e-5 relative
LOWP_TOL = 1e-2  # bf16/fp16: at least this, or twice eager's own error against a float64 reference


def parse_args(description, gpu=False):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--only", help="run only workloads whose name contains this substring")
    ap.add_argument("--out", help="write {info, rows} JSON to this file")
    ap.add_argument("--save", action="store_true",
                    help="also write bench/results/<date>_<card-or-cpu>_<script>.json and .txt")
    ap.add_argument("--keep-caches", action="store_true", help="keep the per-workload cache temp dirs")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed columns")
    ap.add_argument("--no-prewarm", action="store_true",
                    help="skip the untimed first compile that takes one-time process costs out of the first workload")
    if gpu:
        ap.add_argument("--device", default="cuda", help="torch device (default cuda; 'cpu' only to smoke-test)")
    return ap.parse_args()


def load_fuse():
    """Import fusebackend from this checkout and make sure backend="fuse" resolves.

    Returns (module, None) or (None, error string). The entry point registers "fuse" when the package is
    pip-installed; from a bare checkout we register fusebackend.capture.backend.fuse under that name ourselves.
    """
    if ROOT not in sys.path:
        sys.path.insert(1, ROOT)
    try:
        import fusebackend
        try:
            torch._dynamo.lookup_backend("fuse")
        except Exception:
            from fusebackend.capture.backend import fuse
            torch._dynamo.register_backend(fuse, name="fuse")
        return fusebackend, None
    except Exception as e:
        return None, "fusebackend not usable: " + repr(e)


class Context:
    """What the variants of one workload share: the fuse module, temp dirs, the cold fuse cache dir."""

    def __init__(self, fuse_mod, fuse_error, keep):
        self.fuse, self.fuse_error, self.keep = fuse_mod, fuse_error, keep
        self.dirs, self.fuse_dir, self.timed = [], None, []

    def fresh_dir(self, prefix):
        d = tempfile.mkdtemp(prefix=prefix)
        self.dirs.append(d)
        return d

    def cleanup(self):
        if not self.keep:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)
        self.dirs, self.fuse_dir, self.timed = [], None, []

    def need_fuse(self):
        if self.fuse is None:
            raise RuntimeError(self.fuse_error)
        return self.fuse


# ---------------------------------------------------------------- variants
# A variant is (group, prepare, timed). prepare(ctx) resets what must be reset, points the cache
# environment variable at the right directory and returns (env_var, cache_dir, compiler), where
# compiler(fn) -> torch.compile(fn, ...). The timing phase reuses env_var/cache_dir/compiler.
def inductor(group, mode="default"):
    """Inductor with a fresh TORCHINDUCTOR_CACHE_DIR (a cold compile)."""
    def prepare(ctx):
        torch._dynamo.reset()
        d = ctx.fresh_dir("bench_inductor_")
        return "TORCHINDUCTOR_CACHE_DIR", d, lambda fn: torch.compile(fn, mode=mode)
    return group, prepare, True


def fuse_cold(group, options=None):
    """backend="fuse" with a fresh FUSEBACKEND_CACHE_DIR and cleared in-memory caches."""
    def prepare(ctx):
        mod = ctx.need_fuse()
        torch._dynamo.reset()
        if hasattr(mod, "reset"):
            mod.reset()
        ctx.fuse_dir = ctx.fresh_dir("bench_fuse_")
        return "FUSEBACKEND_CACHE_DIR", ctx.fuse_dir, lambda fn: torch.compile(fn, backend="fuse", options=options)
    return group, prepare, True


def fuse_warm(group, options=None):
    """Recompile after torch._dynamo.reset() + fusebackend.reset(), same disk cache as the last fuse_cold."""
    def prepare(ctx):
        mod = ctx.need_fuse()
        if ctx.fuse_dir is None:
            raise RuntimeError("no cold fuse compile to warm-start from")
        torch._dynamo.reset()
        mod.reset()
        return "FUSEBACKEND_CACHE_DIR", ctx.fuse_dir, lambda fn: torch.compile(fn, backend="fuse", options=options)
    return group, prepare, False


def short(exc):
    text = repr(exc)
    return text if len(text) <= 400 else text[:397] + "..."


def compile_variant(row, variant, ctx, fn, args, ref, sync, verbose):
    """Phase 1: cold (or warm) compile + first call, timed; correctness of that first output vs eager."""
    group, prepare, timed = variant
    try:
        env, cache_dir, compiler = prepare(ctx)
        os.environ[env] = cache_dir
        out, secs = timed_first_call(compiler(fn), args, sync)
        row[group + "_compile_s"] = secs
        row[group + "_err"] = rel_err(detach_copy(out), ref)
        row[group + "_ok"] = row[group + "_err"] <= row["tol"]
        del out
        if timed:
            ctx.timed.append((group, env, cache_dir, compiler))
    except Exception as e:
        row[group + "_error"] = short(e)
        if verbose:
            traceback.print_exc()


def time_all(row, ctx, fn, args, sync, min_total, verbose, copy_bufs):
    """Phase 2: rebuild every timed variant side by side (no dynamo reset between them: each
    torch.compile wrapper keeps its own cache entry, matched by backend; the rebuild reads the disk
    caches phase 1 filled) and time eager and all of them interleaved, so drift hits all alike."""
    torch._dynamo.reset()
    src, dst = copy_bufs
    calls = {"copy": lambda: dst.copy_(src), "eager": lambda: fn(*args)}
    for group, env, cache_dir, compiler in ctx.timed:
        try:
            os.environ[env] = cache_dir
            compiled = compiler(fn)
            row[group + "_rebuild_s"] = timed_first_call(compiled, args, sync)[1]
            calls[group] = (lambda c: lambda: c(*args))(compiled)
        except Exception as e:
            row[group + "_error"] = short(e)
            if verbose:
                traceback.print_exc()
    times, errors = wall_ms_interleaved(calls, sync, min_total)
    for group, ms in times.items():
        row[group + "_ms"] = ms
    if "copy_ms" in row:
        row["copy_GBps"] = 2 * src.numel() / (row.pop("copy_ms") * 1e-3) / 1e9
    for group, e in errors.items():
        row[group + "_error"] = short(e)


def tolerance(fn, args, ref):
    """(tolerance, eager's relative error vs a float64 run or None) for comparing against eager output."""
    if all(t.dtype in (torch.float32, torch.float64) for t in flat_tensors(ref)):
        return F32_TOL, None
    try:
        fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        eager_err = rel_err(ref, fn64(*args64))
        del fn64, args64
        return max(LOWP_TOL, 2 * eager_err), eager_err
    except Exception:
        return LOWP_TOL, None


def _tiny(t):
    return torch.relu(t * 2.0 + 1.0)


def prewarm(info, device, fuse_mod, fuse_error, opts, sync):
    """Compile a tiny function once per compiler, untimed in the table, so that one-time process costs
    (imports, toolchain probing, first C++/Triton/NVRTC build) are not charged to the first workload.
    The seconds go to info["prewarm_<compiler>_s"], failures to info["prewarm_<compiler>_error"]."""
    if opts.no_prewarm:
        info["prewarm"] = False
        return
    info["prewarm"] = True
    x = torch.randn(4096, device=device)
    for key, env, compile_ in [
            ("inductor", "TORCHINDUCTOR_CACHE_DIR", lambda: torch.compile(_tiny)),
            ("fuse", "FUSEBACKEND_CACHE_DIR", lambda: torch.compile(_tiny, backend="fuse"))]:
        d = tempfile.mkdtemp(prefix="bench_prewarm_")
        try:
            if key == "fuse" and fuse_mod is None:
                raise RuntimeError(fuse_error)
            torch._dynamo.reset()
            os.environ[env] = d
            info["prewarm_%s_s" % key] = round(timed_first_call(compile_(), (x,), sync)[1], 3)
        except Exception as e:
            info["prewarm_%s_error" % key] = short(e)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    torch._dynamo.reset()


def run_suite(info, workloads, variants, columns, opts, device, card, copy_bytes, min_total, ratios):
    """Measure every workload (eager, then each variant), print a JSON line each, then the table; save.

    The copy bandwidth is measured alone first (info) and again inside each workload's interleaved timing;
    floor_ms = bytes / that workload's copy bandwidth (bytes read + written)."""
    on_cuda = torch.device(device).type == "cuda"
    bps = copy_bandwidth(device, copy_bytes)
    info["copy_GBps"] = round(bps / 1e9, 1)
    info["loadavg_start"] = os.getloadavg()
    if on_cuda:
        info["gpu_state_start"] = gpu_state()
    fuse_mod, fuse_error = load_fuse()
    info["fusebackend"] = "ok" if fuse_mod is not None else fuse_error
    sync = syncer(device)
    with torch.no_grad():
        prewarm(info, device, fuse_mod, fuse_error, opts, sync)
    print(json.dumps(info), flush=True)
    copy_bufs = (torch.ones(copy_bytes, dtype=torch.uint8, device=device),
                 torch.empty(copy_bytes, dtype=torch.uint8, device=device))
    rows = []
    for name, fn, make_args, nbytes in workloads:
        row = {"name": name}
        ctx = Context(fuse_mod, fuse_error, opts.keep_caches)
        with torch.no_grad():
            try:
                args = make_args(device, torch.Generator(device=device).manual_seed(0))
                ref = detach_copy(fn(*args))
                row["tol"], row["eager_err_f64"] = tolerance(fn, args, ref)
            except Exception as e:
                row["eager_error"] = short(e)
                if opts.verbose:
                    traceback.print_exc()
            if "eager_error" not in row:
                for v in variants:
                    compile_variant(row, v, ctx, fn, args, ref, sync, opts.verbose)
                time_all(row, ctx, fn, args, sync, min_total, opts.verbose, copy_bufs)
        if nbytes:
            row["bytes"] = nbytes
            row["floor_ms"] = nbytes / (row.get("copy_GBps") or bps / 1e9) * 1e-6
        for key, num, den in ratios:
            if row.get(num) and row.get(den):
                row[key] = row[num] / row[den]
        row["load1"] = os.getloadavg()[0]  # other processes on this machine skew CPU-side timings
        if on_cuda:
            row["gpu_state"] = gpu_state()
        rows.append(row)
        print(json_line(row), flush=True)
        torch._dynamo.reset()
        args = ref = None
        ctx.cleanup()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    copy_bufs = None
    info["loadavg_end"] = os.getloadavg()
    if on_cuda:
        info["gpu_state_end"] = gpu_state()
    table = format_table(rows, columns)
    print()
    print(table, flush=True)
    save_results(info, rows, table, out=opts.out, save=opts.save, card=card)
    return rows
