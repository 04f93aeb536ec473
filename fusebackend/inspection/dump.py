"""Graph dumps: what one compile did, as JSON data, text, SVG and DOT (used by `fusebackend dump` and by
the `dump_dir` option / $FUSEBACKEND_DUMP_DIR for any torch.compile run).

Every renderer works from one plain dict, `graph_data(rep)` (also written as the .json file), so the files
of one dump always agree with each other:

    data = graph_data(rep, index=0)         # JSON-able: nodes, groups, batches, fallbacks, sources
    print(render_text(data))                 # the text summary
    write_dump(rep, "dumps/")                # graph_<i>_<kind>.txt/.json/.svg/.dot + kernel_<name>.cpp/.cu
"""
from __future__ import annotations

import collections
import json
import os
import re
import threading
import warnings

from .dump_text import render_text

FORMAT = "fusebackend-dump/1"
_BOUNDS = r'(?:__launch_bounds__\s*\([^)]*\)\s+)?'
_KERNEL_NAME = re.compile(r'extern\s+"C"\s+(?:__global__\s+)?' + _BOUNDS + r'void\s+' + _BOUNDS + r'(\w+)\s*\(')
_lock = threading.Lock()
_warned = []


# ---------------------------------------------------------------------------------------------- data

def kernel_file_name(name: str, source: str) -> str:
    return "kernel_%s.%s" % (name, "cu" if "__global__" in source else "cpp")


def source_name(source: str) -> str:
    """The kernel's entry-point name, read from its source text."""
    m = _KERNEL_NAME.search(source)
    return m.group(1) if m else "unnamed_%08x" % (hash(source) & 0xFFFFFFFF)


def _short_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _steps(program):
    """The program's steps, through wrappers (CUDA-graph programs hold the plain one)."""
    for attr in ("steps",):
        if hasattr(program, attr):
            return list(getattr(program, attr))
    inner = getattr(program, "program", None)
    return _steps(inner) if inner is not None and inner is not program else []


def _kernel_specs(rep) -> dict:
    """group id -> KernelSource, from the report (hook `specs`), the program's steps, else re-emitted."""
    specs = dict(getattr(rep, "specs", None) or {})
    first_node = {g.nodes[0]: g.id for g in rep.groups if g.nodes}

    def visit(step):
        for m in getattr(step, "members", None) or ():
            visit(m)
        spec = getattr(step, "spec", None)
        if spec is None:
            return
        gid = getattr(step, "group_id", None)
        if gid is None:
            nodes = getattr(step, "group_nodes", None) or ()
            gid = first_node.get(nodes[0].name) if nodes else None
        if gid is not None:
            specs.setdefault(gid, spec)

    for s in _steps(rep.program):
        visit(s)
    missing = [g for g in rep.groups if g.is_kernel and g.id not in specs]
    if missing:                     # groups that fell back: emitting is pure and cheap, it names their source
        try:
            from .emit import emit_kernel
        except ImportError:
            return specs
        for g in missing:
            try:
                specs[g.id] = emit_kernel(rep.graph, g)
            except Exception:
                pass
    return specs


def _plain(value):
    """A JSON-able form of a report item of unknown type (batches, placement decisions)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        out = {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
        if callable(getattr(value, "describe", None)):
            out["describe"] = value.describe()
        return out
    if hasattr(value, "dtype") and hasattr(value, "is_floating_point"):   # torch.dtype
        return _short_dtype(value)
    return str(value)



def _output_name(o):
    if hasattr(o, "name") and hasattr(o, "item"):        # a Ref
        return o.name if o.item is None else "%s[%d]" % (o.name, o.item)
    return repr(o)


def graph_data(rep, index: int = 0) -> dict:
    """Everything a dump shows about one GraphReport, as a JSON-able dict."""
    fg = rep.graph
    specs = _kernel_specs(rep)
    batches = list(getattr(rep, "batches", None) or [])
    batch_of = {gid: getattr(b, "id", i) for i, b in enumerate(batches) for gid in getattr(b, "groups", ())}
    owner = {n: g.id for g in rep.groups for n in g.nodes}

    nodes = []
    for n in fg.nodes():
        m = n.meta
        entry = {"name": n.name, "kind": n.kind, "op": n.op_name.split(".")[0],
                 "target": n.op_name if n.target is not None else None,
                 "shape": list(m.shape) if m else None, "dtype": _short_dtype(m.dtype) if m else None,
                 "stride": list(m.stride) if m else None, "device": n.device, "group": owner.get(n.name),
                 "flops": int(n.flops), "bytes": int(n.bytes), "inputs": fg.producers(n.name)}
        if n.multi_meta:
            entry["outputs"] = [None if t is None else {"shape": list(t.shape), "dtype": _short_dtype(t.dtype)}
                                for t in n.multi_meta]
        nodes.append(entry)

    sources, seen = [], {}
    for src in rep.sources:
        name = source_name(src)
        if name not in seen:
            seen[name] = len(sources)
            sources.append({"kernel": name, "file": kernel_file_name(name, src),
                            "target": "cuda" if "__global__" in src else "cpu", "groups": [], "text": src})

    groups = []
    for g in rep.groups:
        spec = specs.get(g.id)
        kname = getattr(spec, "name", None)
        if kname in seen:
            sources[seen[kname]]["groups"].append(g.id)
        groups.append({
            "id": g.id, "kind": g.kind, "device": g.device, "domain": list(g.domain),
            "reduce_dims": list(g.reduce_dims), "nodes": list(g.nodes),
            "ops": [fg.node(n).op_name.split(".")[0] for n in g.nodes],
            "inputs": [r.name if r.item is None else "%s[%d]" % (r.name, r.item) for r in g.inputs],
            "outputs": list(g.outputs), "kernel": kname,
            "source_file": sources[seen[kname]]["file"] if kname in seen else None,
            "fallback": g.fallback_reason, "batch": batch_of.get(g.id)})

    kinds = collections.Counter(n["kind"] for n in nodes)
    ops = collections.Counter(n["op"] for n in nodes if n["kind"] not in ("placeholder", "symbol"))
    kernel_groups = [g for g in groups if g["kind"] in ("pointwise", "reduction")]
    data = {
        "format": FORMAT, "index": index, "kind": rep.kind, "name": "graph_%d_%s" % (index, rep.kind),
        "summary": {
            "nodes": len(nodes), "node_kinds": dict(sorted(kinds.items())),
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "groups": len(groups), "kernel_groups": len(kernel_groups),
            "kernels": rep.num_kernels, "aten_calls": rep.num_aten_calls, "views": rep.num_views,
            "fallbacks": len(rep.fallbacks), "batches": len(batches)},
        "inputs": list(fg.inputs),
        "outputs": [_output_name(o) for o in fg.outputs],
        "nodes": nodes, "groups": groups,
        "fallbacks": [{"what": str(w), "reason": str(r)} for w, r in rep.fallbacks],
        "sources": sources,
    }
    if batches:
        data["batches"] = [_plain(b) for b in batches]
    if getattr(rep, "moe_layers", None):
        data["moe_layers"] = list(rep.moe_layers)
    plan = getattr(rep, "placement", None)
    if plan is not None:
        from ..passes.placement import format_plan
        data["placements"] = [_placement_row(s) for s in plan.subgraphs]
        data["placement_table"] = format_plan(plan).splitlines()
        if getattr(rep, "patterns", None) is not None:
            data["patterns"] = rep.patterns.describe().splitlines()
        from .moe_trace import trace_rows
        rows = trace_rows(getattr(rep, "moe", None))
        if rows:
            data["moe_trace"] = rows
    return data


def _placement_row(s) -> dict:
    return {"subgraph": s.name, "kind": s.kind, "bytes": s.bytes, "home": s.home, "device": s.device,
            "mode": s.mode, "tokens": s.tokens, "predicted_ms": dict(s.predicted_ms),
            "weights": list(s.weights), "nodes": sorted(s.nodes)}


# ---------------------------------------------------------------------------------------------- files

def _write(path: str, text: str) -> None:
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _reserve_index(dump_dir: str, kind: str) -> int:
    """The next free graph index in dump_dir (several compiles, threads or processes may share it)."""
    pat = re.compile(r"graph_(\d+)_")
    with _lock:
        used = [int(m.group(1)) for f in os.listdir(dump_dir) for m in [pat.match(f)] if m]
        i = max(used, default=-1) + 1
        while True:
            try:
                os.close(os.open(os.path.join(dump_dir, "graph_%d_%s.json" % (i, kind)), os.O_CREAT | os.O_EXCL))
                return i
            except FileExistsError:
                i += 1


def write_files(data: dict, dump_dir: str) -> list:
    """Write one graph's .txt/.json/.svg/.dot and its kernel sources into dump_dir; returns the paths."""
    from .dump_dot import render_dot
    from .dump_svg import render_svg
    os.makedirs(dump_dir, exist_ok=True)
    base = os.path.join(dump_dir, data["name"])
    written = []
    for src in data["sources"]:
        path = os.path.join(dump_dir, src["file"])
        _write(path, src["text"])
        written.append(path)
    plain = dict(data, sources=[{k: v for k, v in s.items() if k != "text"} for s in data["sources"]])
    for ext, text in ((".txt", render_text(data)), (".json", json.dumps(plain, indent=1) + "\n"),
                      (".svg", render_svg(data)), (".dot", render_dot(data))):
        _write(base + ext, text)
        written.append(base + ext)
    return written


def write_dump(rep, dump_dir: str, index: int | None = None) -> list:
    """Dump one GraphReport into dump_dir (index: the graph's number; default: the next free one).

    Called for every compile when the `dump_dir` option or $FUSEBACKEND_DUMP_DIR is set: a failure here warns
    once and never breaks the compile."""
    try:
        os.makedirs(dump_dir, exist_ok=True)
        if index is None:
            index = _reserve_index(dump_dir, rep.kind)
        return write_files(graph_data(rep, index), dump_dir)
    except Exception as e:
        if not _warned:
            _warned.append(True)
            warnings.warn("fusebackend: could not write the graph dump to %r: %s: %s"
                          % (dump_dir, type(e).__name__, e))
        return []
