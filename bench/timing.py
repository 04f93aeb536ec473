"""Timing, bandwidth, correctness and result-writing helpers shared by bench/cpu.py and bench/gpu.py."""
import datetime
import json
import os
import platform
import re
import subprocess
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


# ---------------------------------------------------------------- timing
def syncer(device):
    """A function that waits for all queued work on `device` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def wall_ms(fn, sync=lambda: None, min_total=0.2, reps=5, max_iters=2000):
    """Median over `reps` of the mean wall-clock time per call, in ms, CPU overhead included.

    One warm-up call, one call to size the loop so each rep lasts about `min_total` seconds
    (at least 3 calls), then `reps` timed loops, each closed by `sync()`.
    """
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    iters = max(3, min(max_iters, int(min_total / max(once, 1e-7))))
    samples = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3 / iters)
    samples.sort()
    return samples[len(samples) // 2]


def wall_ms_interleaved(calls, sync=lambda: None, min_total=0.2, reps=5, max_iters=2000, max_s=None):
    """wall_ms for several callables at once, their reps interleaved (A B C A B C ...).

    Returns ({name: median ms}, {name: exception}); a callable that raises is dropped from later reps.
    max_s: no new round of reps starts once this many seconds have passed since the first one, after at least
    3 rounds (a machine that slows down mid-run still gives a median in bounded time).
    """
    iters, samples, errors = {}, {}, {}
    for name, fn in calls.items():
        try:
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            iters[name] = max(3, min(max_iters, int(min_total / max(time.perf_counter() - t0, 1e-7))))
            samples[name] = []
        except Exception as e:
            errors[name] = e
    t_end = None if max_s is None else time.perf_counter() + max_s
    for r in range(reps):
        if t_end is not None and r >= 3 and time.perf_counter() > t_end:
            break
        for name in list(samples):
            fn, n = calls[name], iters[name]
            try:
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) * 1e3 / n)
            except Exception as e:
                errors[name] = e
                del samples[name]
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}, errors


def gpu_state():
    """Temperature, clocks and power of the first GPU from nvidia-smi (None without it): drift diagnosis."""
    q = "temperature.gpu,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=" + q, "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except Exception:
        return None


def timed_first_call(fn, args, sync):
    """Run fn(*args) once (a compile happens here); return (output, seconds)."""
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def copy_bandwidth(device, nbytes):
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = wall_ms(lambda: dst.copy_(src), syncer(device), min_total=0.3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# ---------------------------------------------------------------- correctness
def flat_tensors(out):
    """The tensors of a (possibly nested list/tuple) output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    raise TypeError("unexpected output type %s" % type(out).__name__)


def detach_copy(out):
    """A private copy of an output (CUDA-graph outputs are overwritten by the next replay)."""
    return [t.detach().clone() for t in flat_tensors(out)]


def rel_err(out, ref):
    """Relative norm error ||out - ref|| / ||ref|| over all output tensors, computed in float64."""
    a, b = flat_tensors(out), flat_tensors(ref)
    if len(a) != len(b):
        raise ValueError("output has %d tensors, reference %d" % (len(a), len(b)))
    num = den = 0.0
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError("shape %s != reference %s" % (tuple(x.shape), tuple(y.shape)))
        x, y = x.detach().double(), y.detach().to(x.device).double()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


# ---------------------------------------------------------------- machine info
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def base_info(script):
    return {
        "script": script,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
    }


# ---------------------------------------------------------------- output
def _round(v):
    if isinstance(v, float):
        return float("%.5g" % v)
    return v


def json_line(row):
    return json.dumps({k: _round(v) for k, v in row.items()})


def format_table(rows, columns):
    """Aligned text table; `columns` is a list of (header, key, kind, group), kind in 'ms', 'ratio', 's', 'err'.

    A cell whose measurement raised (row has `<group>_error`) shows ERROR; an 'err' cell whose result was
    beyond tolerance (row[`<group>_ok`] is False) shows ERROR(value). Exceptions are listed under the table.
    """
    fmt = {"ms": "%.4f", "ratio": "%.2f", "s": "%.2f", "err": "%.1e", "n": "%d"}

    def cell(row, key, kind, group):
        if row.get(key) is not None:
            text = fmt[kind] % row[key]
            return "ERROR(%s)" % text if kind == "err" and row.get(group + "_ok") is False else text
        return "ERROR" if group and group + "_error" in row else "-"

    table = [[c[0] for c in columns]]
    for r in rows:
        table.append([r["name"]] + [cell(r, *c[1:]) for c in columns[1:]])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
             for line in table]
    errors = ["  %s [%s] %s" % (r["name"], k[:-len("_error")], v)
              for r in rows for k, v in r.items() if k.endswith("_error")]
    wrong = ["  %s [%s] relative error %.3g > tolerance %.3g" % (r["name"], k[:-3], r[k[:-3] + "_err"],
                                                                  r.get("tol", float("nan")))
             for r in rows for k, v in r.items() if k.endswith("_ok") and v is False]
    if errors or wrong:
        lines += ["", "errors:"] + errors + wrong
    return "\n".join(lines)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def save_results(info, rows, table, out=None, save=False, card="cpu"):
    """Write {info, rows} JSON to `out`; with save=True also to bench/results/<date>_<card>_<script>.json/.txt."""
    payload = {"info": info, "rows": rows}
    paths = []
    if out:
        paths.append(out)
    if save:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        base = os.path.join(RESULTS_DIR, "%s_%s_%s" % (datetime.date.today().isoformat(), slug(card),
                                                         info["script"]))
        paths.append(base + ".json")
        with open(base + ".txt", "w") as f:
            f.write(json.dumps(info) + "\n\n" + table + "\n")
        print("wrote", base + ".txt")
    for p in paths:
        with open(p, "w") as f:
            json.dump(payload, f, indent=1)
        print("wrote", p)
