"""Views at run time: a view, or a chain of views whose intermediates no other step reads, as one
`as_strided` of its base.

Every view op called through its OpOverload costs the dispatcher and the Python around it, per call; HF
BERT's forward takes ~350 of them (`view`, `permute`, `expand` around each matmul), and on a GPU host they
are wall time the GPU waits for. The first call runs the ops and records where the result lies in the
base's storage (sizes, strides, offset from the base's offset); later calls with a base of the same sizes and
strides rebuild it with one `as_strided`. Anything else (another layout, a reshape that copied, a dtype
view) runs the ops as before.
"""
from __future__ import annotations

from ..graph.fusion_graph import Ref
from .steps import AtenStep, ref_names


class ViewStep:
    """nodes: the chain in order (nodes[0] reads the base; each later one reads the one before)."""
    kind = "aten"

    def __init__(self, nodes):
        self.chain = [AtenStep(n) for n in nodes]
        self.name = nodes[-1].name
        self.inner = [n.name for n in nodes[:-1]]
        base = nodes[0].args[0]
        self.base_name, self.base_item = base.name, base.item
        self.reads = ref_names((nodes[0].args, nodes[0].kwargs))
        self.plan = None            # (base sizes, base strides, sizes, strides, offset delta in elements)
        self.itemsize = 0
        self.planned = False

    def __call__(self, env):
        base = env[self.base_name] if self.base_item is None else env[self.base_name][self.base_item]
        plan = self.plan
        if plan is not None and base.shape == plan[0] and base.stride() == plan[1]:
            env[self.name] = base.as_strided(plan[2], plan[3], base.storage_offset() + plan[4])
            return
        for step in self.chain:
            step(env)
        for name in self.inner:
            del env[name]
        if not self.planned:
            self.planned = True
            self.plan = _plan(base, env[self.name])
            self.itemsize = base.element_size()

    def run(self, source):
        """The view of `source` (what the base's name holds: the tensor, or the tuple `base_item` indexes)."""
        env = {self.base_name: source}
        self(env)
        return env[self.name]


def _plan(base, out):
    """Where `out` lies in `base`'s storage, or None when it is not a plain strided view of it."""
    try:
        same = out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):     # tensors without storage (subclasses, fakes)
        return None
    if not same or out.dtype != base.dtype or out.device != base.device:
        return None
    plan = (base.shape, base.stride(), tuple(out.shape), out.stride(), out.storage_offset() - base.storage_offset())
    # the replay must give what the ops gave: the same type (a Parameter's views are plain tensors, as are its
    # as_strided results; a subclass may differ) and layout
    try:
        again = base.as_strided(plan[2], plan[3], base.storage_offset() + plan[4])
    except Exception:                               # a subclass that does not take as_strided
        return None
    if type(again) is not type(out) or again.stride() != out.stride() or again.data_ptr() != out.data_ptr():
        return None
    return plan


def view_chains(fg, groups, keep: set) -> tuple:
    """(absorbed, chains): view nodes read only by the next view of a chain (computed inside it, never
    stored), and for every other view node with a tensor base and no other tensor operand, its chain."""
    def plain(node):
        refs = ref_names((node.args, node.kwargs))
        return node.kind == "view" and node.args and isinstance(node.args[0], Ref) and refs == {node.args[0].name}

    view_nodes = {n for g in groups if g.kind == "view" for n in g.nodes if plain(fg.node(n))}
    absorbed = set()
    for name in view_nodes:
        users = fg.users(name)
        if len(users) == 1 and users[0] in view_nodes and name not in keep and \
                fg.node(users[0]).args[0] == Ref(name):
            absorbed.add(name)
    chains = {}
    for name in view_nodes - absorbed:
        chain = [fg.node(name)]
        while chain[0].args[0].name in absorbed:
            chain.insert(0, fg.node(chain[0].args[0].name))
        chains[name] = chain
    return absorbed, chains
