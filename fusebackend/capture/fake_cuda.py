"""Tracing a model for CUDA on a machine without a GPU: the Dynamo graph is retargeted to fake CUDA tensors.

The CPU build of torch creates fake CUDA tensors (FakeTensorMode), and AOT autograd traces them as it would
real ones, with three gaps this module closes on the Dynamo graph before AOT runs:
- `t[idx]` and `t.contiguous()` take a real CUDA device guard in their Python bindings: they are spelled
  as the aten ops they dispatch to (slice/select/unsqueeze/index, clone).
- Devices written into the graph (`torch.arange(n, device=x.device)` on the CPU trace) become cuda.
- SDPA's backend choice needs the CUDA build: `sdpa_sm90` makes it as torch 2.11 did on the H100 for the
  zoo's HF models -- flash for half types without a mask, memory-efficient with a mask whose last dim has
  stride 1, else the math path (BERT's expanded padding mask). Checked against H100 counts at 050dc34:
  hf_gpt2 42 kernels / 65 ATen calls, hf_llama 32 / 38, hf_bert 97 / 96, all reproduced.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


def aten_getitem(t, idx):
    """t[idx] through aten ops: ints, slices, None, Ellipsis and integer index tensors (after the others)."""
    idx = idx if isinstance(idx, tuple) else (idx,)

    def consumes(i):
        if i is None or i is Ellipsis:
            return 0
        return i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1

    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (t.dim() - sum(consumes(i) for i in idx)) + idx[k + 1:]
    out, dim, picked = t, 0, {}
    for i in idx:
        if i is None:
            out, dim = aten.unsqueeze(out, dim), dim + 1
        elif isinstance(i, torch.Tensor) and i.dtype != torch.bool:
            picked[dim], dim = i, dim + 1
        elif isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool) and not picked:
            out = aten.select(out, dim, i)
        elif isinstance(i, slice):
            if i != slice(None):
                out = aten.slice(out, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        else:
            raise NotImplementedError("fake_cuda: index %r" % (i,))
    if picked:
        out = aten.index(out, [picked.get(d) for d in range(max(picked) + 1)])
    return out


def aten_contiguous(t, memory_format=torch.contiguous_format):
    return t if t.is_contiguous(memory_format=memory_format) else aten.clone(t, memory_format=memory_format)


def sdpa_sm90(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    half = q.dtype in (torch.float16, torch.bfloat16)
    if enable_gqa or q.size(-1) % 8 or (attn_mask is not None and attn_mask.stride(-1) != 1):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is None and half and q.size(-1) <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask.logical_not(), float("-inf"),
                                    torch.scalar_tensor(0.0, dtype=q.dtype, device=q.device))
        attn_mask = attn_mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))
    return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, False, dropout_p, is_causal,
                                                        scale=scale)[0]


def aten_setitem(t, idx, value):
    """t[idx] = value through aten for an index tensor (the Python binding takes a real CUDA device guard,
    as getitem does: transformers' grouped_mm writes its inverse permutation so)."""
    if isinstance(idx, torch.Tensor) and idx.dtype != torch.bool:
        value = value if isinstance(value, torch.Tensor) else torch.tensor(value, device=t.device)
        aten.index_put_(t, [idx], value)
    else:
        operator.setitem(t, idx, value)


def _stay(t):
    return t


def _cuda(x):
    if isinstance(x, torch.device) and x.type == "cpu":
        return CUDA
    if isinstance(x, str) and x == "cpu":
        return "cuda"
    if isinstance(x, (list, tuple)):
        return type(x)(_cuda(v) for v in x)
    return x


def retarget(gm: torch.fx.GraphModule, emulate_cuda_build: bool = True) -> torch.fx.GraphModule:
    """gm (a Dynamo graph traced on the CPU), rewritten in place to run on fake CUDA tensors. On a CUDA
    build of torch (emulate_cuda_build=False) only the devices change: indexing and SDPA need no stand-ins."""
    for n in gm.graph.nodes:
        n.args, n.kwargs = _cuda(n.args), {k: _cuda(v) for k, v in n.kwargs.items()}
        if not emulate_cuda_build:
            continue
        if n.op == "call_function" and n.target is operator.getitem and \
                isinstance(n.args[0], torch.fx.Node) and isinstance(n.args[0].meta.get("example_value"), torch.Tensor):
            n.target = aten_getitem
        elif n.op == "call_function" and n.target is operator.setitem:
            n.target = aten_setitem
        elif n.op == "call_function" and n.target in (F.scaled_dot_product_attention,
                                                       torch._C._nn.scaled_dot_product_attention):
            n.target = sdpa_sm90
        elif n.op == "call_method" and n.target == "contiguous":
            n.op, n.target = "call_function", aten_contiguous
        elif n.op == "call_method" and n.target in ("cpu", "cuda"):
            n.op, n.target, n.args = "call_function", _stay, n.args[:1]
    gm.recompile()
    return gm


def fake_inputs(fake_mode, example_inputs, gm=None) -> list:
    """Fake CUDA tensors with the example inputs' sizes, strides and dtypes (others passed through). With
    the Dynamo graph `gm`, sizes come from its placeholders' fake values, so a dynamic dim stays symbolic
    (the real example inputs only hold this call's sizes: a graph traced from them would be specialised to
    them while Dynamo's guards admit every size)."""
    values = list(example_inputs)
    if gm is not None:
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(holders) == len(values):
            values = [n.meta.get("example_value", x) if isinstance(x, torch.Tensor) else x
                      for n, x in zip(holders, values)]
            values = [v if isinstance(v, torch.Tensor) == isinstance(x, torch.Tensor) else x
                      for v, x in zip(values, example_inputs)]
    with fake_mode:
        return [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
                if isinstance(x, torch.Tensor) else x for x in values]
