"""SVG drawing of a dumped graph (layout in dump_layout.py): nodes coloured by fusion group, one box per kernel,
the device as border colour and in each kernel's label, edges that cross devices red and dashed."""
from __future__ import annotations

from .dump_layout import CL_PAD, NODE_H, cluster_label, is_cluster, layout, node_lines

PALETTE = ["#8ecae6", "#b5e48c", "#ffb4a2", "#ffd166", "#cdb4db", "#90e0c0", "#f4a261", "#a2d2ff",
           "#e9c46a", "#ffafcc", "#bde0fe", "#c7f9cc"]
DEVICE = {"cpu": "#1f4e9c", "cuda": "#1b873b", "gpu": "#1b873b"}
CROSS = "#d62828"
HEADER = 58


def device_colour(dev) -> str:
    return DEVICE.get(str(dev).split(":")[0], "#6c757d")


def _tint(colour: str, amount: float) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    mix = lambda c: int(round(c + (255 - c) * amount))
    return "#%02x%02x%02x" % (mix(r), mix(g), mix(b))


def esc(s) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _f(v: float) -> str:
    return ("%.1f" % v).rstrip("0").rstrip(".")


def _path(pts) -> str:
    d = ["M%s,%s" % (_f(pts[0][0]), _f(pts[0][1]))]
    for (ax, ay), (bx, by) in zip(pts, pts[1:]):
        if abs(ax - bx) < 0.5:
            d.append("L%s,%s" % (_f(bx), _f(by)))
        else:
            k = (by - ay) / 2
            d.append("C%s,%s %s,%s %s,%s" % (_f(ax), _f(ay + k), _f(bx), _f(by - k), _f(bx), _f(by)))
    return " ".join(d)


def _group_colours(data: dict) -> dict:
    colours, i = {}, 0
    for g in data["groups"]:
        if g["kind"] in ("pointwise", "reduction"):
            colours[g["id"]] = PALETTE[i % len(PALETTE)]
            i += 1
    return colours


def render_svg(data: dict) -> str:
    lay = layout(data)
    nodes = {n["name"]: n for n in data["nodes"]}
    groups = {g["id"]: g for g in data["groups"]}
    colours = _group_colours(data)
    outputs = {o.split("[")[0] for o in data["outputs"]}
    s = data["summary"]
    devices = sorted({str(n["device"]) for n in data["nodes"]} | {str(g["device"]) for g in data["groups"]})

    def dev_of(name):
        g = groups.get(nodes[name]["group"])
        return g["device"] if g is not None else nodes[name]["device"]

    width = max(lay.width, 760.0)
    height = lay.height + HEADER + 30
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<svg xmlns="http://www.w3.org/2000/svg" width="%s" height="%s" viewBox="0 0 %s %s" '
           'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="11">'
           % (_f(width), _f(height), _f(width), _f(height)),
           "<title>%s</title>" % esc("fusebackend dump: %s" % data["name"]),
           "<defs>",
           '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>',
           '<marker id="arrow-cross" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="%s"/></marker>' % CROSS,
           "</defs>",
           '<rect x="0" y="0" width="%s" height="%s" fill="white"/>' % (_f(width), _f(height))]
    title = ("graph %d (%s): %d ATen nodes -> %d kernel launches, %d ATen calls, %d views, %d fallbacks"
             % (data["index"], data["kind"], s["nodes"], s["kernels"], s["aten_calls"], s["views"], s["fallbacks"]))
    out.append('<text class="title" x="20" y="22" font-size="14" font-weight="bold">%s</text>' % esc(title))
    lx = 20.0
    legend = [("kernel", "fused kernel (box)"), ("opaque", "ATen call"), ("view", "view"),
              ("placeholder", "input")]
    legend += [("dev:" + d, "%s placement" % d) for d in devices]
    legend.append(("cross", "crosses devices"))
    for key, text in legend:
        if key == "cross":
            out.append('<path d="M%s,40 L%s,40" stroke="%s" stroke-width="2" stroke-dasharray="5,3"/>'
                       % (_f(lx), _f(lx + 26), CROSS))
        else:
            fill, stroke, dash, rx = "#ffffff", "#555", "", 2
            if key == "kernel":
                fill = PALETTE[0]
            elif key == "opaque":
                fill = "#e4e4e4"
            elif key == "view":
                dash = ' stroke-dasharray="3,2"'
            elif key == "placeholder":
                fill, rx = "#fff6d5", 8
            else:
                stroke = device_colour(key[4:])
            out.append('<rect x="%s" y="33" width="26" height="14" rx="%d" fill="%s" stroke="%s" stroke-width="2"%s/>'
                       % (_f(lx), rx, fill, stroke, dash))
        out.append('<text x="%s" y="44">%s</text>' % (_f(lx + 32), esc(text)))
        lx += 32 + len(text) * 6.8 + 18
    out.append('<g transform="translate(0,%d)">' % HEADER)

    out.append('<g class="clusters">')
    for b in lay.boxes:
        if b.group is None:
            continue
        g = b.group
        col = device_colour(g["device"])
        kernel = g["kind"] in ("pointwise", "reduction")
        cls = "cluster kernel" if kernel else "cluster"
        fill = _tint(colours.get(g["id"], "#cccccc"), 0.72)
        dash = ' stroke-dasharray="7,4"' if g.get("fallback") else ""
        tip = [cluster_label(g), "kernel: %s" % (g["kernel"] or "-")]
        if g.get("source_file"):
            tip.append("source: %s" % g["source_file"])
        if g.get("fallback"):
            tip.append("fallback: %s" % g["fallback"].splitlines()[0])
        out.append('<g id="cluster_g%d" class="%s" data-group="%d" data-device="%s">'
                   % (g["id"], cls, g["id"], esc(g["device"])))
        out.append("<title>%s</title>" % esc("\n".join(tip)))
        out.append('<rect class="%s" x="%s" y="%s" width="%s" height="%s" rx="6" fill="%s" stroke="%s" '
                   'stroke-width="2"%s/>' % (cls, _f(b.x - b.w / 2), _f(b.y), _f(b.w), _f(b.h), fill, col, dash))
        out.append('<text class="cluster-label" x="%s" y="%s" font-weight="bold" fill="%s">%s</text>'
                   % (_f(b.x - b.w / 2 + CL_PAD), _f(b.y + 14), "#b00020" if g.get("fallback") else col,
                      esc(cluster_label(g))))
        out.append("</g>")
    out.append("</g>")

    out.append('<g class="edges" fill="none">')
    for p, n, pts in lay.edges:
        cross = str(dev_of(p)) != str(dev_of(n))
        style = ('stroke="%s" stroke-width="2" stroke-dasharray="6,3" marker-end="url(#arrow-cross)"' % CROSS
                 if cross else 'stroke="#666" stroke-width="1.1" marker-end="url(#arrow)"')
        out.append('<path class="edge%s" data-src="%s" data-dst="%s" d="%s" %s/>'
                   % (" cross-device" if cross else "", esc(p), esc(n), _path(pts), style))
    out.append("</g>")

    out.append('<g class="nodes">')
    for name, (cx, top, w) in lay.node_pos.items():
        n = nodes[name]
        gid = n["group"]
        g = groups.get(gid)
        kind = g["kind"] if g is not None and not is_cluster(g) else n["kind"]
        fill, dash, rx = "#ffffff", "", 3
        if gid in colours:
            fill = colours[gid]
        elif kind == "opaque":
            fill = "#e4e4e4"
        elif kind in ("placeholder", "symbol"):
            fill, rx = "#fff6d5", 12
        if kind == "view" and gid not in colours:
            dash = ' stroke-dasharray="3,2"'
        width_px = 3.2 if name in outputs else 1.6
        first, second = node_lines(n)
        tip = ["%s = %s" % (name, n["target"] or n["kind"]),
               "kind %s, group %s, device %s" % (n["kind"], "g%d" % gid if gid is not None else "-", dev_of(name))]
        if n["shape"] is not None:
            tip.append("%s %s stride %s" % (n["shape"], n["dtype"], n["stride"]))
        if n["flops"] or n["bytes"]:
            tip.append("%d FLOPs, %d bytes" % (n["flops"], n["bytes"]))
        if name in outputs:
            tip.append("graph output")
        out.append('<g class="node" id="node_%s" data-group="%s">' % (esc(name), "" if gid is None else gid))
        out.append("<title>%s</title>" % esc("\n".join(tip)))
        out.append('<rect x="%s" y="%s" width="%s" height="%d" rx="%d" fill="%s" stroke="%s" stroke-width="%s"%s/>'
                   % (_f(cx - w / 2), _f(top), _f(w), NODE_H, rx, fill, device_colour(dev_of(name)), width_px, dash))
        out.append('<text x="%s" y="%s" text-anchor="middle" font-weight="bold">%s</text>'
                   % (_f(cx), _f(top + 14), esc(first)))
        out.append('<text x="%s" y="%s" text-anchor="middle" fill="#333">%s</text>'
                   % (_f(cx), _f(top + 27), esc(second)))
        out.append("</g>")
    out.append("</g>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
