"""Vertical fusion: producer -> consumer chains of pointwise ops, reductions with their prologue and epilogue,
and multi-reduction row patterns (softmax, layer norm, RMS norm) as one group over one iteration domain.

A pass: FusionGraph -> list of Groups in a valid execution order. It never compiles anything.
"""
from __future__ import annotations

from ..graph import registry
from ..graph import indexing
from ..graph.effects import buffer_roots
from ..graph.indexing import is_cat, is_take
from ..graph.fusion_graph import FusionGraph, Ref, ref_names_in
from .groups import FUSABLE, Group, data_users, finish_io
from .inplace import stores_ok
from .schedule import order_groups
from .shapes import fits, is_per_row, outer_shapes, squeeze_ones

MAX_GROUP_NODES = 200
REMAPPABLE_VIEWS = ("expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "alias", "detach", "view",
                    "_unsafe_view", "reshape", "slice", "select")

# views whose output index reads another index of their input (not only the same element, re-shaped)
INDEX_MOVING_VIEWS = ("permute", "transpose", "t", "slice", "select", "as_strided")


def view_is_remappable(fg: FusionGraph, name: str) -> bool:
    """Views a kernel can express as index arithmetic on its input without knowing sizes at compile time."""
    node = fg.node(name)
    op = node.op_name.split(".")[0]
    if op not in REMAPPABLE_VIEWS or not isinstance(node.args[0], Ref) or node.meta is None:
        return False
    src = fg.meta_of(node.args[0])
    if src is None or node.args[0].item is not None:
        return False
    if op in ("view", "_unsafe_view", "reshape"):
        return squeeze_ones(src.shape) == squeeze_ones(node.meta.shape)
    if op in ("slice", "select"):
        return all(isinstance(a, int) for a in node.args[1:])
    return True


class _Fuser:
    def __init__(self, fg: FusionGraph):
        self.fg = fg
        self.group_of: dict[str, int] = {}
        self.members: dict[int, list] = {}
        self.reduction: dict[int, object] = {}
        self.outputs = fg.output_names()
        self.max_nodes = MAX_GROUP_NODES
        self.roots = buffer_roots(fg)       # value -> the buffer it aliases (stores_ok: reads of written inputs)
        self._data_users: dict[str, list] = {}
        # per-node facts every candidate merge asks of each member again (the graph does not change here): a
        # 200-tensor optimizer step asks ~15k merges of 28-node chains
        self.op = {name: d["op"] for name, d in fg.g.nodes(data=True)}
        self.takes = {n for n, node in self.op.items() if is_take(node.target)}
        self._reads: dict[str, tuple] = {}
        self._users: dict[str, list] = {}
        self._reduction: dict[str, tuple] = {}
        self._readers: dict[str, frozenset] = {}
        self._fits: dict[tuple, bool] = {}

    def reads(self, name: str) -> tuple:
        got = self._reads.get(name)
        if got is None:
            node = self.op[name]
            got = self._reads[name] = tuple(ref_names_in((node.args, node.kwargs), []))
        return got

    def readers(self, name: str) -> frozenset:
        got = self._readers.get(name)
        if got is None:
            got = self._readers[name] = frozenset(self.data_users(name))
        return got

    def fits(self, shape: tuple, dom: tuple) -> bool:
        got = self._fits.get((shape, dom))
        if got is None:
            got = self._fits[(shape, dom)] = fits(shape, dom)
        return got

    def users(self, name: str) -> list:
        got = self._users.get(name)
        if got is None:
            got = self._users[name] = self.fg.users(name)
        return got

    def data_users(self, name: str) -> list:
        """groups.data_users, once per node: every candidate merge asks it of each member (the graph does not
        change while its nodes are grouped), which made the pass quadratic in a chain's length."""
        got = self._data_users.get(name)
        if got is None:
            got = self._data_users[name] = data_users(self.fg, name)
        return got

    def fusable(self, name: str) -> bool:
        node = self.fg.node(name)
        if node.kind not in FUSABLE or node.meta is None:
            return False
        if node.kind == "view":
            external = name in self.outputs or any(self.fg.node(u).kind not in FUSABLE for u in self.fg.users(name))
            return view_is_remappable(self.fg, name) and not external and not self.views_outside(name)
        return True

    def reduction_of(self, name: str):
        got = self._reduction.get(name)
        if got is None:
            node = self.op[name]
            red = registry.normalize_reduction(node.target, node.args, node.kwargs)
            src = self.fg.meta_of(red.input)
            got = self._reduction[name] = (registry.finish_reduction(red, src.rank), src.shape)
        return got

    def domain(self, names):
        """(domain, reduce_dims) of a candidate member set, or None when it cannot be one kernel."""
        op = self.op
        members = [(n, op[n]) for n in names]
        reds = set()
        for n, node in members:
            if node.kind == "reduction":
                red, in_shape = self.reduction_of(n)
                reds.add((in_shape, red.dims))
        if len(reds) > 1:
            return None
        if reds and any(is_cat(node.target) for _, node in members):
            return None                          # a row plan reads every value at the row's own index
        if reds and self.moves_reduced_values(names):
            return None
        shapes = [node.meta.shape for _, node in members]
        # written: read outside the kernel (order edges are no reads), or a store into an input
        written = {n for n, node in members if n in self.outputs or registry.is_store(node)
                   or not self.readers(n) <= names}
        if reds:
            dom, rdims = next(iter(reds))
        elif written:
            # the domain is the written values' shape; a value only read inside the kernel is computed at
            # whatever index its readers ask for (a slice, a cat input), whatever its own shape
            dom, rdims = op[min(written, key=lambda n: op[n].index)].meta.shape, ()
        else:
            dom, rdims = max(shapes, key=len), ()
            for s in shapes:                     # the domain must be one member's shape, all others fit it
                if fits(dom, s) and len(s) >= len(dom):
                    dom = s
        keep, drop = outer_shapes(dom, rdims)
        index_only = self.index_only(names, written)
        prologue = self.prologue_only(names, written) if rdims else set()
        for n, node in members:
            s = node.meta.shape
            if node.kind == "reduction":
                continue
            needs_write = n in written
            # read inside only: computed at whatever index is asked (in a row kernel, only index tensors:
            # a take asks for them at its own output's position)
            loose = not (rdims or needs_write) or n in index_only or n in prologue
            if not (self.fits(s, dom) or (rdims and s == drop) or loose):
                return None
            if needs_write and s != dom and not (rdims and s in (keep, drop)):
                return None
            if rdims and s == drop and len(drop) != len(dom) and not is_per_row(s, dom, rdims):
                return None
            if rdims and len(s) == len(dom) and node.kind != "view":
                indices = self._indices_of(n)      # (a take reads its indices at its own leading dims)
                for p in self.fg.producers(n):     # a dropped-dims value broadcast right-aligned is not per row
                    ps = self.fg.node(p).meta.shape if self.fg.node(p).meta else None
                    if p in names and p not in indices and ps == drop and len(drop) != len(dom):
                        return None
        return dom, rdims

    def index_only(self, names, written) -> set:
        """Members read only as the index of a take (the position ids of an embedding), directly or through
        pointwise ops and views that are themselves index-only."""
        out = set()
        if self.takes.isdisjoint(names):
            return out
        for n in sorted(names, key=lambda n: -self.fg.node(n).index):
            if n in written or self.fg.node(n).kind not in ("pointwise", "view"):
                continue
            users = [u for u in self.fg.users(n) if u in names]
            if users and all(u in out or n in self._indices_of(u) for u in users):
                out.add(n)
        return out

    def prologue_only(self, names, written) -> set:
        """Members of a reduction group read only inside it, through views, before any reduction: computed
        at whatever index the views ask for, as in a pointwise kernel (batch norm + ReLU read by a max pool's
        strided slices, then a mean)."""
        out, after = set(), set()
        for n in sorted(names, key=lambda n: self.fg.node(n).index):
            node = self.fg.node(n)
            if node.kind == "reduction" or any(p in after for p in self.fg.producers(n)):
                after.add(n)
        for n in sorted(names, key=lambda n: -self.fg.node(n).index):
            node = self.fg.node(n)
            if n in written or n in after or node.kind not in ("pointwise", "view"):
                continue
            users = [self.fg.node(u) for u in self.fg.users(n) if u in names]
            if users and all(u.name in out or (u.kind == "view" and u.name not in after) for u in users):
                out.add(n)
        return out

    def _indices_of(self, name: str) -> set:
        """The index tensors' node names when `name` is a take (those that are not also its source)."""
        node = self.fg.node(name)
        if node.kind != "pointwise" or not is_take(node.target):
            return set()
        take = indexing.normalize(node.target, node.args, node.kwargs, self.fg.meta_of, node.meta)
        return {i.name for i in take.indices} - {take.src.name} if take is not None else set()

    def moves_reduced_values(self, names) -> bool:
        """A view or take that may read a value computed from the group's reduction at another index than
        its own (layer_norm(x)[9], a permute of a softmax, a gather from one): the row kernel has that value
        only at the row it is on."""
        derived = set()
        for n in sorted(names, key=lambda n: self.fg.node(n).index):
            node = self.fg.node(n)
            if node.kind == "reduction" or any(p in derived for p in self.fg.producers(n)):
                derived.add(n)
                if node.kind == "view" and node.op_name.split(".")[0] in INDEX_MOVING_VIEWS:
                    return True
                if node.kind == "pointwise" and is_take(node.target):     # embedding of a normalised table
                    return True
        return False

    def views_outside(self, name: str) -> bool:
        """A view of a value no kernel computes (an input, an ATen result) stays a zero-copy view that kernels
        read through its strides: as a member it could only make a kernel's shape irregular and keep its
        group from joining another (a transposed weight in a GEMV prologue, k.float().transpose(-2, -1))."""
        src = self.fg.node(name).args[0]
        return self.fg.node(src.name).kind in ("placeholder", "symbol") or not self.fusable(src.name)

    def creates_cycle(self, merged: set) -> bool:
        """A path leaving the merged set and coming back (through nodes or through other groups)."""
        op = self.op
        top = max(op[n].index for n in merged)
        frontier = [u for n in merged for u in self.users(n) if u not in merged]
        seen = set()
        while frontier:
            x = frontier.pop()
            if x in seen:
                continue
            seen.add(x)
            mates = self.members.get(self.group_of.get(x), [x])
            for y in mates:
                if y in merged:
                    return True
                if y not in seen and y != x:
                    frontier.append(y)
                if op[y].index < top:
                    frontier.extend(u for u in self.users(y) if u not in seen)
        return False

    def try_merge(self, a: int, b: int) -> bool:
        if a == b:
            return False
        names = self.members[a] + self.members[b]
        if len(names) > self.max_nodes:
            return False
        op = self.op
        devices = {op[n].device for n in names}
        merged = set(names)
        dom = self.domain(merged) if len(devices) == 1 else None
        if dom is None or not stores_ok(self.fg, merged, dom[0], dom[1], self.roots, self.reads):
            return False
        if self.creates_cycle(merged):
            return False
        for n in self.members[b]:
            self.group_of[n] = a
        self.members[a] = sorted(names, key=lambda n: op[n].index)
        del self.members[b]
        return True

    def run(self) -> list:
        fg = self.fg
        for node in fg.nodes():
            if node.kind in ("placeholder", "symbol"):
                continue
            gid = node.index
            self.members[gid] = [node.name]
            self.group_of[node.name] = gid
            self.merge_producers(node.name)
        # a view is visited before its readers: its merge upwards was refused while it still had to be
        # written (cat -> slice -> sub: the slice joins the sub's group later); more sweeps retry while one
        # merges something (a pool's row slice joins its window's group in one, the ReLU above it the next)
        for _ in range(4):
            changed = False
            for node in fg.nodes():
                if node.name in self.group_of:
                    changed |= self.merge_producers(node.name)
            if not changed:
                break
        return self.build()

    def merge_producers(self, name: str) -> bool:
        """Merge `name`'s group with its producers' where one kernel can hold both; whether any merged."""
        if not self.fusable(name):
            return False
        merged = False
        # a merge refused as a cycle can succeed once another producer has joined (q = x * cos +
        # cat(-x2, x1) * sin: x's group and the cat's meet only in the add): retry until nothing changes
        pending = [p for p in self.fg.producers(name) if p in self.group_of and self.fusable(p)]
        while pending:
            left = [p for p in pending if not self.try_merge(self.group_of[p], self.group_of[name])
                    and self.group_of[p] != self.group_of[name]]
            if len(left) == len(pending):
                break
            merged, pending = True, left
        return merged

    def build(self) -> list:
        groups = []
        for names in self.members.values():
            kinds = {self.fg.node(n).kind for n in names}
            device = self.fg.node(names[0]).device
            if kinds <= {"view"} or not kinds <= set(FUSABLE):
                for n in names:                  # lone views (and held constants) run without a launch
                    k = self.fg.node(n).kind
                    groups.append(Group(len(groups), "view" if k in ("view", "constant") else "opaque", [n],
                                        device))
                continue
            dom, rdims = self.domain(set(names))
            kind = "reduction" if "reduction" in kinds else "pointwise"
            groups.append(Group(len(groups), kind, list(names), device, tuple(dom), tuple(rdims)))
        finish_io(self.fg, groups)
        return order_groups(self.fg, groups)


def fuse_vertical(fg: FusionGraph, max_nodes: int = MAX_GROUP_NODES) -> list:
    """Group the graph's nodes into kernels (pointwise / reduction), ATen calls and views, in execution order."""
    fuser = _Fuser(fg)
    fuser.max_nodes = max_nodes
    return fuser.run()
