"""Decode attention with the KV cache in host memory: ANCHORS.md's table, every column from one run.

    python3 bench/decode_attention.py --out /tmp/da            # the H200 machine: ANCHORS sizes, < 3 min
    python3 bench/decode_attention.py --smoke --out /tmp/das   # any machine: tiny sizes, CPU columns only
    python3 bench/decode_attention.py --cpu-only --sizes 1x131072,4x32768   # a CPU box at real sizes

One layer, q [b, 32, 1, 128], K/V [b, 8, T, 128] bf16 (GQA 4), ms per call (synchronized wall clock, median of
--reps after a warm-up, each row time-boxed by --row-limit), q and the output on the GPU when there is one:
  gpu_resident   torch SDPA (enable_gqa) with K/V on the GPU
  streamed       K/V copied from pinned host memory, then SDPA
  cpu_sdpa       torch SDPA on the CPU (q to the host, the output back)
  fuse_cpu       fuse's fused CPU kernel (runtime/cpu_attention.py), q there and the output back; its read rate
                 (kernel alone, q on the host) against a host copy and a plain read measured in the same run
  fuse_split     runtime/split_attention.py: the CPU kernel on [0, split) while [split, T) streams to the GPU,
                 merged by log-sum-exp; split from passes/cost_attention.choose_split with this run's profile
                 (host copy, link, and the shared-DRAM rate measured with this kernel and a DMA at once)
                 (fuse_split_inline: the CPU part on the calling thread once the GPU side is queued)
  split_sweep    the same at fixed CPU fractions; the best of them shows how near the model's choice is
Host caches rotate through copies adding up to twice the L3 and GPU ones through two copies (> L2), as decode
steps of many layers see them. Without CUDA the GPU columns are skipped; the split runs both parts on the CPU.
"""
import argparse
import ctypes
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fusebackend.passes.cost_attention import CPU_ATTENTION_EFFICIENCY, choose_split  # noqa: E402
from fusebackend.passes.cost_model import shared_bw_from_overlap  # noqa: E402
from fusebackend.passes.hardware_profile import reference_h200  # noqa: E402
from fusebackend.runtime import cpu_compiler  # noqa: E402
from fusebackend.runtime.cpu_attention import decode_attention  # noqa: E402
from fusebackend.runtime.hardware import last_level_cache_bytes  # noqa: E402
from fusebackend.runtime.split_attention import SplitAttention  # noqa: E402
from timing import base_info, gpu_state  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
# ANCHORS.md, H200 machine, 2026-12-01: (batch, context) -> resident, streamed, cpu_sdpa ms, target ms
ANCHORS = {(1, 32768): (0.075, 2.55, 4.98, 1.5), (4, 32768): (0.167, 9.97, 31.64, 6.0),
           (16, 8192): (0.163, 9.97, 23.13, 6.0), (1, 131072): (0.174, 9.95, 40.76, 6.0)}
SMOKE = [(1, 2048), (2, 1000)]
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)

READ_SRC = r'''
#pragma GCC optimize("associative-math", "no-signed-zeros")
#include <stdint.h>
extern "C" float fb_bench_read(const float* __restrict p, int64_t n, int nt) {
  float s = 0;
  #pragma omp parallel for simd reduction(+:s) num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}
'''


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--out", help="write PREFIX.txt and PREFIX.json")
    a("--smoke", action="store_true", help="tiny sizes (any machine, seconds)")
    a("--cpu-only", action="store_true", help="skip the GPU columns even with CUDA")
    a("--sizes", help="BxT,... (default: the ANCHORS rows, or tiny ones with --smoke)")
    a("--reps", type=int, default=9)
    a("--row-limit", type=float, default=25.0, help="seconds per row (each column gets its share)")
    a("--threads", type=int, default=os.cpu_count())
    a("--split-threads", type=int, default=None, help="CPU threads of the split's kernel (default: --threads)")
    a("--sweep", default=",".join(map(str, SWEEP)), help="CPU fractions of the split sweep ('' = none)")
    args = p.parse_args()
    if args.sizes:
        args.sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    else:
        args.sizes = SMOKE if args.smoke else list(ANCHORS)
    args.sweep = [float(f) for f in args.sweep.split(",") if f.strip()]
    if args.smoke:
        args.reps = min(args.reps, 5)
    return args


class Clock:
    def __init__(self, cuda):
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def ms(self, fn, reps, max_s, warmup=2):
        """Median ms over up to `reps` synchronized calls after `warmup`; no new call after max_s (>= 3 calls)."""
        for _ in range(warmup):
            fn()
        self.sync()
        ts, end = [], time.perf_counter() + max_s
        while len(ts) < reps and (len(ts) < 3 or time.perf_counter() < end):
            t0 = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3


def host_rates(args, clock, cuda):
    """Host copy (read + write), a plain OpenMP read, and pinned link rates, bytes/s."""
    n = (64 << 20) if args.smoke else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    out = {"copy_bytes": n, "host_copy": 2 * n / (clock.ms(lambda: b.copy_(a), 5, 10) * 1e-3)}
    lib = cpu_compiler.build(READ_SRC, "fb_bench_read")
    fn = lib.fb_bench_read
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_float
    out["host_read"] = n / (clock.ms(lambda: fn(a.data_ptr(), n // 4, args.threads), 5, 10) * 1e-3)
    b = None
    if cuda:
        pa = torch.empty(n // 2, dtype=torch.uint8).fill_(1).pin_memory()
        dv = torch.empty(n // 2, dtype=torch.uint8, device="cuda")
        out["h2d"] = n / 2 / (clock.ms(lambda: dv.copy_(pa, non_blocking=True), 5, 10) * 1e-3)
        out["d2h"] = n / 2 / (clock.ms(lambda: pa.copy_(dv, non_blocking=True), 5, 10) * 1e-3)
    return out


def contention(args, clock, kv, q_host, kv_bytes):
    """The fused kernel and a host->device copy of as many bytes, alone and at once: the shared-DRAM rate."""
    src = torch.empty(kv_bytes, dtype=torch.uint8).fill_(1).pin_memory()
    dst = torch.empty(kv_bytes, dtype=torch.uint8, device="cuda")
    k, v = kv[0]

    def cpu():
        decode_attention(q_host, k, v, threads=args.threads)

    def dma():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    c_alone, d_alone = clock.ms(cpu, 5, 8) * 1e-3, clock.ms(dma, 5, 8) * 1e-3
    both = []
    for _ in range(5):
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("c", _timed(cpu)))
        th.start()
        d = _timed(dma)
        th.join()
        both.append((box["c"], d))
    c_t = statistics.median(c for c, _ in both)
    d_t = statistics.median(d for _, d in both)
    shared = shared_bw_from_overlap(kv_bytes, c_alone, c_t, kv_bytes, d_alone, d_t)
    return {"cpu_alone_ms": c_alone * 1e3, "dma_alone_ms": d_alone * 1e3, "cpu_together_ms": c_t * 1e3,
            "dma_together_ms": d_t * 1e3, "shared_dram": shared, "bytes": kv_bytes}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_kv(B, T, llc, cuda):
    kv_bytes = 2 * B * HKV * T * D * 2
    n = max(1, min(16, math.ceil(max(2 * llc, 1.2e9 if llc else 0) / kv_bytes)))
    g = torch.Generator().manual_seed(B * 1000003 + T)
    base = [torch.randn(B, HKV, T, D, generator=g).to(DT) for _ in range(2)]
    host = []
    for i in range(n):
        k, v = (base[0], base[1]) if i == 0 else (base[0].clone(), base[1].clone())
        host.append((k.pin_memory(), v.pin_memory()) if cuda else (k, v))
    return host, kv_bytes


def rel_err(out, ref):
    return ((out.float().cpu() - ref.float()).norm() / ref.float().norm()).item()


def run_row(args, clock, cuda, B, T, llc, profile, rates):
    row = {"batch": B, "context": T}
    share = args.row_limit / 7
    host, kv_bytes = make_kv(B, T, llc, cuda)
    row["kv_mb"], row["host_copies"] = kv_bytes / 1e6, len(host)
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(7)
    q_host = torch.randn(B, HQ, 1, D, generator=g).to(DT)
    q = q_host.to(dev)
    it = iter(range(1 << 62))

    def nxt():
        return host[next(it) % len(host)]
    k0, v0 = host[0]
    ref = F.scaled_dot_product_attention(q_host.double(), k0.double(), v0.double(), enable_gqa=True)

    def cell(name, fn, check=None):
        try:
            if check is not None:
                err = rel_err(check(), ref)
                row[name + "_err"] = err
                if err > 2e-2:
                    raise AssertionError("%s is wrong: relative error %.3g" % (name, err))
            row[name] = clock.ms(fn, args.reps, share)
        except Exception as e:            # one column failing leaves the others
            row[name + "_error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200])
    if cuda:
        gk = [(k0.to(dev), v0.to(dev)), (k0.to(dev).clone(), v0.to(dev).clone())]
        git = iter(range(1 << 62))

        def resident():
            k, v = gk[next(git) % 2]
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        cell("gpu_resident", resident, lambda: F.scaled_dot_product_attention(q, *gk[0], enable_gqa=True))
        kb, vb = torch.empty_like(gk[0][0]), torch.empty_like(gk[0][1])

        def streamed():
            k, v = nxt()
            kb.copy_(k, non_blocking=True)
            vb.copy_(v, non_blocking=True)
            return F.scaled_dot_product_attention(q, kb, vb, enable_gqa=True)
        cell("streamed", streamed, streamed)
        del gk, kb, vb

    def cpu_sdpa():
        k, v = nxt()
        return F.scaled_dot_product_attention(q.to("cpu"), k, v, enable_gqa=True).to(dev)
    cell("cpu_sdpa", cpu_sdpa, lambda: F.scaled_dot_product_attention(q_host, k0, v0, enable_gqa=True))

    def fuse_cpu():
        k, v = nxt()
        return decode_attention(q.to("cpu"), k, v, threads=args.threads).to(dev)
    cell("fuse_cpu", fuse_cpu, lambda: decode_attention(q_host, k0, v0, threads=args.threads))

    def kernel():
        k, v = nxt()
        return decode_attention(q_host, k, v, threads=args.threads)
    cell("fuse_kernel", kernel)
    if row.get("fuse_kernel"):
        row["kernel_gbps"] = kv_bytes / (row["fuse_kernel"] * 1e-3) / 1e9
        row["kernel_vs_copy"] = row["kernel_gbps"] * 1e9 / rates["host_copy"]
        row["kernel_vs_read"] = row["kernel_gbps"] * 1e9 / rates["host_read"]
    sa = SplitAttention(threads=args.split_threads or args.threads)
    try:
        def split_at(s):
            def f():
                k, v = nxt()
                return sa(q, k, v, s)
            return f
        plan = choose_split(profile, B, HQ, HKV, T, D, DT)
        if not cuda:          # both parts on the CPU: the model's GPU choice means nothing here; exercise the path
            plan = dataclasses.replace(plan, split=T // 128 * 64, streamed=T - T // 128 * 64)
            row["split_note"] = "no CUDA: both parts on the CPU, the split at half the context"
        ref_plan = choose_split(reference_h200(), B, HQ, HKV, T, D, DT)
        row.update(split=plan.split, split_fraction=plan.cpu_fraction, split_predicted=plan.predicted_s * 1e3,
                   split_ref_fraction=ref_plan.cpu_fraction, split_ref_predicted=ref_plan.predicted_s * 1e3,
                   cpu_only_predicted=plan.cpu_only_s * 1e3, streamed_only_predicted=plan.streamed_only_s * 1e3)
        cell("fuse_split", split_at(plan.split), lambda: sa(q, k0, v0, plan.split))
        sa_inline = SplitAttention(threads=args.split_threads or args.threads, inline_cpu=True)

        def inline():
            k, v = nxt()
            return sa_inline(q, k, v, plan.split)
        cell("fuse_split_inline", inline, lambda: sa_inline(q, k0, v0, plan.split))
        sweep = {}
        for f in args.sweep:
            s = int(round(f * T / 64)) * 64
            s = min(max(s, 0), T)
            name = "sweep_%g" % f
            cell(name, split_at(s))
            if row.get(name) is not None:
                sweep[f] = row[name]
        if sweep:
            best = min(sweep, key=sweep.get)
            row["sweep_best_fraction"], row["sweep_best"] = best, sweep[best]
    finally:
        sa.close()
    if (B, T) in ANCHORS:
        a = ANCHORS[(B, T)]
        row.update(anchor_resident=a[0], anchor_streamed=a[1], anchor_cpu_sdpa=a[2], target=a[3])
    host = None
    return row


def fmt(v, f="%.3f"):
    return "-" if v is None else f % v


def table(info, rows):
    lines = ["Decode attention, one layer, q [b, 32, 1, 128], K/V [b, 8, T, 128] bf16 (GQA), ms per call (median of "
             "%d, synchronized wall clock)" % info["reps"],
             "machine: %s; %s; %d threads; torch %s%s" % (info.get("gpu") or "no GPU", info["cpu"], info["threads"],
                                                         info["torch"], "; git " + info["git_commit"]
                                                         if info.get("git_commit") else ""),
             "host copy %.1f GB/s (read + write), plain read %.1f GB/s%s%s" % (
                 info["host_copy"] / 1e9, info["host_read"] / 1e9,
                 "; pinned h2d %.1f GB/s, d2h %.1f GB/s" % (info["h2d"] / 1e9, info["d2h"] / 1e9) if "h2d" in info
                 else "",
                 "; shared DRAM (fuse kernel + DMA at once) %.1f GB/s" % (info["contention"]["shared_dram"] / 1e9)
                 if info.get("contention") else ""),
             "",
             "| batch | context | KV MB | GPU-resident | KV streamed from pinned | torch SDPA on the CPU "
             "| fuse CPU kernel | kernel read GB/s (x copy, x read) | fuse split (CPU share) "
             "| best swept split (share) | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gb = ("%.1f (%.2f, %.2f)" % (r["kernel_gbps"], r["kernel_vs_copy"], r["kernel_vs_read"])
              if r.get("kernel_gbps") else "-")
        split = ("%s (%.2f)" % (fmt(r.get("fuse_split")), r["split_fraction"]) if r.get("fuse_split") is not None
                 else ("ERROR" if "fuse_split_error" in r else "-"))
        sweep = ("%s (%.2f)" % (fmt(r["sweep_best"]), r["sweep_best_fraction"]) if r.get("sweep_best") is not None
                 else "-")
        cells = [str(r["batch"]), str(r["context"]), "%.0f" % r["kv_mb"]]
        for k in ("gpu_resident", "streamed", "cpu_sdpa", "fuse_cpu"):
            cells.append(fmt(r.get(k)) if r.get(k) is not None else ("ERROR" if k + "_error" in r else "-"))
        cells += [gb, split, sweep, "<=%.1f" % r["target"] if r.get("target") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("fuse CPU kernel alone (q on the host), ms: " + ", ".join(
        "b%d/T%d %s" % (r["batch"], r["context"], fmt(r.get("fuse_kernel"))) for r in rows))
    lines.append("fuse split with the CPU part on the calling thread (inline_cpu), ms: " + ", ".join(
        "b%d/T%d %s" % (r["batch"], r["context"], fmt(r.get("fuse_split_inline"))) for r in rows))
    lines.append("split predicted (this run's profile) ms: " + ", ".join(
        "b%d/T%d %s at share %.2f (CPU only %s, streamed only %s)" % (
            r["batch"], r["context"], fmt(r.get("split_predicted")), r.get("split_fraction", 0),
            fmt(r.get("cpu_only_predicted")), fmt(r.get("streamed_only_predicted"))) for r in rows))
    lines.append("split share the reference H200 profile picks: " + ", ".join(
        "b%d/T%d %.2f" % (r["batch"], r["context"], r.get("split_ref_fraction", 0)) for r in rows))
    sw = [r for r in rows if any(k.startswith("sweep_0") or k.startswith("sweep_1") for k in r)]
    if sw:
        lines.append("split sweep (CPU share: ms): " + "; ".join(
            "b%d/T%d " % (r["batch"], r["context"]) + " ".join(
                "%s:%s" % (k[6:], fmt(r[k])) for k in sorted(r) if k.startswith("sweep_") and k[6:7].isdigit()
                and not k.endswith("_error")) for r in sw))
    anch = [r for r in rows if r.get("anchor_resident") is not None]
    if anch:
        lines.append("ANCHORS (2026-12-01) for comparison, resident / streamed / CPU SDPA ms: " + ", ".join(
            "b%d/T%d %.3f / %.2f / %.2f" % (r["batch"], r["context"], r["anchor_resident"], r["anchor_streamed"],
                                             r["anchor_cpu_sdpa"]) for r in anch))
    if info.get("contention"):
        c = info["contention"]
        lines.append("contention (%.0f MB each): fuse kernel alone %.2f ms, DMA alone %.2f ms; at once %.2f / %.2f ms"
                     % (c["bytes"] / 1e6, c["cpu_alone_ms"], c["dma_alone_ms"], c["cpu_together_ms"],
                        c["dma_together_ms"]))
    errs = [(r["batch"], r["context"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    for b, t, k, v in errs:
        lines.append("ERROR b%d/T%d %s: %s" % (b, t, k[:-6], v))
    return "\n".join(lines)


def main():
    args = parse()
    cuda = torch.cuda.is_available() and not args.cpu_only
    torch.set_num_threads(args.threads)
    clock = Clock(cuda)
    info = base_info("decode_attention.py")
    info.update(reps=args.reps, threads=args.threads, split_threads=args.split_threads or args.threads,
                gpu=torch.cuda.get_device_name() if cuda else None, gpu_state_start=gpu_state() if cuda else None,
                load_avg=os.getloadavg(), kernel_efficiency_assumed=CPU_ATTENTION_EFFICIENCY)
    llc = max(last_level_cache_bytes(), 300 << 20)     # the VMs report no L3 in sysfs; lscpu says 300 MiB
    info["llc_bytes"] = llc
    t0 = time.perf_counter()
    with torch.no_grad():
        rates = host_rates(args, clock, cuda)
        info.update(rates)
        profile = reference_h200().replace(cpu_mem_bw=rates["host_copy"], cpu_threads=args.threads,
                                           name="this run (reference H200 with measured host/link rates)")
        if cuda:
            profile = profile.replace(h2d_bw=rates["h2d"], d2h_bw=rates["d2h"])
            B, T = max(args.sizes, key=lambda s: s[0] * s[1])
            host, kv_bytes = make_kv(B, T, 0, True)
            info["contention"] = contention(args, clock, host, torch.randn(B, HQ, 1, D).to(DT), kv_bytes)
            profile = profile.replace(shared_dram_bw=info["contention"]["shared_dram"])
            del host
        else:
            # no link to share DRAM with: keep the reference's ratio of shared to (CPU + link)
            ref = reference_h200()
            profile = profile.replace(shared_dram_bw=ref.shared_dram_bw / (ref.cpu_mem_bw + ref.h2d_bw)
                                      * (rates["host_copy"] + profile.h2d_bw))
        info["profile"] = profile.to_dict()
        rows = []
        for B, T in args.sizes:
            rows.append(run_row(args, clock, cuda, B, T, llc, profile, rates))
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
                  flush=True)
    info["seconds"] = time.perf_counter() - t0
    if cuda:
        info["gpu_state_end"] = gpu_state()
    text = table(info, rows)
    print(text)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(d, exist_ok=True)
        with open(args.out + ".txt", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
