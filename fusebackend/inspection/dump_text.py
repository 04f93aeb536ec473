"""The text form of a graph dump (`fusebackend dump` prints it; dumps write it as graph_<i>_<kind>.txt)."""
from __future__ import annotations


def _dims(seq) -> str:
    return "x".join(str(s) for s in seq) if seq else "scalar"


def _node_label(n: dict) -> str:
    return n["name"] if n["name"] == n["op"] or n["name"].startswith(n["op"] + "_") else "%s:%s" % (n["name"], n["op"])


def _wrap(items, first: str, indent: str = None, width: int = 110) -> list:
    """items joined by spaces, wrapped at width; the first line starts with `first`, the others with `indent`."""
    indent = " " * len(first) if indent is None else indent
    lines, cur = [], first
    for it in items:
        if len(cur) + len(it) + 1 > width and len(cur) > len(indent):
            lines.append(cur.rstrip())
            cur = indent
        cur += it + " "
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def _item_text(item) -> str:
    if isinstance(item, dict):
        if item.get("describe"):
            return item["describe"]
        return ", ".join("%s=%s" % (k, v) for k, v in item.items())
    return str(item)


def render_text(data: dict, sources: bool = False) -> str:
    s = data["summary"]
    by_name = {n["name"]: n for n in data["nodes"]}
    out = ["== graph %d (%s) ==" % (data["index"], data["kind"]),
           "ATen graph: %d nodes (%s)" % (s["nodes"], ", ".join("%s %d" % kv for kv in s["node_kinds"].items()))]
    out += _wrap(["%s %d," % kv for kv in s["ops"].items()], "  ops: ")
    if out[-1].endswith(","):
        out[-1] = out[-1][:-1]
    out.append("program: %d kernel launch(es), %d ATen call(s), %d view(s) per call; %d fusion group(s)"
               % (s["kernels"], s["aten_calls"], s["views"], s["groups"]))
    if not data["groups"]:
        out.append("no fusion groups: the whole graph runs as ATen calls, as traced (see fallbacks)")

    kernels = [g for g in data["groups"] if g["kind"] in ("pointwise", "reduction")]
    out.append("")
    out.append("fused kernels (%d):" % len(kernels))
    for g in kernels:
        red = "  reduce %s" % g["reduce_dims"] if g["reduce_dims"] else ""
        tail = g["kernel"] or "(no kernel)"
        if g["batch"] is not None:
            tail += "  [batch b%s]" % g["batch"]
        if g["fallback"]:
            tail += "  [FALLBACK to ATen: %s]" % g["fallback"].splitlines()[0]
        out.append("  g%-4d %-9s %-4s domain %s%s  %s"
                   % (g["id"], g["kind"], g["device"], _dims(g["domain"]), red, tail))
        out += _wrap([_node_label(by_name[n]) for n in g["nodes"]], "          %d op(s): " % len(g["nodes"]))
        out.append("          reads %s -> writes %s" % (" ".join(g["inputs"]) or "-", " ".join(g["outputs"]) or "-"))
    calls = [g for g in data["groups"] if g["kind"] not in ("pointwise", "reduction", "view")]
    out.append("")
    out.append("ATen calls (%d):" % len(calls))
    for g in calls:
        for name in g["nodes"]:
            n = by_name[name]
            if n["shape"] is not None:
                shape = "%s %s" % (_dims(n["shape"]), n["dtype"])
            else:
                shape = "(%d outputs)" % len(n.get("outputs") or [])
            out.append("  g%-4d %-24s %-4s %-26s -> %s" % (g["id"], n["target"] or n["op"], g["device"], name, shape))
    views = [g for g in data["groups"] if g["kind"] == "view"]
    if views:
        out.append("")
        out.append("views (%d, zero-copy at run time):" % len(views))
        out += _wrap([_node_label(by_name[n]) for g in views for n in g["nodes"]], "  ")
    if data.get("batches"):
        out.append("")
        out.append("horizontal batches (%d):" % len(data["batches"]))
        out += ["  " + _item_text(b) for b in data["batches"]]
    if data.get("moe_layers"):
        out.append("")
        out.append("MoE layers as one moe_experts op (%d):" % len(data["moe_layers"]))
        out += ["  " + line for line in data["moe_layers"]]
    if data.get("patterns"):
        out.append("")
        out.append("placement candidates found (%d):" % len(data["patterns"]))
        out += ["  " + line for line in data["patterns"]]
    if data.get("placement_table"):
        out.append("")
        out += data["placement_table"]
    if data.get("moe_trace"):
        from .moe_trace import format_trace
        out += format_trace(data["moe_trace"]).splitlines()
    out.append("")
    if data["fallbacks"]:
        out.append("fallbacks (%d):" % len(data["fallbacks"]))
        out += ["  %s: %s" % (f["what"], f["reason"].splitlines()[0] if f["reason"] else "") for f in data["fallbacks"]]
    else:
        out.append("fallbacks: none")
    if data["sources"]:
        out += _wrap([src["file"] for src in data["sources"]], "kernel sources (%d): " % len(data["sources"]))
    if sources:
        for src in data["sources"]:
            out.append("")
            users = ", ".join("g%d" % i for i in src["groups"]) or "-"
            out.append("// ---- %s (%s) for %s" % (src["kernel"], src["file"], users))
            out.append(src["text"].rstrip())
    return "\n".join(out) + "\n"
