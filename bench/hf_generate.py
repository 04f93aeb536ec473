"""HF generate() of MoE models whose weights do not all fit a GPU budget (issue "Placement II", item 9).

A Mixtral-shaped and a Qwen2-MoE-shaped HF model (random weights, a few layers at real width, bf16, built in
host memory; experts as transformers' grouped_mm so they are in the graph), greedy generate of --new tokens
after a --prompt-token prompt, batch 1. Strategies, side by side from one run, each time-boxed:

    eager          everything on the GPU (the reference: tokens and logits)
    fuse           torch.compile(backend="fuse"), everything on the GPU, no budget
    accelerate     accelerate.dispatch_model with max_memory = the budget (offloaded layers streamed per call)
    fuse_budgetNN  torch.compile(backend="fuse", options={"gpu_memory_budget": B}): the model stays in host
                   memory, input ids on the CPU (outputs come back there); B = the non-expert weights + NN% of
                   the expert weights

Per strategy: tokens/s (whole generate, and decode only), whether the tokens equal eager's (else the first
diverging position) and the logits' relative error up to it, first-call seconds (compile included), peak GPU
memory against the budget, fuse's warnings and plan.

    python3 bench/hf_generate.py [--models mixtral qwen2_moe] [--shares 0.25 0.5] [--out PREFIX]
    python3 bench/hf_generate.py --smoke          # tiny configs on the CPU; GPU-only rows say "needs CUDA"
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import RESULTS_DIR, base_info, slug  # noqa: E402
from fusebackend.capture import records  # noqa: E402

# (family, full-size widths): Mixtral-8x7B and Qwen1.5-MoE-A2.7B, a few layers; smoke: tiny
SHAPES = {
    "mixtral": dict(full=dict(hidden=4096, ffn=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000,
                              layers=2),
                    smoke=dict(hidden=64, ffn=96, experts=4, top_k=2, heads=4, kv_heads=2, vocab=128, layers=2)),
    "qwen2_moe": dict(full=dict(hidden=2048, ffn=1408, experts=60, top_k=4, shared=5632, heads=16, kv_heads=16,
                                vocab=151936, layers=4),
                      smoke=dict(hidden=64, ffn=48, experts=6, top_k=4, shared=96, heads=4, kv_heads=2, vocab=128,
                                 layers=2)),
}
TOL = 2e-2                  # bf16: relative error of the logits that still counts as eager's


class TimeBox(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """SIGALRM raises TimeBox in the main thread (between bytecodes: a compile or generate loop stops)."""
    def fire(signum, frame):
        raise TimeBox("time box of %.0f s reached" % seconds)
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build(family: str, s: dict, seq: int, experts_impl: str):
    """The HF model in host memory, bf16, random weights (HF's own init, run on the GPU where there is one)."""
    import transformers as tf
    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=seq,
                  tie_word_embeddings=False, attention_dropout=0.0, num_experts_per_tok=s["top_k"],
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if family == "mixtral":
        cls, config = tf.MixtralForCausalLM, tf.MixtralConfig(
            intermediate_size=s["ffn"], num_local_experts=s["experts"], router_jitter_noise=0.0, **common)
    else:
        cls, config = tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            intermediate_size=s["shared"], moe_intermediate_size=s["ffn"], num_experts=s["experts"],
            shared_expert_intermediate_size=s["shared"], norm_topk_prob=False, decoder_sparse_step=1, **common)
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_impl     # transformers 5.x: "grouped_mm" keeps experts in the graph
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        if torch.cuda.is_available():       # HF's init on the host took 115 s for 6 GB; on the GPU it takes ms
            with torch.device("cuda"):
                model = cls(config).eval()
            model = model.to("cpu")
            torch.cuda.empty_cache()
        else:
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def weight_bytes(model):
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return sum(p.numel() * p.element_size() for p in model.parameters()) - experts, experts


def gen(model, ids, new_tokens: int, sync):
    """Greedy generate; (tokens [new], per-step logits [new, V] float32 on the CPU, seconds)."""
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    sync()
    dt = time.perf_counter() - t0
    toks = out.sequences[0, ids.shape[1]:].cpu()
    return toks, torch.stack([l[0].float().cpu() for l in out.logits]), dt


def compare(toks, logits, ref):
    """Token equality with the reference, the first diverging step, the logits' error up to it (inclusive:
    at that step both saw the same prefix)."""
    rtoks, rlogits = ref
    diff = (toks != rtoks).nonzero()
    first = int(diff[0]) if len(diff) else None
    upto = len(rtoks) if first is None else first + 1
    a, b = logits[:upto].double(), rlogits[:upto].double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return dict(tokens_equal=first is None, first_divergence=first, logits_err=err, logits_ok=err <= TOL)


# ---------------------------------------------------------------- strategies: setup -> (model, ids, cleanup)
def on_device(model, dev):
    m = copy.deepcopy(model).to(dev)
    return m, (lambda: None)


def eager(model, ids, dev, budget, opts):
    m, done = on_device(model, dev)
    return m, ids.to(dev), done


def fuse(model, ids, dev, budget, opts):
    m, done = on_device(model, dev)
    m.forward = torch.compile(m.forward, backend="fuse")
    return m, ids.to(dev), done


def fuse_budget(model, ids, dev, budget, opts):
    if dev != "cuda":
        raise NeedsCuda()
    model.forward = torch.compile(model.forward, backend="fuse", options={"gpu_memory_budget": budget})

    def done():
        model.__dict__.pop("forward", None)   # back to the class's forward (a later deepcopy must not share it)
    return model, ids, done           # host weights, ids on the CPU


def accelerate_dispatch(model, ids, dev, budget, opts):
    if importlib.util.find_spec("accelerate") is None:
        raise Skipped("accelerate is not installed")
    if dev != "cuda":
        raise NeedsCuda()
    from accelerate import dispatch_model, infer_auto_device_map
    m = copy.deepcopy(model)
    device_map = infer_auto_device_map(m, max_memory={0: budget, "cpu": opts.host_memory},
                                       no_split_module_classes=m._no_split_modules)
    opts.notes["accelerate_device_map"] = {d: sum(1 for v in device_map.values() if v == d)
                                          for d in sorted(set(map(str, device_map.values())))}
    m = dispatch_model(m, device_map=device_map, main_device=0,     # the KV cache stays where it is made, as
                       skip_keys=getattr(m, "_skip_keys_device_placement", None))   # from_pretrained does
    return m, ids.to("cuda"), (lambda: None)


class NeedsCuda(Exception):
    pass


class Skipped(Exception):
    pass


def plan_summary(reps):
    plans = [r.placement for r in reps if getattr(r, "placement", None) is not None]
    if not plans:
        return None
    modes = [s.mode for p in plans for s in p.subgraphs]
    return dict(graphs=len(plans), modes={m: modes.count(m) for m in sorted(set(modes))},
                resident_gb=max(p.resident_bytes for p in plans) / 1e9,
                hybrid_layers=sum(len(p.hybrid_layers) for p in plans))


def plan_tables(reps):
    from fusebackend.passes.placement import format_plan
    return [format_plan(r.placement) for r in reps if getattr(r, "placement", None) is not None]


def run(name, setup, model, ids, dev, budget, ref, opts):
    row = dict(strategy=name, budget_gb=None if budget is None else budget / 1e9)
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t_start, done, m, result = time.perf_counter(), None, None, None
    try:
        with time_box(opts.time_box), warnings.catch_warnings(record=True) as caught, records.collect() as reps:
            warnings.simplefilter("always")
            m, ids_d, done = setup(model, ids, dev, budget, opts)
            row["setup_s"] = time.perf_counter() - t_start
            toks, logits, row["first_s"] = gen(m, ids_d, opts.new, sync)     # compiles here
            row.update(compare(toks, logits, ref) if ref is not None else {})
            totals, prefills = [], []
            while len(totals) < opts.reps and (not totals or time.perf_counter() - t_start < opts.time_box / 2):
                prefills.append(gen(m, ids_d, 1, sync)[2])
                t2, l2, dt = gen(m, ids_d, opts.new, sync)
                totals.append(dt)
                row.setdefault("repeat_tokens_equal", torch.equal(t2, toks))
            total, prefill = sorted(totals)[len(totals) // 2], sorted(prefills)[len(prefills) // 2]
            decode = (opts.new - 1) / (total - prefill) if total > prefill else None
            row.update(tok_s=opts.new / total, decode_tok_s=decode, generate_s=total, prefill_s=prefill,
                       reps=len(totals))
            if name.startswith("fuse"):           # the first call's excess over a warm one: Dynamo + fuse
                row["compile_s"] = row["first_s"] - total
            row["warnings"] = sorted({str(w.message)[:200] for w in caught if "fusebackend" in str(w.message)})
            row["plan"], row["plan_tables"] = plan_summary(reps), plan_tables(reps)
            if opts.profile and name.startswith("fuse_budget"):    # where a warm generate's host time goes
                row["profile"] = profile_generate(m, ids_d, opts.profile, sync, cuda)
            if os.environ.get("FUSEBACKEND_MOE_TRACE"):     # the hybrid layers' per-call decisions, kept
                from fusebackend.inspection.moe_trace import format_trace, report_trace_rows
                row["moe_trace"] = format_trace(report_trace_rows(reps), last=6)
            result = (toks, logits)
    except NeedsCuda:
        row["status"] = "needs CUDA"
    except Skipped as e:
        row["status"] = "skipped: %s" % e
    except Exception as e:       # reported, not hidden: what a user would see (the frames go to the JSON)
        row["status"] = "%s: %s" % (type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300])
        row["traceback"] = traceback.format_exc(limit=-12)
    finally:
        if done is not None:
            with contextlib.suppress(Exception):
                done()
    if cuda:
        row["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        if budget is not None:              # above the budget: activations, KV cache, streamed weights in flight
            row["over_budget_gb"] = row["peak_gpu_gb"] - budget / 1e9
    row.setdefault("status", "ok")
    del m
    torch._dynamo.reset()
    return row, result


def profile_generate(m, ids, new_tokens, sync, cuda):
    """torch.profiler over one warm generate of `new_tokens`: the ops by self host time, and the hybrid MoE
    layers' share of the wall clock (their record_function range) against the whole call."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        gen(m, ids, new_tokens, sync)
    wall = time.perf_counter() - t0
    ev = prof.key_averages()
    moe = sum(e.cpu_time_total for e in ev if e.key == "fusebackend.hybrid_moe") / 1e3
    table = ev.table(sort_by="self_cpu_time_total", row_limit=30)
    return "profiled generate of %d tokens: %.1f ms wall (profiler on), hybrid MoE ranges %.1f ms\n%s" % (
        new_tokens, wall * 1e3, moe, table)


def plan_rows(model, ids, budgets):
    """Smoke, no GPU: the plan the budget path would make (fake CUDA tensors, the reference H200 profile)."""
    import fusebackend
    from fusebackend.capture.placement import plan_only
    rows = []
    for name, budget in budgets:
        row = dict(strategy=name + " (plan only, fake CUDA)", budget_gb=budget / 1e9)
        fwd = lambda x: model(input_ids=x, use_cache=False).logits       # noqa: E731
        try:
            with plan_only(), torch.no_grad():
                rep = fusebackend.explain(fwd, ids, options={"gpu_memory_budget": budget})
            row.update(status="ok", plan=plan_summary(rep.graph_reports), plan_tables=plan_tables(rep.graph_reports))
        except Exception as e:
            row["status"] = "%s: %s" % (type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300])
        rows.append(row)
    torch._dynamo.reset()
    return rows


STRATEGIES = {"eager": eager, "fuse": fuse, "accelerate": accelerate_dispatch, "fuse_budget": fuse_budget}


def bench_model(family, opts):
    s = dict(SHAPES[family]["smoke" if opts.smoke else "full"])
    if opts.layers:
        s["layers"] = opts.layers
    t0 = time.perf_counter()
    model = build(family, s, opts.prompt + opts.new + 8, opts.experts_impl)
    fixed, experts = weight_bytes(model)
    head = dict(model=family, shape=s, build_s=time.perf_counter() - t0, fixed_gb=fixed / 1e9,
                experts_gb=experts / 1e9, experts_implementation=getattr(model.config, "_experts_implementation",
                                                                        None))
    print("%s: %s, non-expert weights %.2f GB, experts %.2f GB, built in %.0f s"
          % (family, s, fixed / 1e9, experts / 1e9, head["build_s"]), flush=True)
    ids = torch.randint(1, s["vocab"], (1, opts.prompt), generator=torch.Generator().manual_seed(1))
    budgets = [("fuse_budget%d" % round(100 * sh), fixed + int(sh * experts)) for sh in opts.shares]
    dev, ref, rows = opts.device, None, []
    for strat in opts.strategies:
        cases = budgets if strat in ("accelerate", "fuse_budget") else [(strat, None)]
        for name, budget in cases:
            label = name.replace("fuse_budget", "accelerate") if strat == "accelerate" else name
            opts.notes = {}
            row, result = run(label, STRATEGIES[strat], model, ids, dev, budget, ref, opts)
            if strat == "eager":
                ref = result              # every other strategy is compared with eager on the device
            row.update(opts.notes)
            rows.append(row)
            print("  " + line(row), flush=True)
    if opts.device == "cpu" and "fuse_budget" in opts.strategies:
        for row in plan_rows(model, ids, budgets):
            rows.append(row)
            print("  " + line(row), flush=True)
    del model
    gc.collect()
    return dict(head, rows=rows)


def line(r):
    def f(key, fmt):
        return fmt % r[key] if r.get(key) is not None else "-"
    same = ("equal" if r.get("tokens_equal") else "diverge@%s" % r.get("first_divergence")
            if "tokens_equal" in r else "-")
    text = ("%-34s tok/s %8s  decode tok/s %8s  tokens %-11s logits err %8s  first call %7s s  compile %7s s  "
            "peak GPU %6s GB / budget %5s GB  %s" % (r["strategy"], f("tok_s", "%.2f"), f("decode_tok_s", "%.2f"),
                                                       same, f("logits_err", "%.1e"), f("first_s", "%.1f"),
                                                       f("compile_s", "%.1f"), f("peak_gpu_gb", "%.3g"),
                                                       f("budget_gb", "%.3g"), r["status"]))
    for k in ("plan", "accelerate_device_map"):
        if r.get(k):
            text += "  %s=%s" % (k, json.dumps(r[k], default=str))
    if r.get("warnings"):
        text += "  warnings=%s" % r["warnings"]
    if r.get("moe_trace"):
        text += "\n" + r["moe_trace"]
    if r.get("profile"):
        text += "\n" + r["profile"]
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixtral", "qwen2_moe"], choices=sorted(SHAPES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5], help="expert share of the budget")
    ap.add_argument("--layers", type=int, help="decoder layers (default: mixtral 2, qwen2_moe 4)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="fuse_budget: profile a warm generate of N tokens")
    ap.add_argument("--time-box", type=float, default=240.0, help="seconds per strategy (compile + timing)")
    ap.add_argument("--experts-impl", default="grouped_mm")
    ap.add_argument("--host-memory", default="100GiB", help="accelerate's max_memory for the CPU")
    ap.add_argument("--smoke", action="store_true", help="tiny configs; runs on the CPU without a GPU")
    ap.add_argument("--out", help="PREFIX: writes PREFIX.txt and PREFIX.json")
    ap.add_argument("--save", action="store_true", help="--out bench/results/<date>_<card>_hf_generate[_MODEL]")
    opts = ap.parse_args()
    if opts.smoke:
        opts.prompt, opts.new, opts.reps, opts.time_box = min(opts.prompt, 8), min(opts.new, 4), 1, 180.0
    opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    info = base_info("hf_generate")
    import transformers
    info.update(transformers=transformers.__version__, device=torch.cuda.get_device_name() if opts.device ==
                "cuda" else "cpu", smoke=opts.smoke, prompt=opts.prompt, new=opts.new, tol=TOL,
                accelerate=importlib.util.find_spec("accelerate") is not None)
    if opts.save and not opts.out:
        card = slug(info["device"]) + ("_smoke" if opts.smoke else "")
        opts.out = os.path.join(RESULTS_DIR, "%s_%s_hf_generate%s" % (datetime.date.today().isoformat(), card,
                                "" if len(opts.models) > 1 else "_" + opts.models[0]))
    if opts.device == "cuda" and "fuse_budget" in opts.strategies:    # measured once, outside every row
        from fusebackend.runtime.hardware import load_profile
        t0 = time.perf_counter()
        info["hardware_profile"] = getattr(load_profile(None), "name", None)
        info["hardware_profile_s"] = time.perf_counter() - t0
    results = [bench_model(fam, opts) for fam in opts.models]
    if opts.out:
        with open(opts.out + ".json", "w") as f:
            json.dump(dict(info=info, models=results), f, indent=1, default=str)
        with open(opts.out + ".txt", "w") as f:
            f.write(json.dumps(info, default=str) + "\n")
            for res in results:
                f.write("\n%s %s: non-expert %.2f GB, experts %.2f GB (%s)\n" % (
                    res["model"], res["shape"], res["fixed_gb"], res["experts_gb"], res["experts_implementation"]))
                for r in res["rows"]:
                    f.write("  " + line(r) + "\n")
                    for table in (r.get("plan_tables") or [])[:4]:     # the first graphs: prefill, decode
                        f.writelines("      " + t + "\n" for t in table.splitlines())
        print("wrote %s.txt, %s.json" % (opts.out, opts.out))


if __name__ == "__main__":
    main()
