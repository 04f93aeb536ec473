"""bench/offload.py's reporting: fuse's per-call statistics from the layers' traces, text tables, the plot."""
import statistics


def fuse_stats(st, n):
    """fuse's timed MoE calls: cost-model prediction vs the call's events (ms per layer-call), and its choices."""
    tr = [t for lay in st.layers for t in lay.collect_trace()[-n:]]
    if not tr:                        # --trace 0: no per-call record
        return dict(pred_ms=None, moe_ms=None, cpu_ms=None, link_ms=None, n_cpu=None, n_streamed=None,
                    prefetch_hits=None, split_share=None, modes={}, correction=None)
    m = lambda k, f=lambda v: 1e3 * v: statistics.mean(f(t[k]) for t in tr)          # noqa: E731
    modes = [t.get("mode") for t in tr]

    def at(k):                        # ms after the call's start, over the calls that have it
        v = [1e3 * t[k] for t in tr if t.get(k) is not None]
        return statistics.mean(v) if v else None
    timeline = {k + "_ms": at(k + "_s") for k in TIMELINE}
    return dict(**timeline, pred_ms=m("predicted_s", lambda v: 1e3 * (v or 0.0)), moe_ms=m("total_s"), cpu_ms=m("cpu_s"),
                link_ms=m("link_s"), n_cpu=m("cpu", len), n_streamed=m("streamed", len),
                prefetch_hits=m("prefetched", len), split_share=m("split", lambda v: v is not None),
                modes={k: modes.count(k) for k in sorted(set(modes), key=str)},
                correction=tr[-1].get("correction") if tr else None)


# per call, ms after its start: host clock (sched_at, cpu_submit_at, cpu_back_at, host) and the GPU's (link_*);
# link_busy: the copy stream's backlog the scheduler was told of
TIMELINE = ("link_busy", "sched_at", "cpu_submit_at", "link_start_at", "link_end_at", "cpu_back_at", "host")


def timeline_table(cells, budgets, rows):
    """fuse's mean call timeline per (budget, row): where the time between the two sides' work goes."""
    body = [["%g/%s" % (f, r)] + [c.get(k + "_ms") for k in TIMELINE] + [c.get("cpu_ms"), c.get("moe_ms")]
            for f in budgets for r, _ in rows for c in [cells.get((f, r, "fuse"))] if c]
    return table(["budget/row"] + [k + " ms" for k in TIMELINE] + ["cpu ms", "call ms"], body)


def table(header, body):
    cells = [header] + [["-" if v is None else "%.3g" % v if isinstance(v, float) else str(v) for v in r] for r in body]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in cells)


def plot(args, cells, bounds, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    dec = [(r, T) for r, T in rows if r.startswith("decode")]
    fig, axes = plt.subplots(1, len(args.budgets), figsize=(5 * len(args.budgets), 4), squeeze=False)
    for ax, frac in zip(axes[0], args.budgets):
        for n in args.strategies + ["bound"]:
            get = lambda r: bounds.get((frac, r)) if n == "bound" else (   # noqa: E731
                cells.get((None if n == "gpu_all" else frac, r, n)) or {}).get("ms_layer")
            pts = [(T, get(r)) for r, T in dec if get(r)]
            if pts:
                ax.plot(*zip(*pts), "k--" if n == "bound" else "o-", label=n)
        ax.set(xscale="log", yscale="log", title="budget %g" % frac, xlabel="decode batch", ylabel="ms per layer-step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return "wrote " + path
