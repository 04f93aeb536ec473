"""The per-workload measurement loop shared by bench/cpu.py and bench/gpu.py.

A *variant* is one compiled column group (e.g. "ind" = Inductor default, "fuse" = the fuse backend, cold).
Every variant runs inside its own try/except: a failure is recorded as row["<group>_error"] = repr(exc)
and shows as ERROR in the table; the run goes on.  Row keys per variant group G:
  G_compile_s  wall seconds of compile + first call (cold or warm, depending on the variant)
  G_ms         ms per call (timing.wall_ms), when the variant is timed
  G_err        relative norm error of the first output vs eager;  G_ok  whether G_err <= row["tol"]
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

from timing import (BENCH_DIR, detach_copy, flat_tensors, format_table, json_line, rel_err, save_results,
                    syncer, timed_first_call, wall_ms)

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
    pip-installed; from a bare checkout we register fusebackend.backend.fuse under that name ourselves.
    """
    if ROOT not in sys.path:
        sys.path.insert(1, ROOT)
    try:
        import fusebackend
        try:
            torch._dynamo.lookup_backend("fuse")
        except Exception:
            from fusebackend.backend import fuse
            torch._dynamo.register_backend(fuse, name="fuse")
        return fusebackend, None
    except Exception as e:
        return None, "fusebackend not usable: " + repr(e)


class Context:
    """What the variants of one workload share: the fuse module, temp dirs, the cold fuse cache dir."""

    def __init__(self, fuse_mod, fuse_error, keep):
        self.fuse, self.fuse_error, self.keep = fuse_mod, fuse_error, keep
        self.dirs, self.fuse_dir = [], None

    def fresh_dir(self, prefix):
        d = tempfile.mkdtemp(prefix=prefix)
        self.dirs.append(d)
        return d

    def cleanup(self):
        if not self.keep:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)
        self.dirs, self.fuse_dir = [], None

    def need_fuse(self):
        if self.fuse is None:
            raise RuntimeError(self.fuse_error)
        return self.fuse


# ---------------------------------------------------------------- variants: (group, prepare, options, timed)
def inductor(group, mode="default"):
    """Inductor with a fresh TORCHINDUCTOR_CACHE_DIR (a cold compile)."""
    def prepare(ctx):
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = ctx.fresh_dir("bench_inductor_")
        return lambda fn: torch.compile(fn, mode=mode)
    return group, prepare, True


def fuse_cold(group, options=None):
    """backend="fuse" with a fresh FUSEBACKEND_CACHE_DIR and cleared in-memory caches."""
    def prepare(ctx):
        mod = ctx.need_fuse()
        torch._dynamo.reset()
        if hasattr(mod, "reset"):
            mod.reset()
        ctx.fuse_dir = ctx.fresh_dir("bench_fuse_")
        os.environ["FUSEBACKEND_CACHE_DIR"] = ctx.fuse_dir
        return lambda fn: torch.compile(fn, backend="fuse", options=options)
    return group, prepare, True


def fuse_warm(group, options=None):
    """Recompile after torch._dynamo.reset() + fusebackend.reset(), same disk cache as the last fuse_cold."""
    def prepare(ctx):
        mod = ctx.need_fuse()
        if ctx.fuse_dir is None:
            raise RuntimeError("no cold fuse compile to warm-start from")
        torch._dynamo.reset()
        mod.reset()
        os.environ["FUSEBACKEND_CACHE_DIR"] = ctx.fuse_dir
        return lambda fn: torch.compile(fn, backend="fuse", options=options)
    return group, prepare, False


def short(exc):
    text = repr(exc)
    return text if len(text) <= 400 else text[:397] + "..."


def run_variant(row, variant, ctx, fn, args, ref, sync, min_total, verbose):
    group, prepare, timed = variant
    try:
        compiler = prepare(ctx)
        compiled = compiler(fn)
        out, secs = timed_first_call(compiled, args, sync)
        row[group + "_compile_s"] = secs
        if ref is not None:
            row[group + "_err"] = rel_err(detach_copy(out), ref)
            row[group + "_ok"] = row[group + "_err"] <= row["tol"]
        del out
        if timed:
            row[group + "_ms"] = wall_ms(lambda: compiled(*args), sync, min_total)
    except Exception as e:
        row[group + "_error"] = short(e)
        if verbose:
            traceback.print_exc()


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


def run_suite(info, workloads, variants, columns, opts, device, card, copy_bps, min_total, ratios):
    """Measure every workload (eager, then each variant), print a JSON line each, then the table; save."""
    fuse_mod, fuse_error = load_fuse()
    info["fusebackend"] = "ok" if fuse_mod is not None else fuse_error
    sync = syncer(device)
    with torch.no_grad():
        prewarm(info, device, fuse_mod, fuse_error, opts, sync)
    print(json.dumps(info), flush=True)
    rows = []
    for name, fn, make_args, nbytes in workloads:
        row = {"name": name}
        ctx = Context(fuse_mod, fuse_error, opts.keep_caches)
        with torch.no_grad():
            try:
                args = make_args(device, torch.Generator(device=device).manual_seed(0))
                ref = detach_copy(fn(*args))
                row["tol"], row["eager_err_f64"] = tolerance(fn, args, ref)
                row["eager_ms"] = wall_ms(lambda: fn(*args), sync, min_total)
            except Exception as e:
                row["eager_error"] = short(e)
                if opts.verbose:
                    traceback.print_exc()
            if "eager_error" not in row or "tol" in row:
                for v in variants:
                    run_variant(row, v, ctx, fn, args, ref, sync, min_total, opts.verbose)
        if nbytes:
            row["bytes"] = nbytes
            row["floor_ms"] = nbytes / copy_bps * 1e3
        for key, num, den in ratios:
            if row.get(num) and row.get(den):
                row[key] = row[num] / row[den]
        rows.append(row)
        print(json_line(row), flush=True)
        torch._dynamo.reset()
        args = ref = None
        ctx.cleanup()
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    table = format_table(rows, columns)
    print()
    print(table, flush=True)
    save_results(info, rows, table, out=opts.out, save=opts.save, card=card)
    return rows
