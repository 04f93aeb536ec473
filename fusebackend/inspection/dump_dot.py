"""Graphviz DOT text of a dumped graph: a cluster per kernel, nodes filled by group colour, the device as
border colour and in the cluster label, edges that cross devices red and dashed. Text only: no Graphviz
is needed to write it (render with `dot -Tsvg graph_0_forward.dot > g.svg` where Graphviz is installed)."""
from __future__ import annotations

from .dump_layout import cluster_label, is_cluster, node_lines
from .dump_svg import CROSS, _group_colours, _tint, device_colour


def _q(s) -> str:
    return '"%s"' % str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_dot(data: dict) -> str:
    nodes = {n["name"]: n for n in data["nodes"]}
    groups = {g["id"]: g for g in data["groups"]}
    colours = _group_colours(data)
    outputs = {o.split("[")[0] for o in data["outputs"]}

    def dev_of(name):
        g = groups.get(nodes[name]["group"])
        return g["device"] if g is not None else nodes[name]["device"]

    def node_stmt(name, indent):
        n = nodes[name]
        gid = n["group"]
        g = groups.get(gid)
        kind = g["kind"] if g is not None and not is_cluster(g) else n["kind"]
        fill, style, shape = "#ffffff", "filled", "box"
        if gid in colours:
            fill = colours[gid]
        elif kind == "opaque":
            fill = "#e4e4e4"
        elif kind in ("placeholder", "symbol"):
            fill, style = "#fff6d5", "filled,rounded"
        elif kind == "view":
            style = "filled,dashed"
        attrs = {"label": "\n".join(node_lines(n)), "fillcolor": fill, "style": style, "shape": shape,
                 "color": device_colour(dev_of(name)), "penwidth": "3" if name in outputs else "1.5"}
        return "%s%s [%s];" % (indent, _q(name), ", ".join("%s=%s" % (k, _q(v)) for k, v in attrs.items()))

    out = ["digraph %s {" % _q(data["name"]),
           "  label=%s; labelloc=t; fontname=monospace;" % _q(
               "graph %d (%s): %d nodes -> %d kernel launches, %d ATen calls"
               % (data["index"], data["kind"], data["summary"]["nodes"], data["summary"]["kernels"],
                  data["summary"]["aten_calls"])),
           "  rankdir=TB; newrank=true;",
           "  node [fontname=monospace, fontsize=10];",
           "  edge [color=\"#666666\", arrowsize=0.6];"]
    drawn = set()
    for g in data["groups"]:
        members = [m for m in g["nodes"] if m in nodes]
        if not members or not is_cluster(g):
            continue
        col = device_colour(g["device"])
        out.append("  subgraph cluster_g%d {" % g["id"])
        out.append("    label=%s; fontcolor=%s; color=%s; penwidth=2; style=%s; fillcolor=%s;"
                   % (_q(cluster_label(g) + ("\n" + g["kernel"] if g["kernel"] else "")), _q(col), _q(col),
                      _q("filled,dashed" if g.get("fallback") else "filled,rounded"),
                      _q(_tint(colours.get(g["id"], "#cccccc"), 0.72))))
        for m in members:
            out.append(node_stmt(m, "    "))
            drawn.add(m)
        out.append("  }")
    for name in nodes:
        if name not in drawn:
            out.append(node_stmt(name, "  "))
    for name, n in nodes.items():
        for p in n["inputs"]:
            if p not in nodes:
                continue
            cross = str(dev_of(p)) != str(dev_of(name))
            attrs = " [color=%s, style=dashed, penwidth=2]" % _q(CROSS) if cross else ""
            out.append("  %s -> %s%s;" % (_q(p), _q(name), attrs))
    out.append("}")
    return "\n".join(out) + "\n"
