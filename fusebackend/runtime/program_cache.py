"""The program cache: what a compiled graph needs to become its Program again, on disk, keyed by the graph that
reaches compile_graph, so a warm start (a new process, the same model) skips lowering, the passes and emission.

Key: the ATen graph's nodes (op, name, target, args, and each value's shape / strides / dtype / device as
lowering reads them; the placeholders' are the inputs', and compile_graph reads nothing else of a call), the
options that shape a compile, torch's intra-op threads (the horizontal cost rule reads them), and the
versions of everything else that does: this package's source, torch, networkx, Python.
Value: the FusionGraph, groups, batches and kernel sources as they stand after emission (program_codec.py:
JSON, no pickle); a hit rebuilds the kernels from the kernel cache (compiling any that are gone) and runs
build_program, as a cold compile does -- so whatever else a later stage of compile_graph comes to hand
build_program must be stored here too. Location: `programs/` in the kernel cache folder.

Anything unexpected -- an entry that fails its checksum, does not decode, names an op this torch lacks, or a
kernel that does not load -- is a miss: the graph compiles as usual and its entry is written again. Not cached:
placement graphs (gpu_memory_budget), graphs holding a value the codec cannot write, and compiles where a
kernel failed to build (the next one may succeed).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass, fields

import networkx as nx
import torch
import torch.fx as fx

from . import cache
from .build import compile_kernel
from .program_codec import Decoder, Encoder, Unserialisable, decode_graph, encode_graph
from ..graph.fusion_graph import TensorMeta

FORMAT = 1
ENV = "FUSEBACKEND_PROGRAM_CACHE"
# options that do not change what a compile produces
_NOT_KEYED = {"program_cache", "cache_dir", "dump_dir", "compile_threads"}
_SOURCE_SUFFIXES = (".py", ".h", ".c", ".cpp", ".cu", ".cuh")

# what this process did, for tests and bench/warm_start.py
stats = {"hits": 0, "misses": 0, "stores": 0, "bypassed": 0}


@dataclass
class Warm:
    """A cache hit: build_program's inputs, and what the GraphReport of a cold compile would hold."""
    fg: object
    groups: list
    batches: list
    specs: dict            # group id -> KernelSource
    kernels: dict          # group id -> (KernelSource, launch)
    sources: list          # distinct kernel sources, in the order a cold compile lists them
    fallbacks: list


def enabled(opts) -> bool:
    if opts.gpu_memory_budget is not None:
        return False
    if opts.program_cache is not None:
        return opts.program_cache
    return os.environ.get(ENV, "1") != "0"


def key(opts, kind: str, gm: fx.GraphModule) -> str | None:
    """The graph's cache key, or None: the cache is off, or the graph holds something it cannot key."""
    if not enabled(opts):
        return None
    try:
        graph = _graph_text(gm)
    except Exception:          # Unserialisable, or a graph lowering will refuse anyway: not cached
        stats["bypassed"] += 1
        return None
    opt_text = json.dumps([[f.name, getattr(opts, f.name)] for f in fields(opts) if f.name not in _NOT_KEYED],
                          default=repr)
    return cache.digest(FORMAT, package_digest(), torch.__version__, torch.version.git_version, nx.__version__,
                        sys.version, kind, opt_text, torch.get_num_threads(), graph)


def load(k: str, opts, gm: fx.GraphModule) -> Warm | None:
    """The cached program state for key `k` with its kernels loaded, or None (a miss, silently)."""
    try:
        blob = cache.load_verified(_path(k, opts))
        if blob is None:
            stats["misses"] += 1
            return None
        data = json.loads(zlib.decompress(blob))
        if data.get("format") != FORMAT or data.get("key") != k:
            raise ValueError("entry written for another key or format")
        warm = _decode(data, gm)
        warm.kernels, warm.sources = _load_kernels(warm.specs, opts)
    except Exception:          # corrupt, stale or unloadable: compile as usual, the entry is written again
        stats["misses"] += 1
        return None
    stats["hits"] += 1
    return warm


def encode(k: str, gm, fg, groups, batches, specs: dict, kernels: dict, fallbacks) -> dict | None:
    """The entry for a compile that reached build_program, or None when it should not be cached."""
    if any(gid not in kernels for gid in specs):     # a kernel failed to build: the next compile may do better
        return None
    try:
        enc = Encoder(_constants(gm), intern=True)
        entry = {"format": FORMAT, "key": k, "graph": encode_graph(enc, fg), "groups": enc.encode(list(groups)),
                 "batches": enc.encode(list(batches)), "specs": enc.encode(list(specs.items())),
                 "fallbacks": enc.encode(list(fallbacks))}
        entry["metas"] = enc.table
        return entry
    except Exception:          # Unserialisable (or a codec bug): this graph is not cached, the compile goes on
        stats["bypassed"] += 1
        return None


def store(k: str, opts, entry: dict) -> None:
    """Write the entry (atomic, with its checksum)."""
    try:
        blob = zlib.compress(json.dumps(entry, separators=(",", ":")).encode(), 1)
        cache.store(_path(k, opts), blob)
    except Exception:          # a cache that cannot be written only costs the next start its compile
        return
    stats["stores"] += 1


def _path(k: str, opts) -> str:
    root = os.path.join(cache.cache_dir(opts.cache_dir), "programs")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, k + ".json.z")


def _decode(data: dict, gm) -> Warm:
    dec = Decoder(gm, data["metas"])
    fg = decode_graph(dec, data["graph"])
    groups, batches = dec.decode(data["groups"]), dec.decode(data["batches"])
    specs = dict(dec.decode(data["specs"]))
    by_id = {g.id: g for g in groups}
    if any(n not in fg.g for g in groups for n in g.nodes) or any(
            gid not in by_id or not by_id[gid].is_kernel for gid in specs):
        raise ValueError("groups and kernels do not match the graph")
    for n in gm.graph.nodes:         # the user's source lines as they are now (not part of the key)
        if n.name in fg.g:
            fg.node(n.name).stack_trace = n.meta.get("stack_trace") or ""
    return Warm(fg, groups, batches, specs, {}, [], dec.decode(data["fallbacks"]))


def _load_kernels(specs: dict, opts):
    """Each distinct source from the kernel cache (compiled again if it is gone); an error propagates (the
    caller's miss). One after another: loading a cached library is ~0.3 ms, less than a thread pool's hand-offs."""
    launches = {}
    for spec in specs.values():
        if spec.source not in launches:
            launches[spec.source] = compile_kernel(spec, opts)
    return {gid: (spec, launches[spec.source]) for gid, spec in specs.items()}, list(launches)


def _constants(gm) -> dict:
    """id of each tensor the graph's get_attr nodes read -> its attribute path."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value = _attr(gm, n.target)
            if isinstance(value, torch.Tensor):
                out[id(value)] = n.target
    return out


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _KeyEncoder(Encoder):
    """Encodes FX args: a node by its name."""

    def encode(self, v):
        if type(v) is fx.Node:
            return ["n", v.name]
        return super().encode(v)


def _value_text(enc, val):
    """A node's value as lowering reads it: TensorMeta.of for tensors (the same calls, so the same shape
    guards), the text of a symbolic int, plain values as they are."""
    if isinstance(val, torch.Tensor):
        m = TensorMeta.of(val)
        return ["T", m.shape, enc.encode(m.dtype), m.stride, m.device, m.contiguous]
    if isinstance(val, (list, tuple)):
        return ["seq", [_value_text(enc, v) for v in val]]
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ["sym", type(val).__name__, str(val)]
    if val is None or type(val) in (bool, int, float, str):
        return val
    return ["other", type(val).__module__, type(val).__qualname__]


def _graph_text(gm) -> str:
    enc, parts = _KeyEncoder(), []
    for n in gm.graph.nodes:
        target = enc.encode(n.target) if n.op == "call_function" else str(n.target)
        val = n.meta.get("val")
        if n.op == "get_attr":          # a tensor constant: its layout (the value is read again from gm)
            val = _attr(gm, n.target)
            if not isinstance(val, torch.Tensor):
                raise Unserialisable("get_attr of a %s" % type(val).__name__)
        parts.append([n.op, n.name, target, enc.encode(n.args), enc.encode(dict(n.kwargs)), _value_text(enc, val)])
    return json.dumps(parts, separators=(",", ":"))


@functools.lru_cache(maxsize=None)
def package_digest() -> str:
    """A hash of this package's source (Python, kernel headers): any edit is a new key."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(_SOURCE_SUFFIXES):
                path = os.path.join(folder, f)
                with open(path, "rb") as fh:
                    h.update(b"%d:%s\0" % (len(path) - len(root), path[len(root):].encode()))
                    h.update(fh.read())
    return h.hexdigest()[:32]
