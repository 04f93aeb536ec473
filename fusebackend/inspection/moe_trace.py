"""Per-call decisions of a placed model's hybrid MoE layers, as text (explain) and rows (dump).

Recorded when FUSEBACKEND_MOE_TRACE=N is set (explain sets it for its one call): per layer and call, the
tokens each expert got, which experts ran on the CPU worker, over the link, resident or prefetched, the split
expert and its CPU row share, and the cost model's prediction against the measured time.
"""
from __future__ import annotations


def _ms(v):
    return "-" if v is None else "%.3f" % (v * 1e3)


def trace_rows(moe) -> list:
    """One dict per (layer, call) of a runtime/placed_moe.ModelMoE; [] without one or without tracing."""
    if moe is None:
        return []
    rows = []
    for i, (key, entries) in enumerate(moe.traces()):
        for e in entries:
            rows.append({"layer": i, "op_key": key, "call": e.get("call"), "counts": list(e.get("counts") or []),
                         "cpu": list(e.get("cpu") or []), "streamed": list(e.get("streamed") or []),
                         "resident": list(e.get("resident") or []), "prefetched": list(e.get("prefetched") or []),
                         "split": e.get("split"), "mode": e.get("mode"), "predicted_s": e.get("predicted_s"),
                         "measured_s": e.get("total_s"), "cpu_s": e.get("cpu_s"), "link_s": e.get("link_s")})
    return rows


def report_trace_rows(reports) -> list:
    """trace_rows of every model's hybrid layers that these graph reports reach, each model once."""
    seen, rows = set(), []
    for r in reports:
        moe = getattr(r, "moe", None)
        if moe is not None and id(moe) not in seen:
            seen.add(id(moe))
            rows += trace_rows(moe)
    return rows


def format_trace(rows, last: int = 8) -> str:
    if not rows:
        return ""
    lines = ["hybrid MoE decisions per call (last %d per layer): tokens per expert; where each ran" % last,
             "  %-5s %-5s %-24s %-14s %-14s %-12s %-12s %9s %9s %8s %8s" % (
                 "layer", "call", "tokens per expert", "cpu", "streamed", "resident", "split", "pred ms",
                 "meas ms", "cpu ms", "link ms")]
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    for layer, rs in sorted(by_layer.items()):
        for r in rs[-last:]:
            split = "-" if not r["split"] else "e%d cpu %.0f%%" % (r["split"][0], 100 * r["split"][1])
            lines.append("  %-5d %-5s %-24s %-14s %-14s %-12s %-12s %9s %9s %8s %8s" % (
                layer, r["call"], ",".join(map(str, r["counts"]))[:24], ",".join(map(str, r["cpu"])) or "-",
                ",".join(map(str, r["streamed"])) or "-", ",".join(map(str, r["resident"])) or "-", split,
                _ms(r["predicted_s"]), _ms(r["measured_s"]), _ms(r["cpu_s"]), _ms(r["link_s"])))
    return "\n".join(lines)
