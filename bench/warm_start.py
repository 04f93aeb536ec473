"""Warm start: the first call of a compiled model in a fresh process, eager vs Inductor vs fuse (issue 15.5).

    python3 bench/warm_start.py [--models a,b,...] [--anchors] [--reps N] [--out FILE]

Every cell is its own process (imports not timed): the first call's wall time, torch.compile's compile
included. Columns: eager; Inductor cold (empty cache) and warm (the cache the cold run filled: FX graph and
AOT autograd caches); fuse cold (empty cache), warm without the program cache (kernel binaries cached:
`FUSEBACKEND_PROGRAM_CACHE=0`, how a warm start ran before it) and warm with it. A warm cell is the median of
--reps processes (fuse's before and after runs alternate). `fuse cg` is the time inside compile_graph (what
the program cache replaces), `hits` the program-cache hits of the warm runs. Inference (no_grad), CPU,
float32; `--anchors` adds the CPU anchors of bench/workloads.py. Run it from a tree nobody edits meanwhile:
the program cache's key holds a hash of the package's source, so an edit between the cold and the warm runs
is a miss (and shows as hits 0).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MODELS = "llama_layer,gpt2_block,mixtral_moe,vit_block"


def child(mode, name):
    """One process: build `name`, compile it with `mode`, time the first call; one JSON line."""
    sys.path[:0] = [ROOT, HERE]
    import torch
    import models
    from timing import rel_err
    fn, args = _workload(models, name)
    with torch.no_grad():
        ref = fn(*args) if mode != "eager" else None
        clock = {}
        if mode.startswith("fuse"):
            from fusebackend.capture import backend
            _wrap(backend, "compile_graph", clock)
        t0 = time.perf_counter()
        run = fn if mode == "eager" else torch.compile(fn, backend="inductor" if mode == "inductor" else "fuse")
        out = run(*args)
        ms = (time.perf_counter() - t0) * 1e3
    row = {"mode": mode, "name": name, "first_ms": ms, "err": rel_err(out, ref) if ref is not None else 0.0}
    if mode.startswith("fuse"):
        from fusebackend.runtime import program_cache
        row.update(cg_ms=clock.get("compile_graph", 0.0) * 1e3, hits=program_cache.stats["hits"])
    print("ROW " + json.dumps(row))


def _workload(models, name):
    import torch
    if name in models.ZOO:
        model, args = models.get(name).make(size="small", device="cpu", dtype=torch.float32)
        return model, args
    from workloads import cpu_workloads
    (_, fn, make_args, _), = [w for w in cpu_workloads() if w[0] == name]
    return fn, make_args("cpu", torch.Generator().manual_seed(0))


def _wrap(mod, attr, clock):
    real = getattr(mod, attr)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            clock[attr] = clock.get(attr, 0.0) + time.perf_counter() - t0
    setattr(mod, attr, timed)


def spawn(mode, name, fuse_dir, ind_dir, program_cache=True):
    env = dict(os.environ, FUSEBACKEND_CACHE_DIR=fuse_dir, TORCHINDUCTOR_CACHE_DIR=ind_dir,
               FUSEBACKEND_PROGRAM_CACHE="1" if program_cache else "0")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, name], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    rows = [l[4:] for l in res.stdout.splitlines() if l.startswith("ROW ")]
    if res.returncode != 0 or not rows:
        raise RuntimeError("%s %s failed:\n%s" % (mode, name, res.stderr[-3000:]))
    return json.loads(rows[-1])


def measure(name, reps, tmp):
    fuse_dir, ind_dir = tempfile.mkdtemp(dir=tmp), tempfile.mkdtemp(dir=tmp)
    row = {"name": name, "eager_ms": spawn("eager", name, fuse_dir, ind_dir)["first_ms"]}
    row["ind_cold_ms"] = spawn("inductor", name, fuse_dir, ind_dir)["first_ms"]
    row["ind_warm_ms"] = statistics.median(spawn("inductor", name, fuse_dir, ind_dir)["first_ms"]
                                           for _ in range(reps))
    cold = spawn("fuse", name, fuse_dir, ind_dir)
    row["fuse_cold_ms"], row["fuse_err"] = cold["first_ms"], cold["err"]
    # before and after alternate, so a machine that slows down meanwhile slows both alike
    pairs = [(spawn("fuse", name, fuse_dir, ind_dir, program_cache=False),
              spawn("fuse", name, fuse_dir, ind_dir, program_cache=True)) for _ in range(reps)]
    for key, runs in (("before", [p[0] for p in pairs]), ("after", [p[1] for p in pairs])):
        row["fuse_warm_%s_ms" % key] = statistics.median(r["first_ms"] for r in runs)
        row["cg_%s_ms" % key] = statistics.median(r["cg_ms"] for r in runs)
        row["hits_%s" % key] = min(r["hits"] for r in runs)
        row["fuse_err"] = max(row["fuse_err"], *(r["err"] for r in runs))
    return row


COLUMNS = [("model", "name", "%s"), ("eager", "eager_ms", "%.0f"), ("ind cold", "ind_cold_ms", "%.0f"),
           ("ind warm", "ind_warm_ms", "%.0f"), ("fuse cold", "fuse_cold_ms", "%.0f"),
           ("fuse warm before", "fuse_warm_before_ms", "%.0f"), ("fuse warm after", "fuse_warm_after_ms", "%.0f"),
           ("fuse cg before", "cg_before_ms", "%.1f"), ("fuse cg after", "cg_after_ms", "%.1f"),
           ("hits", "hits_after", "%d"), ("fuse err", "fuse_err", "%.1e")]


def table(rows):
    cells = [[h for h, _, _ in COLUMNS]] + [[f % r[k] for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("MODE", "NAME"))
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--anchors", action="store_true", help="also the CPU anchors of bench/workloads.py")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    opts = ap.parse_args()
    if opts.child:
        return child(*opts.child)
    names = [n for n in opts.models.split(",") if n]
    if opts.anchors:
        sys.path.insert(0, HERE)
        from workloads import cpu_workloads
        names += [w[0] for w in cpu_workloads()]
    rows = []
    print("first call in a fresh process, ms (warm: median of %d processes)" % opts.reps, flush=True)
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        for name in names:
            rows.append(measure(name, opts.reps, tmp))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if opts.out:
        with open(opts.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
