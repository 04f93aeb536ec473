"""What the placement pattern finders report (plain data), and the small graph walks they share.

Sizes are ints where static, else the symbol's text as TensorMeta holds it ('s0', 'u3'); bytes are ints,
0 where a size is symbolic. Node sets are FusionGraph node names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..graph import FusionGraph, Ref, TensorMeta

Size = Union[int, str]


@dataclass(frozen=True)
class WeightUse:
    """One weight an expert reads: a graph input (placeholder, or a lifted constant), whole or one expert's
    slice along dim 0 of a 3-D parameter (`expert_index`); `shape`/`bytes` are those of what it reads."""
    input: str
    expert_index: Optional[int]
    shape: tuple
    dtype: object
    bytes: int
    role: str                       # gate | up | gate_up | down, with a "_bias" suffix for a bias
    label: Optional[str] = None     # the user's name for the input (fg.input_labels), where capture gave it


@dataclass(frozen=True)
class Router:
    """The gate of one MoE layer: its linear, the score normalisation and the top-k (not any candidate's)."""
    layer: int
    topk: str
    nodes: frozenset
    input: Ref
    experts: int
    top_k: Size
    label: Optional[str] = None


@dataclass(frozen=True)
class ExpertCandidate:
    """One expert FFN. form: "loop" (its own ops, with its router in the graph), "graph" (the whole graph
    is this FFN: Dynamo broke the graph around an expert the model calls from an eager loop; the router
    ran in another graph, so expert is None), "batched" (bmm over per-token gathered 3-D weights) or
    "grouped" (grouped_mm over a 3-D weight): batched/grouped experts of one layer share one node set and
    differ in their weight slice; "dense" for a shared (always-on) expert.
    entry: the activation it reads (its tokens, already gathered); exit: its result before the routing
    weight and the scatter back. side_inputs: other values it reads that are neither (expert ids, offsets).
    tokens: rows its matrix products see (batched/grouped: all token-expert pairs of the layer)."""
    layer: int
    expert: Optional[int]
    kind: str                       # routed | shared
    form: str
    nodes: frozenset
    weights: tuple
    hidden: int
    ffn: int
    tokens: Size
    dtype: object
    entry: Ref
    exit: str
    gated: bool
    router: Optional[str] = None
    side_inputs: tuple = ()
    label: Optional[str] = None

    @property
    def weight_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def flops_per_token(self) -> int:
        return 2 * self.hidden * self.ffn * (3 if self.gated else 2)


@dataclass(frozen=True)
class AttentionCandidate:
    """One attention. form: "sdpa" | "matmul" (matmul -> softmax -> matmul). q/k/v: the tensors it reads,
    before any GQA repeat (k, v: [batch, kv_heads, context, head_dim]). kv_source: "input" (K/V are graph
    inputs: a KV cache read as is), "updated" (a cache input updated in the graph with the new rows:
    kv_updates are those ops, not in `nodes`), "computed" (K/V computed in the graph: no cache).
    kv_bytes: K and V as read (0 where the context is symbolic); kv_bytes_per_position: per context row."""
    layer: int
    form: str
    nodes: frozenset
    q: Ref
    k: Ref
    v: Ref
    exit: Ref
    batch: Size
    q_heads: Size
    kv_heads: Size
    q_len: Size
    context: Size
    head_dim: Size
    dtype: object
    kv_source: str
    kv_inputs: tuple
    kv_updates: tuple
    kv_bytes: int
    kv_bytes_per_position: int
    side_inputs: tuple = ()
    label: Optional[str] = None

    @property
    def kv_from_input(self) -> bool:
        return self.kv_source != "computed"


@dataclass
class Patterns:
    experts: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    routers: list = field(default_factory=list)

    def describe(self) -> str:
        """One line per candidate (explain / dump)."""
        out = []
        for r in self.routers:
            out.append("router   layer %d: %s experts, top-%s at %s" % (r.layer, r.experts, r.top_k, r.topk))
        for e in self.experts:
            out.append("expert   layer %d expert %s: %s %s, hidden %s ffn %s tokens %s, %d weight bytes%s" % (
                e.layer, "-" if e.expert is None else e.expert, e.kind, e.form, e.hidden, e.ffn, e.tokens,
                e.weight_bytes, " (%s)" % e.label if e.label else ""))
        for a in self.attention:
            out.append("attention layer %d: %s, batch %s heads %s/%s q_len %s context %s head_dim %s, KV %s%s" % (
                a.layer, a.form, a.batch, a.q_heads, a.kv_heads, a.q_len, a.context, a.head_dim, a.kv_source,
                " (%s)" % a.label if a.label else ""))
        return "\n".join(out)


# ---- graph helpers shared by the finders ----

VIEW_OPS = {"view", "_unsafe_view", "reshape", "alias", "unsqueeze", "squeeze", "expand", "permute",
            "transpose", "t", "slice", "select", "clone", "detach"}
CASTS = {"_to_copy", "convert_element_type"}


def op(fg: FusionGraph, name: str) -> str:
    """The op's packet name ('mm', 'topk', 'placeholder', ...)."""
    node = fg.node(name)
    if node.target is None:
        return node.kind
    return node.op_name.split(".")[0]


def tensor_args(fg: FusionGraph, name: str) -> list:
    """The node's tensor operands (Refs) in argument order, lists flattened."""
    out = []

    def walk(v):
        if isinstance(v, Ref):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
    walk(fg.node(name).args)
    walk(tuple(fg.node(name).kwargs.values()))
    return out


def arg(fg: FusionGraph, name: str, i: int, default=None):
    args = fg.node(name).args
    return args[i] if i < len(args) else default


def meta(fg: FusionGraph, ref) -> Optional[TensorMeta]:
    try:
        return fg.meta_of(ref)
    except (KeyError, IndexError):
        return None


def is_input(fg: FusionGraph, name: str) -> bool:
    return fg.node(name).kind in ("placeholder", "constant")


def base_of(fg: FusionGraph, ref: Ref, ops=("view", "_unsafe_view", "reshape", "alias")) -> Ref:
    """The value a chain of reshaping views starts from."""
    while ref.item is None and op(fg, ref.name) in ops and tensor_args(fg, ref.name):
        ref = tensor_args(fg, ref.name)[0]
    return ref


def numel_bytes(m: Optional[TensorMeta], shape=None) -> int:
    shape = m.shape if shape is None and m is not None else shape
    if m is None or not all(isinstance(s, int) for s in shape):
        return 0
    n = 1
    for s in shape:
        n *= s
    return n * m.dtype.itemsize


def common_label(labels) -> Optional[str]:
    """The longest dotted prefix the labels share (layers.0.mlp.experts.gate_up_proj, ...down_proj ->
    layers.0.mlp.experts); one label alone: its parent (gate.weight -> gate). None without labels."""
    parts = [lab.split(".") for lab in dict.fromkeys(lab for lab in labels if lab)]
    if not parts:
        return None
    prefix = parts[0][:-1] if len(parts) == 1 else parts[0]
    for p in parts[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix) or None
