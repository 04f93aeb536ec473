"""Placement cost model, predicted vs measured, on the machine it runs on (meant for the H200 machine).

    python3 bench/cost_model_check.py --out /tmp/cost_check.json      # GPU machine, < 120 s
    python3 bench/cost_model_check.py --cpu-only --out /tmp/c.json    # any machine: CPU parts, shrunken shapes

Cases (bf16, random inputs, one warm-up, median of several synchronized wall-clock runs, as ANCHORS.md times):
  expert      one SwiGLU expert, H=4096 F=14336 (Mixtral-8x7B), at 1/4/16/64 tokens:
              gpu_resident | transfer (pinned -> device) | streamed (transfer, then compute) |
              cpu (x to the host, torch matmuls on the CPU, y back)
  attention   decode, q [b,32,1,128], K/V [b,8,T,128] at (b,T) = (1,8192) (1,32768) (4,32768) (16,8192)
              (1,131072): gpu_resident | streamed | cpu_fuse (fuse's CPU decode-attention kernel, what the model
              prices) | cpu_matmul (q.K^T, softmax, P.V in torch) and cpu_sdpa (torch's CPU SDPA), for reference
  contention  a CPU expert at 1 token while another expert streams, against cost_model.overlap_time
Weights and caches rotate through copies larger than the caches (GPU L2, CPU L3), as real decode steps see them.
Each prediction is made twice: from runtime.hardware.load_profile() (this machine, measured and cached) and from
reference_h200(). Error = predicted / measured - 1. cpu_matmul and cpu_sdpa are reported but left out of the summary.
"""
import argparse
import json
import math
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fusebackend.passes.cost_model import attention_cost, expert_cost, overlap_time  # noqa: E402
from fusebackend.passes.hardware_profile import reference_h200  # noqa: E402
from fusebackend.runtime import hardware  # noqa: E402
from fusebackend.runtime.cpu_attention import decode_attention  # noqa: E402

BF16 = torch.bfloat16
GPU_L2 = 60 << 20


def ffn(x, w):
    return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])


def wall(fn, reps, sync):
    """Median seconds of fn() over `reps` runs after one warm-up, synchronized before and after each."""
    fn()
    sync()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copies_for(nbytes, cache_bytes, most=24):
    return max(1, min(most, math.ceil(2 * cache_bytes / max(nbytes, 1))))


class Check:
    def __init__(self, args):
        self.cuda = torch.cuda.is_available() and not args.cpu_only
        self.dev = "cuda" if self.cuda else "cpu"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.t0, self.budget = time.perf_counter(), args.budget_s
        self.cases, self.skipped = [], []
        self.ref = reference_h200()
        self.prof = hardware.cached_profile(refresh=True) if args.remeasure else hardware.load_profile(args.profile)
        self.llc = hardware.last_level_cache_bytes()
        self.quick = not self.cuda         # CPU-only: shapes shrunk so the check takes seconds
        self.reps = 3 if self.quick else 7
        self.most_copies = 4 if self.quick else 24

    def left(self):
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, kind, shape, variant, measured, predict, summary=True):
        row = {"kind": kind, "shape": shape, "variant": variant, "measured_s": measured, "summary": summary}
        for tag, prof in (("measured_profile", self.prof), ("reference", self.ref)):
            p = predict(prof)
            row["predicted_%s_s" % tag], row["error_%s" % tag] = p, p / measured - 1
        self.cases.append(row)
        print("%-10s %-22s %-13s measured %9.3f ms  predicted %9.3f ms (%+6.1f%%)  reference %9.3f ms (%+6.1f%%)"
              % (kind, shape, variant, measured * 1e3, row["predicted_measured_profile_s"] * 1e3,
                 100 * row["error_measured_profile"], row["predicted_reference_s"] * 1e3, 100 * row["error_reference"]),
              flush=True)

    def rand(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.dev, dtype=BF16) * scale)

    def host(self, t, pinned):
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned and self.cuda)
        h.copy_(t)
        return h

    # ---------------------------------------------------------------- experts
    def experts(self):
        H, FF = (1024, 3584) if self.quick else (4096, 14336)
        mats = [(FF, H), (FF, H), (H, FF)]
        w_dev = [self.rand(*s, scale=0.02) for s in mats]
        n_cpu = copies_for(3 * H * FF * 2, self.llc, self.most_copies)
        w_cpu = [[self.host(w, False) for w in w_dev] for _ in range(n_cpu)]
        if self.cuda:
            w_pin = [self.host(w, True) for w in w_dev]
            buf = [torch.empty_like(w) for w in w_dev]
        shape = "H%d F%d" % (H, FF)
        for t in (1, 4, 16, 64):
            if self.left() < 10:
                self.skipped.append("expert t=%d: time box" % t)
                continue
            x = self.rand(t, H)
            cost = lambda p, t=t: expert_cost(p, t, H, FF, BF16)  # noqa: E731
            if self.cuda:
                self.add("expert", shape + " t%d" % t, "gpu_resident", wall(lambda: ffn(x, w_dev), self.reps,
                                                                             self.sync),
                         lambda p: cost(p).gpu_resident_s)

                def copy():
                    for b, w in zip(buf, w_pin):
                        b.copy_(w, non_blocking=True)
                if t == 1:
                    self.add("expert", shape, "transfer", wall(copy, self.reps, self.sync),
                             lambda p: cost(p).transfer_s)
                self.add("expert", shape + " t%d" % t, "streamed", wall(lambda: (copy(), ffn(x, buf)), self.reps,
                                                                         self.sync),
                         lambda p: cost(p).gpu_streamed_s)
            it = iter(range(10**9))

            def on_cpu():          # as the hybrid runtime would: x to the host, compute there, y back
                xc = x.to("cpu")
                y = ffn(xc, w_cpu[next(it) % len(w_cpu)])
                return y.to(self.dev)
            self.add("expert", shape + " t%d" % t, "cpu", wall(on_cpu, self.reps, self.sync),
                     lambda p: cost(p).cpu_s)
        if self.cuda and self.left() > 10:
            self.contention(w_cpu, w_pin, buf, H, FF)

    def contention(self, w_cpu, w_pin, buf, H, FF):
        x = torch.randn(1, H, dtype=BF16)
        stream, it = torch.cuda.Stream(), iter(range(10**9))

        def cpu():
            t0 = time.perf_counter()
            ffn(x, w_cpu[next(it) % len(w_cpu)])
            return time.perf_counter() - t0

        def link():
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                for b, w in zip(buf, w_pin):
                    b.copy_(w, non_blocking=True)
            stream.synchronize()
            return time.perf_counter() - t0
        cpu(), link()
        c_alone = statistics.median(cpu() for _ in range(self.reps))
        d_alone = statistics.median(link() for _ in range(self.reps))
        both = []
        for _ in range(self.reps):
            got, barrier = {}, threading.Barrier(2)
            th = threading.Thread(target=lambda: (barrier.wait(), got.__setitem__("c", cpu())))
            th.start()
            barrier.wait()
            d = link()
            th.join()
            both.append((got["c"], d))
        shape = "H%d F%d t1" % (H, FF)
        bytes_ = 3 * H * FF * 2

        def alone(p):
            c = expert_cost(p, 1, H, FF, BF16)
            # this CPU side is the bare matmuls: no activation copies or syncs
            return c.weight_bytes / p.cpu_gemv_bw["bfloat16"] + c.flops / p.cpu_gemm_flops["bfloat16"], c.transfer_s

        def pred(p, side):
            return overlap_time(bytes_, alone(p)[0], bytes_, alone(p)[1], p)[side]
        self.add("contention", shape, "cpu_alone", c_alone, lambda p: alone(p)[0])
        self.add("contention", shape, "dma_alone", d_alone, lambda p: alone(p)[1])
        self.add("contention", shape, "cpu_together", statistics.median(c for c, _ in both), lambda p: pred(p, 0))
        self.add("contention", shape, "dma_together", statistics.median(d for _, d in both), lambda p: pred(p, 1))

    # ---------------------------------------------------------------- attention
    def attention(self):
        cases = [(1, 8192), (1, 32768), (4, 32768), (16, 8192), (1, 131072)]
        for b, T in cases:
            if self.quick:
                T //= 16
            kv_bytes = 2 * b * 8 * T * 128 * 2
            if self.left() < 12 + kv_bytes / 2e9:
                self.skipped.append("attention b=%d T=%d: time box" % (b, T))
                continue
            shape = "b%d T%d" % (b, T)
            cost = lambda p, b=b, T=T: attention_cost(p, b, 32, 8, T, 128, BF16)  # noqa: E731
            q = self.rand(b, 32, 1, 128)
            kv = [(self.rand(b, 8, T, 128), self.rand(b, 8, T, 128))
                  for _ in range(copies_for(kv_bytes, GPU_L2) if self.cuda else 1)]
            host = [(self.host(k, True), self.host(v, True)) for k, v in kv[:1]]
            while len(host) < copies_for(kv_bytes, self.llc, self.most_copies):
                host.append((self.host(kv[0][0], True), self.host(kv[0][1], True)))
            it = iter(range(10**9))
            if self.cuda:
                def resident():
                    k, v = kv[next(it) % len(kv)]
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                self.add("attention", shape, "gpu_resident", wall(resident, self.reps, self.sync),
                         lambda p: cost(p).gpu_resident_s)
                kb, vb = torch.empty_like(kv[0][0]), torch.empty_like(kv[0][1])

                def streamed():
                    k, v = host[next(it) % len(host)]
                    kb.copy_(k, non_blocking=True)
                    vb.copy_(v, non_blocking=True)
                    return F.scaled_dot_product_attention(q, kb, vb, enable_gqa=True)
                self.add("attention", shape, "streamed", wall(streamed, self.reps, self.sync),
                         lambda p: cost(p).gpu_streamed_s)

            def cpu_matmul():
                k, v = host[next(it) % len(host)]
                qc = q.to("cpu").view(b, 8, 4, 128)
                s = torch.matmul(qc, k.transpose(-1, -2)) * (128 ** -0.5)
                o = torch.matmul(torch.softmax(s.float(), -1).to(BF16), v)
                return o.view(b, 32, 1, 128).to(self.dev)

            def cpu_sdpa():
                k, v = host[next(it) % len(host)]
                return F.scaled_dot_product_attention(q.to("cpu"), k, v, enable_gqa=True).to(self.dev)
            ref = F.scaled_dot_product_attention(q.to("cpu"), *host[0], enable_gqa=True).float()
            it = iter(range(10**9))              # cpu_matmul's first call reads host[0]
            err = ((cpu_matmul().float().cpu() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, "cpu_matmul attention is wrong: rel err %.3g" % err
            self.add("attention", shape, "cpu_matmul", wall(cpu_matmul, self.reps, self.sync),
                     lambda p: cost(p).cpu_s, summary=False)

            def cpu_fuse():                      # fuse's CPU decode-attention kernel: what the model prices
                k, v = host[next(it) % len(host)]
                return decode_attention(q.to("cpu"), k, v).to(self.dev)
            self.add("attention", shape, "cpu_fuse", wall(cpu_fuse, self.reps, self.sync), lambda p: cost(p).cpu_s)
            self.add("attention", shape, "cpu_sdpa", wall(cpu_sdpa, max(2, self.reps // 2), self.sync),
                     lambda p: cost(p).cpu_s, summary=False)
            del kv, host, q

    def summary(self):
        out = {}
        for tag in ("measured_profile", "reference"):
            for group in ("all", "gpu", "cpu"):
                errs = [r["error_%s" % tag] for r in self.cases if r["summary"] and
                        (group == "all" or (group == "cpu") == r["variant"].startswith("cpu"))]
                if errs:
                    out["%s/%s" % (tag, group)] = {"n": len(errs), "mean_abs": statistics.mean(map(abs, errs)),
                                                   "worst": max(errs, key=abs)}
        for k, v in out.items():
            print("%-26s n=%2d  mean |error| %5.1f%%  worst %+6.1f%%" % (k, v["n"], 100 * v["mean_abs"],
                                                                       100 * v["worst"]))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--cpu-only", action="store_true", help="CPU parts only, shapes shrunk (quick)")
    ap.add_argument("--budget-s", type=float, default=115.0, help="time box for the whole run")
    ap.add_argument("--profile", default=None, help="hardware_profile spec (default: this machine, cached)")
    ap.add_argument("--remeasure", action="store_true", help="measure this machine's profile again first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)     # before the profile: it is measured (and cached) per thread count
    torch.manual_seed(0)
    c = Check(args)
    print("device %s, torch %s, %d CPU threads; profile %r (%.1f s so far)" % (
        torch.cuda.get_device_name() if c.cuda else "cpu", torch.__version__, torch.get_num_threads(),
        c.prof.name, time.perf_counter() - c.t0), flush=True)
    with torch.no_grad():
        c.experts()
        c.attention()
    for s in c.skipped:
        print("skipped:", s)
    result = {"info": {"torch": torch.__version__, "cuda": c.cuda, "threads": torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name() if c.cuda else None, "quick_shapes": c.quick,
                       "elapsed_s": time.perf_counter() - c.t0},
              "profile": c.prof.to_dict(), "cases": c.cases, "skipped": c.skipped, "summary": c.summary()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
