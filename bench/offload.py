"""Offload benchmark: a Mixtral-8x7B-shaped model whose experts exceed the GPU budget; all strategies, one run.

    python3 bench/offload.py --out DIR [--layers 4 --budgets 0.25,0.5,1 --batches 1,4,16,64 --prefill 512]
    python3 bench/offload.py --quick --out /tmp/q    # tiny shapes; without CUDA only gpu_all (on the CPU), cpu_nonres

Per layer: GQA attention at real width over a KV cache (decode rows; the prefill row is causal over its prompt),
then 8 SwiGLU experts (H 4096, F 14336, bf16, top-2), Zipf routing under a per-layer permutation. A budget holds
that fraction of all expert bytes: each layer's most popular experts stay resident, the same for every strategy.
gpu_all (HF's eager loop, all resident: the ceiling and the reference), accelerate (dispatch_model, max_memory),
pinned (streamed, double-buffered), cpu_nonres (CPU after GPU), static_split (a CPU thread, concurrent), fuse.
"""
import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fusebackend.runtime.cpu_worker import PINS, CudaApi, StagingPool, expert_ffn  # noqa: E402
from fusebackend.runtime.cost_correction import CostCorrection  # noqa: E402
from fusebackend.runtime.hybrid_moe import HybridMoELayer  # noqa: E402
from offload_report import fuse_stats, plot, table, timeline_table  # noqa: E402
from timing import base_info, wall_ms  # noqa: E402

FULL = dict(H=4096, F=14336, E=8, K=2, nh=32, kvh=8, hd=128)
QUICK = dict(H=64, F=256, E=8, K=2, nh=4, kvh=2, hd=16)
STRATEGIES = ["gpu_all", "accelerate", "pinned", "cpu_nonres", "static_split", "fuse"]
CUDA_ONLY = {"accelerate", "pinned", "static_split", "fuse"}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--out", required=True), a("--quick", action="store_true"), a("--layers", type=int)
    a("--budgets", default="0.25,0.5,1"), a("--batches"), a("--prefill", type=int), a("--context", type=int)
    a("--steps", type=int, default=6, help="timed steps per cell"), a("--warmup", type=int, default=2)
    a("--time-limit", type=float, default=290.0), a("--cell-limit", type=float, default=12.0)
    a("--strategies", default=",".join(STRATEGIES)), a("--prefetch", type=int, default=2)
    a("--prefetch-gate", type=int, default=1, help="fuse prefetches only what prefetch_gain says pays (1), or "
                                                   "the --prefetch most likely experts unconditionally (0)")
    a("--learn", type=int, default=1, help="fuse learns measured costs (1) or trusts the profile (0)")
    a("--trace", type=int, default=1, help="fuse records per-call traces in the warm-up steps (1; its "
                                          "predicted-vs-measured columns); the timed steps run untraced")
    a("--fast-path", default="auto", choices=["auto", "grouped", "dense", "sorted"],
      help="how the executor runs an all-resident layer (HybridMoELayer fast_path; the 100%% budget)")
    a("--share-experts", action="store_true", help="8 distinct experts reused by every layer (host memory)")
    a("--profile", default=None, help="hardware profile: none = this machine (cached), reference-h200, a JSON")
    a("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2)), a("--seed", type=int, default=0)
    args = p.parse_args()
    for k, full, quick in (("layers", 4, 2), ("batches", "1,4,16,64", "1,4"), ("prefill", 512, 16),
                           ("context", 4096, 32)):
        setattr(args, k, getattr(args, k) if getattr(args, k) is not None else quick if args.quick else full)
    args.budgets, args.batches = [float(b) for b in args.budgets.split(",")], [int(b) for b in args.batches.split(",")]
    args.strategies = args.strategies.split(",")
    args.steps, args.warmup = (min(args.steps, 2), 1) if args.quick else (args.steps, args.warmup)
    return args


class Ctx:
    """The model: attention weights on the device; experts homed on the host (pinned in place once, shared by
    every strategy and, with --share-experts, by every layer), their device copies for gpu_all; popularity."""

    def __init__(self, args):
        self.args, self.s, self.cuda = args, QUICK if args.quick else FULL, torch.cuda.is_available()
        self.dev, self.sync = torch.device("cuda" if self.cuda else "cpu"), torch.cuda.synchronize if self.cuda else (
            lambda: None)
        s, L, dt, g = self.s, args.layers, torch.bfloat16, torch.Generator(self.dev).manual_seed(args.seed)
        rnd = lambda *sh: torch.randn(*sh, generator=g, device=self.dev, dtype=dt) * sh[-1] ** -0.5  # noqa: E731
        one = lambda: torch.ones(s["H"], device=self.dev, dtype=dt)                                   # noqa: E731
        qd, kd = s["nh"] * s["hd"], s["kvh"] * s["hd"]
        self.attn = [dict(wq=rnd(qd, s["H"]), wk=rnd(kd, s["H"]), wv=rnd(kd, s["H"]), wo=rnd(s["H"], qd), n1=one(),
                          n2=one()) for _ in range(L)]
        n = 1 if args.share_experts else L
        dev_w = [[(rnd(s["F"], s["H"]), rnd(s["F"], s["H"]), rnd(s["H"], s["F"])) for _ in range(s["E"])]
                 for _ in range(n)]
        host = [[tuple(PINS.pin(t.cpu()) if self.cuda else t.cpu() for t in ws) for ws in lay] for lay in dev_w]
        self.host, self.dev_w = [host[i % n] for i in range(L)], [dev_w[i % n] for i in range(L)]
        self.expert_bytes = 3 * s["F"] * s["H"] * 2
        self.perm = [torch.randperm(s["E"], generator=torch.Generator().manual_seed(100 + i)).tolist()
                     for i in range(L)]
        zipf = torch.tensor([1.0 / (j + 1) for j in range(s["E"])])
        self.pop = [torch.empty(s["E"]).index_copy_(0, torch.tensor(p), zipf / zipf.sum()) for p in self.perm]

    def resident(self, frac):
        return [self.perm[i][:round(frac * self.s["E"])] for i in range(self.args.layers)]

    def steps(self, T, n, seed):
        """n steps of (x [T, H], per layer (idx [T, K], weights [T, K])) on the device, drawn before timing."""
        g, s, dev = torch.Generator().manual_seed(seed), self.s, self.dev
        rt = lambda pop: (torch.multinomial(pop.expand(T, -1), s["K"], generator=g).to(dev),      # noqa: E731
                          torch.randn(T, s["K"], generator=g).softmax(-1).to(dev, torch.bfloat16))
        return [(torch.randn(T, s["H"], generator=g).to(dev, torch.bfloat16), [rt(p) for p in self.pop])
                for _ in range(n)]


def hf_loop(x, idx, w, ws):
    """transformers 5.x MixtralExperts.forward: one_hot mask, the experts hit, index_add_ in the hidden dtype.
    ws[e]: (gate, up, down), a module (accelerate's), or None (expert e is left out)."""
    out, mask = torch.zeros_like(x), F.one_hot(idx, len(ws)).permute(2, 1, 0)
    for e in [e for e in (mask.sum((1, 2)) > 0).nonzero().flatten().tolist() if ws[e] is not None]:
        slot, tok = torch.where(mask[e])
        y = ws[e](x[tok]) if callable(ws[e]) else expert_ffn(x[tok], *ws[e])
        out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))
    return out


def attention(ctx, l, h, kv):
    s, a, T = ctx.s, ctx.attn[l], h.shape[0]
    x = F.rms_norm(h, (s["H"],), a["n1"])
    q, k, v = F.linear(x, a["wq"]), F.linear(x, a["wk"]), F.linear(x, a["wv"])
    if kv is None:       # prefill: one sequence, causal over its T tokens
        q, k, v = (t.view(1, T, -1, s["hd"]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:                # decode: T sequences, one new token each, over the cache (its last slot rewritten)
        kc, vc = kv[l]
        kc[:, :, -1:].copy_(k.view(T, -1, 1, s["hd"]))
        vc[:, :, -1:].copy_(v.view(T, -1, 1, s["hd"]))
        o = F.scaled_dot_product_attention(q.view(T, -1, 1, s["hd"]), kc, vc, enable_gqa=True)
    return h + F.linear(o.transpose(1, 2).reshape(T, -1), a["wo"])


def run_step(ctx, strat, step, kv, capture=None):
    h, routes = step
    for l, (idx, w) in enumerate(routes):
        h = attention(ctx, l, h, kv)
        x = F.rms_norm(h, (ctx.s["H"],), ctx.attn[l]["n2"])
        y = strat.moe(l, x, idx, w)
        if capture is not None:
            capture.append((l, x, idx, w, y))
        h = h + y
    return h


def fixed(where):
    """A fixed policy for fuse's executor: every non-resident routed expert streamed, or on the CPU."""
    def schedule(profile, experts, hidden, ffn, dtype, allow_split=True, link_busy_s=0.0):
        d = SimpleNamespace(cpu=[], streamed=[], resident=[], split=None)
        for e, _, res in experts:
            (d.resident if res else getattr(d, where)).append(e)
        return d
    return schedule


class Strategy:
    """One strategy's state under one budget; moe(l, x, idx, w) -> y. pinned and static_split are fixed policies
    on the executor fuse uses (same streams, staging, worker thread): what differs from fuse is the decision."""

    def __init__(self, name, ctx, frac):
        self.name, self.ctx, self.res, self.note = name, ctx, [set(r) for r in ctx.resident(frac)], ""
        if name == "gpu_all":
            self.gpu = ctx.dev_w
        elif name == "cpu_nonres":                              # its own resident copies, inside the budget
            self.gpu = [{e: tuple(t.clone() for t in ctx.dev_w[l][e]) for e in r} for l, r in enumerate(self.res)]
        elif name == "accelerate":
            self.model, self.note = build_accelerate(ctx, frac)
        else:
            api, prof, s = CudaApi(), None, ctx.s
            if name == "fuse":
                from fusebackend.runtime.hardware import load_profile
                prof = load_profile(ctx.args.profile)
                self.note = "profile: %s" % prof.name
            pool = None if name == "static_split" else StagingPool(api, s["H"], s["F"], torch.bfloat16, 2)
            sched = None if name == "fuse" else fixed("streamed" if name == "pinned" else "cpu")
            # fuse: one cost correction for every layer (same CPU, same link), learnt from the calls' timings
            corr = CostCorrection() if name == "fuse" else None
            self.layers = [HybridMoELayer(ctx.host[l], resident=sorted(r), profile=prof, scheduler=sched, api=api,
                                          staging=pool, staging_slots=0,
                                          trace=name == "fuse" and bool(ctx.args.trace),
                                          learn=name == "fuse" and bool(ctx.args.learn), correction=corr,
                                          fast_path=ctx.args.fast_path)
                           for l, r in enumerate(self.res)]              # one pool of two experts for all layers

    def moe(self, l, x, idx, w):
        ctx = self.ctx
        if self.name in ("gpu_all", "accelerate"):
            return hf_loop(x, idx, w, self.gpu[l] if self.name == "gpu_all" else list(self.model.layers[l]))
        if self.name != "cpu_nonres":
            nxt = self.layers[l + 1] if self.name == "fuse" and l + 1 < len(self.layers) else None
            cur, gate = self.layers[l], ctx.args.prefetch_gate      # gate: only copies that pay (prefetch_gain)
            pre = nxt and ctx.args.prefetch and (lambda: nxt.prefetch(nxt.likely(ctx.args.prefetch),
                                                                      until=cur.expected_end if gate else None))
            return self.layers[l](x, idx, w, after_issue=pre)    # prefetch: copies while l+1's attention runs
        E = range(ctx.s["E"])                            # the resident experts, then the others on the CPU
        y = hf_loop(x, idx, w, [self.gpu[l].get(e) for e in E])
        return y + hf_loop(x.cpu(), idx.cpu(), w.cpu(), [None if e in self.res[l] else ctx.host[l][e] for e in E]).to(
            x.device)

    def close(self):
        for lay in getattr(self, "layers", []):
            lay.close()
        self.__dict__.clear()


def build_accelerate(ctx, frac):
    """Experts as modules; accelerate places them under max_memory (GPU first, in module order) and its hooks
    copy the CPU-mapped ones to the GPU on every call, synchronously."""
    from accelerate import dispatch_model, infer_auto_device_map

    class Expert(torch.nn.Module):
        def __init__(self, g, u, d):
            super().__init__()
            self.gate, self.up, self.down = (torch.nn.Parameter(t, requires_grad=False) for t in (g, u, d))

        def forward(self, x):
            return expert_ffn(x, self.gate, self.up, self.down)

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.ModuleList(Expert(*ws) for ws in lay) for lay in ctx.host)
    budget = int(frac * ctx.args.layers * ctx.s["E"] * ctx.expert_bytes)
    dmap = infer_auto_device_map(model, max_memory={0: budget, "cpu": 400 << 30}, no_split_module_classes=["Expert"])
    model = dispatch_model(model, device_map=dmap, main_device=0)
    return model, "device_map: %d of %d modules on the GPU" % (sum(v == 0 for v in dmap.values()), len(dmap))


def measure_costs(ctx, max_tokens):
    """This run's per-expert costs, seconds: streaming one expert over the link; one expert on the CPU at t tokens."""
    host, link = ctx.host[0][1], None
    if ctx.cuda:
        cs, dst = torch.cuda.Stream(), [torch.empty_like(h, device=ctx.dev) for h in host]

        def copy():
            with torch.cuda.stream(cs):
                for d, h in zip(dst, host):
                    d.copy_(h, non_blocking=True)
        link = wall_ms(copy, ctx.sync, min_total=0.05, reps=3) / 1e3
    xs = {t: torch.randn(t, ctx.s["H"]).to(torch.bfloat16)
          for t in [4 ** i for i in range(6) if 4 ** i < max_tokens] + [max_tokens]}
    return link, {t: wall_ms(lambda: expert_ffn(x, *host), min_total=0.02, reps=3) / 1e3 for t, x in xs.items()}


def cpu_cost(cpu, t):
    """Piecewise linear between measured token counts; proportional beyond the last."""
    ks = sorted(cpu)
    return cpu[ks[-1]] * t / ks[-1] if t >= ks[-1] else float(np.interp(t, ks, [cpu[k] for k in ks]))


def bound_s(ctx, step, res, link, cpu, gpu_layer_s):
    """Whole-expert bound of one step: per layer, the non-resident routed experts split optimally between the
    CPU and the link, both fully overlapped with the GPU (at least the ceiling's per-layer time)."""
    total = 0.0
    for l, (idx, _) in enumerate(step[1]):
        cnt = torch.bincount(idx.flatten().cpu(), minlength=ctx.s["E"]).tolist()
        far = [c for e, c in enumerate(cnt) if c and e not in res[l]]
        best = min(max(sum(cpu_cost(cpu, c) for c, m in zip(far, mask) if m), link * (len(far) - sum(mask)))
                   for mask in itertools.product((0, 1), repeat=len(far)))
        total += max(best, gpu_layer_s)
    return total


def run_cell(ctx, strat, steps, kv, left):
    """(s per step, timed steps, max rel error of the MoE outputs vs gpu_all's on the same inputs, peak bytes)."""
    cap, t0, a = [], time.perf_counter(), ctx.args
    run_step(ctx, strat, steps[0], kv, cap)
    ctx.sync()
    first = max(time.perf_counter() - t0, 1e-6)
    err = max(((y.float() - ref).abs().max() / ref.abs().max()).item()
              for l, x, idx, w, y in cap for ref in [hf_loop(x, idx, w, ctx.dev_w[l]).float()])
    del cap
    n, times = max(1, min(a.steps, int((min(a.cell_limit, left) - first * (a.warmup + 1)) / first))), []
    traced = [lay for lay in getattr(strat, "layers", []) if lay.tracing]
    for i, st in enumerate(steps[1:1 + a.warmup + n]):  # warm-up steps, then the timed ones
        if i == a.warmup and ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        if i == a.warmup:                   # traces come from the warm-up steps: the timed ones run untraced
            for lay in traced:
                lay.tracing = False
        t0 = time.perf_counter()
        run_step(ctx, strat, st, kv)
        ctx.sync()
        times.append(time.perf_counter() - t0)
    for lay in traced:
        lay.tracing = True
    return statistics.median(times[a.warmup:]), n, err, torch.cuda.max_memory_allocated() if ctx.cuda else None


def report(ctx, rows, data, cells, link, cpu):
    """Per budget: ms per layer-step and tokens/s per strategy, the bound, fuse's prediction; errors, memory."""
    args, L, text, bounds, names = ctx.args, ctx.args.layers, [], {}, ctx.args.strategies
    total_gb = L * ctx.s["E"] * ctx.expert_bytes / 1e9
    for frac in args.budgets:
        res, ms_rows, tps, mem = [set(x) for x in ctx.resident(frac)], [], [], []
        for r, T in rows:
            got = {n: cells.get((None if n == "gpu_all" else frac, r, n)) for n in names}
            ceil, fz = cells.get((None, r, "gpu_all")), got.get("fuse")
            b = bounds[frac, r] = ceil and link and 1e3 / L * statistics.median(
                bound_s(ctx, stp, res, link, cpu, ceil["ms_layer"] / 1e3) for stp in data[r][1 + args.warmup:])
            ms = {n: c and c["ms_layer"] for n, c in got.items()}
            fixd = [v for n, v in ms.items() if v and n not in ("gpu_all", "fuse")]
            ms_rows.append([r] + list(ms.values()) + [b, fz and b and fz["ms_layer"] / b, b and fixd and min(fixd) / b,
                                                    fz and fz["pred_ms"], fz and fz["moe_ms"],
                                                    fz and ceil and 1 - ceil["ms_layer"] / fz["ms_layer"]])
            tps.append([r] + [c and c["tok_s"] for c in got.values()])
            mem.append([r] + [c and "%.1e%s" % (c["err"], "" if c["peak_gb"] is None else " %.2fGB" % c["peak_gb"])
                              for c in got.values()])
        text += ["", "budget %g: %d of %d experts resident per layer = %.3g of %.3g GB of expert weights" % (
            frac, len(res[0]), ctx.s["E"], frac * total_gb, total_gb), "ms per layer-step:",
            table(["row"] + names + ["bound", "fuse/bound", "best fixed/bound", "fuse pred MoE", "fuse meas MoE",
                                     "gpu idle est"], ms_rows), "tokens/s:", table(["row"] + names, tps),
            "max rel error vs gpu_all, peak GPU GB above the shared state (staging: +%.2f GB in pinned and fuse):"
            % (2 * ctx.expert_bytes / 1e9), table(["row"] + names, mem)]
    return text, bounds


def run_strategy(ctx, name, frac, rows, data, kv, deadline, cells, notes):
    """Every row of one strategy under one budget (its state built once), within the time box."""
    gc.collect()
    base = torch.cuda.memory_allocated() if ctx.cuda else 0
    try:
        st = Strategy(name, ctx, frac or 1.0)
    except Exception as e:                              # e.g. accelerate missing: the rest goes on
        return notes.append("%s at budget %s: %s: %s" % (name, frac, type(e).__name__, str(e)[:300]))
    for r, T in rows:
        left = deadline - time.perf_counter()
        try:
            if left < 2.0:
                raise TimeoutError("skipped, the %.0f s time box is spent" % ctx.args.time_limit)
            sec, n, err, peak = run_cell(ctx, st, data[r], kv[r], left)
        except Exception as e:
            notes.append("%s at budget %s, %s: %s: %s" % (name, frac, r, type(e).__name__, str(e)[:300]))
            continue
        own = ctx.args.layers * ctx.s["E"] * ctx.expert_bytes if name == "gpu_all" else 0  # predates base
        c = cells[frac, r, name] = dict(budget=frac, row=r, tokens=T, strategy=name, steps=n, err=err, note=st.note,
                                        ms_layer=sec * 1e3 / ctx.args.layers, tok_s=T / sec,
                                        peak_gb=peak and (peak - base + own) / 1e9)
        c.update(fuse_stats(st, max(1, ctx.args.warmup)) if name == "fuse" else {})
        print(json.dumps(c, default=str), flush=True)
    st.close()


def main():
    args, t_start = parse(), time.perf_counter()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ctx, s, L = Ctx(args), QUICK if args.quick else FULL, args.layers
    rows = [("decode%d" % b, b) for b in args.batches] + ([("prefill%d" % args.prefill, args.prefill)] if args.prefill
                                                          else [])
    data = {r: ctx.steps(T, 1 + args.warmup + args.steps, args.seed + i) for i, (r, T) in enumerate(rows)}
    kv = {r: [tuple(torch.randn(T, s["kvh"], args.context, s["hd"], device=ctx.dev, dtype=torch.bfloat16)
                    for _ in range(2)) for _ in range(L)] if r.startswith("decode") else None for r, T in rows}
    link, cpu = measure_costs(ctx, max(T for _, T in rows))
    info = dict(base_info("offload"), shapes=s, args=vars(args), link_ms=link and link * 1e3,
                cpu_ms={t: v * 1e3 for t, v in cpu.items()}, expert_gb=ctx.expert_bytes / 1e9,
                device=torch.cuda.get_device_name() if ctx.cuda else "cpu", setup_s=time.perf_counter() - t_start,
                host_experts="shared by all layers, pinned once" if args.share_experts else "distinct per layer")
    print(json.dumps(info, default=str), flush=True)
    cells, notes = {}, ["%s: needs CUDA, skipped" % n for n in args.strategies if n in CUDA_ONLY and not ctx.cuda]
    for frac in [None] + args.budgets:                  # None: gpu_all, which ignores the budget, once
        for name in ["gpu_all"] if frac is None else [n for n in args.strategies if n != "gpu_all"]:
            if ctx.cuda or name not in CUDA_ONLY:
                run_strategy(ctx, name, frac, rows, data, kv, t_start + args.time_limit, cells, notes)
    text, bounds = report(ctx, rows, data, cells, link, cpu)
    text += ["", "one expert over the link: %s ms; on the CPU (ms at tokens): %s" % (
        info["link_ms"] and "%.2f" % info["link_ms"], {t: round(v, 2) for t, v in info["cpu_ms"].items()}),
        "gpu idle est = 1 - gpu_all / fuse; fuse pred / meas MoE: the cost model's layer time vs the call's events,"
        " ms per layer-call", "notes: " + "; ".join(sorted({"%s: %s" % (c["strategy"], c["note"])
                                                            for c in cells.values() if c["note"]}))]
    text += ["fuse's call timeline (means, ms after the call's start; host clock except link_*):",
             timeline_table(cells, args.budgets, rows)]
    text += notes + [plot(args, cells, bounds, rows, os.path.join(args.out, "offload.png")),
                     "total %.0f s" % (time.perf_counter() - t_start)]
    print("\n".join(text))
    with open(os.path.join(args.out, "offload.txt"), "w") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(args.out, "offload.json"), "w") as f:
        json.dump(dict(info=info, cells=list(cells.values()), notes=notes,
                       bounds={"%g/%s" % k: v for k, v in bounds.items()}), f, indent=1, default=str)


if __name__ == "__main__":
    main()
