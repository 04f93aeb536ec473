"""Max pooling as strided slices and `maximum`: `max_pool2d_with_indices` whose indices nobody reads (every
inference graph) becomes, for a kh x kw window, the elementwise maximum of kh * kw strided slices of its input.
Those are views and a pointwise op, so the pool fuses with the ReLU / batch norm that produce its input and
with what reads it, instead of an ATen pass of its own over the activation.

Only without padding (a padded window would need -inf outside the input) and where the output size is the
floor-mode size; otherwise the ATen op stays. NaN propagates as ATen's kernel does (`maximum` propagates it).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def _pair(v, default):
    v = default if v is None or (isinstance(v, (list, tuple)) and len(v) == 0) else v
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * 2 if len(v) == 1 else v


def _window(node: fx.Node):
    """(kernel, stride, dilation) as pairs of ints, or None where the slices would not be the pool."""
    a = list(node.args) + [None] * (6 - len(node.args))
    kernel = _pair(a[1], None)
    stride = _pair(a[2] if a[2] is not None else node.kwargs.get("stride"), kernel)
    padding = _pair(a[3] if a[3] is not None else node.kwargs.get("padding", 0), [0])
    dilation = _pair(a[4] if a[4] is not None else node.kwargs.get("dilation", 1), [1])
    if any(not isinstance(v, int) for v in kernel + stride + padding + dilation) or any(padding):
        return None
    return kernel, stride, dilation


def _slice(graph: fx.Graph, src: fx.Node, dim: int, start: int, end: int, step: int) -> fx.Node:
    node = graph.call_function(aten.slice.Tensor, (src, dim, start, end, step))
    node.meta["val"] = aten.slice.Tensor(src.meta["val"], dim, start, end, step)
    return node


def rewrite_max_pools(gm: fx.GraphModule) -> int:
    """Rewrite the graph's eligible max pools in place; returns how many."""
    graph, done = gm.graph, 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.max_pool2d_with_indices.default:
            continue
        users = list(n.users)
        if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        x, window = n.args[0], _window(n)
        xv, outs = x.meta.get("val") if isinstance(x, fx.Node) else None, n.meta.get("val")
        if window is None or not isinstance(xv, torch.Tensor) or not isinstance(outs, (tuple, list)):
            continue
        (kh, kw), (sh, sw), (dh, dw) = window
        h, w = xv.shape[-2:]
        oh, ow = outs[0].shape[-2:]
        if not all(isinstance(v, int) for v in (h, w, oh, ow)) or oh < 1 or ow < 1 or \
                (oh, ow) != ((h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1):
            continue
        hd, wd = xv.dim() - 2, xv.dim() - 1
        with graph.inserting_before(n):
            acc = None
            for i in range(kh):
                rows = _slice(graph, x, hd, i * dh, i * dh + sh * (oh - 1) + 1, sh)
                for j in range(kw):
                    piece = _slice(graph, rows, wd, j * dw, j * dw + sw * (ow - 1) + 1, sw)
                    if acc is None:
                        acc = piece
                        continue
                    val = aten.maximum.default(acc.meta["val"], piece.meta["val"])
                    acc = graph.call_function(aten.maximum.default, (acc, piece))
                    acc.meta["val"] = val
        for u in users:
            u.replace_all_uses_with(acc)
            graph.erase_node(u)
        graph.erase_node(n)
        done += 1
    return done
