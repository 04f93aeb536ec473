"""Channels-last convolutions (passes/layout.py): on CUDA, a graph's 2-D convolutions read and write NHWC where
TorchInductor's rule says so, the kernels between them read and write that layout through their strides and
still fuse, and graph outputs keep eager's strides. CUDA graphs are planned on fake CUDA tensors here; the
whole path runs on the CPU under conv_layout="channels_last"."""
from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._guards import detect_fake_mode

import models
from fusebackend.capture import decompositions, fake_cuda, records
from fusebackend.emit import emit_kernel
from fusebackend.graph import lower
from fusebackend.options import FuseOptions, OptionError
from fusebackend.passes import layout, plan_groups
from fusebackend.runtime import cuda_compiler, steps
from numerics import assert_matches

CL = torch.channels_last


def cuda_graphs(model, *inputs, train=False) -> list:
    """The ATen graphs AOT autograd makes of model(*inputs) on fake CUDA tensors (forward graphs when train)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: None

    def capture(gm, example_inputs):
        runnable = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        fake = fake_cuda.fake_inputs(detect_fake_mode(example_inputs), example_inputs)
        aot_autograd(fw_compiler=keep, bw_compiler=keep, inference_compiler=keep,
                     decompositions=decompositions.table(1, True))(fake_cuda.retarget(gm), fake)
        return runnable.forward

    torch._dynamo.reset()
    if train:
        torch.compile(model, backend=capture)(*inputs)
    else:
        with torch.no_grad():
            torch.compile(model, backend=capture)(*inputs)
    return graphs


def cl(meta) -> bool:
    return meta is not None and layout.is_channels_last(meta) and not meta.contiguous


def small_cnn(dtype=torch.float32):
    model, inputs = models.get("small_cnn").make(size="small", device="cpu", dtype=dtype, seed=0)
    return model, inputs


class ConvAffine(nn.Module):
    """conv -> per-channel affine -> ReLU -> conv -> +1, sigmoid: two epilogues, the second a graph output."""

    def __init__(self, cin=3, mid=16, cout=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1)
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.rand(mid, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(mid, 1, 1))

    def forward(self, x):
        h = torch.relu(self.conv1(x) * self.scale + self.shift)
        return torch.sigmoid(self.conv2(h) + 1.0), h


def test_cuda_small_cnn_convolutions_read_and_write_channels_last():
    model, inputs = small_cnn(torch.bfloat16)
    (gm,) = cuda_graphs(model, *inputs)
    fg = lower(gm)
    before = [fg.meta_of(o) for o in fg.outputs]
    assert layout.decide(fg, "auto", training=False)
    layout.to_channels_last(fg, "auto", training=False)
    convs = layout.convolutions(fg)
    assert len(convs) == 2
    for c in convs:
        assert cl(fg.meta_of(c.args[0])) and cl(fg.meta_of(c.args[1])) and cl(c.meta), c.name
    relus = [n for n in fg.nodes() if n.op_name.startswith("relu")]
    assert relus and all(cl(n.meta) for n in relus)          # the epilogue writes the conv's layout
    # the pooled value feeds the second conv as it is: no copy between the blocks (the pool is slices + maximum)
    assert fg.node(convs[1].args[0].name).op_name.startswith("maximum")   # the pool (graph/pools.py)
    assert [fg.meta_of(o) for o in fg.outputs] == before


def test_epilogues_fuse_into_one_kernel_after_each_conv_and_outputs_keep_eager_strides():
    model, x = ConvAffine(), torch.randn(2, 3, 12, 12)
    (gm,) = cuda_graphs(model, x)
    fg = lower(gm)
    before = [fg.meta_of(o) for o in fg.outputs]
    groups, _ = plan_groups(fg, 200, "auto")
    convs = layout.convolutions(fg)
    assert len(convs) == 2 and all(cl(c.meta) for c in convs)
    owner = {n: g for g in groups for n in g.nodes}

    def epilogue(conv):
        readers = {owner[u].id for u in fg.users(conv.name)}
        assert len(readers) == 1, readers                      # one kernel reads the conv's output
        return owner[fg.users(conv.name)[0]]

    first, second = epilogue(convs[0]), epilogue(convs[1])
    assert first.kind == second.kind == "pointwise"
    ops1 = {fg.node(n).op_name.split(".")[0] for n in first.nodes}
    assert {"mul", "add", "relu"} <= ops1, ops1
    assert {"add", "sigmoid"} <= {fg.node(n).op_name.split(".")[0] for n in second.nodes}
    # the first epilogue writes NHWC for conv2 (and an NCHW copy of h for the graph output, in the same kernel)
    assert convs[1].args[0].name in first.nodes and cl(fg.meta_of(convs[1].args[0]))
    assert [fg.meta_of(o) for o in fg.outputs] == before
    assert all(fg.meta_of(o).contiguous for o in fg.outputs)
    assert {o.name for o in fg.outputs} <= set(first.nodes) | set(second.nodes)
    for g in groups:
        if g.is_kernel:
            assert emit_kernel(fg, g).target == "cuda"


def test_channels_last_cuda_kernels_compile_with_nvcc_for_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    model, inputs = small_cnn(torch.bfloat16)
    sources = {}
    for m, args in ((model, inputs), (ConvAffine(), (torch.randn(2, 3, 12, 12),))):
        (gm,) = cuda_graphs(m, *args)
        fg = lower(gm)
        groups, _ = plan_groups(fg, 200, "auto")
        assert any(cl(c.meta) for c in layout.convolutions(fg))
        for g in groups:
            if g.is_kernel:
                spec = emit_kernel(fg, g)
                sources[spec.name] = spec.source
    for name, source in sources.items():
        src = tmp_path / ("%s.cu" % name)
        src.write_text(source)
        res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-I", cuda_compiler.INCLUDE, str(src),
                              "-o", str(tmp_path / ("%s.o" % name))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("width, groups, train, expect", [
    (16, 1, False, True),        # inference: small channels still win (0.783)
    (16, 1, True, False),        # training: every conv has <= 64 channels
    (80, 1, True, True),
    (128, 2, True, False),       # grouped, more than one in-channel per group
    (128, 2, False, False),      # grouped convs are slower channels-last (1.358)
])
def test_decision_follows_inductors_rule(width, groups, train, expect):
    model = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3, groups=groups))
    (gm,) = cuda_graphs(model, torch.randn(1, 3, 10, 10))
    assert layout.decide(lower(gm), "auto", training=train) is expect


def test_in_channels_twice_the_out_channels_are_left_alone_in_training():
    model = nn.Sequential(nn.Conv2d(3, 160, 1), nn.Conv2d(160, 64, 3))
    (gm,) = cuda_graphs(model, torch.randn(1, 3, 10, 10))
    fg = lower(gm)
    assert layout.conv_class(fg, layout.convolutions(fg)[1]) == "in_out"
    assert not layout.decide(fg, "auto", training=True) and layout.decide(fg, "auto", training=False)


def test_a_conv_in_a_large_graph_is_left_alone():
    def f(x, w):
        y = torch.conv2d(x, w)
        for _ in range(160):
            y = y * 1.001 + 0.01
        return y
    (gm,) = cuda_graphs(f, torch.randn(1, 3, 8, 8), torch.randn(8, 3, 3, 3))
    fg = lower(gm)
    assert len(fg) >= 300 and not layout.decide(fg, "auto")
    assert layout.decide(fg, "channels_last")


def test_cpu_graphs_and_contiguous_mode_are_unchanged():
    model, inputs = small_cnn()
    (gm,) = cuda_graphs(model, *inputs)
    assert not layout.decide(lower(gm), "contiguous")
    compiled = torch.compile(model, backend="fuse")
    with torch.no_grad(), records.collect() as reps:
        compiled(*inputs)
    convs = [c for r in reps for c in layout.convolutions(r.graph)]
    assert convs and not any(cl(c.meta) for c in convs)


def test_conv_layout_option_is_validated():
    assert FuseOptions().conv_layout == "auto"                 # CUDA graphs by Inductor's rule; CPU ones as they are
    assert FuseOptions.from_dict({"conv_layout": "channels_last"}).conv_layout == "channels_last"
    with pytest.raises(OptionError, match="conv_layout"):
        FuseOptions.from_dict({"conv_layout": "nhwc"})


def _recording_convs(monkeypatch) -> list:
    """Every convolution an ATen step runs: whether its input and weight were channels-last."""
    seen, real = [], steps.direct_callable

    def direct(target):
        call, op_call = real(target)
        if target is not torch.ops.aten.convolution.default:
            return call, op_call

        def rec(*args, **kwargs):
            seen.append(all(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in args[:2]))
            return op_call(*args, **kwargs)
        return rec, rec
    monkeypatch.setattr(steps, "direct_callable", direct)
    return seen


def _check_small_cnn(device, dtype, options, monkeypatch):
    model, inputs = small_cnn(dtype)
    model, inputs = model.to(device), tuple(t.to(device) for t in inputs)
    m64 = copy.deepcopy(model).double()
    seen = _recording_convs(monkeypatch)
    compiled = torch.compile(model, backend="fuse", options=options)

    def eager(x):
        return (m64 if x.dtype == torch.float64 else model)(x)
    with torch.no_grad(), records.collect() as reps:
        compiled(*inputs)
        for seed in (1, 2):                                   # fresh random inputs
            x = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            assert_matches(eager, compiled, (x,))
            assert compiled(x).stride() == model(x).stride()
    assert seen and all(seen), seen
    # every kernel ran as planned: none met a layout it was not built for (LayoutMismatch -> ATen)
    assert reps and all(not r.fallbacks for r in reps), [r.fallbacks for r in reps]
    assert not [s for r in reps for s in r.program.steps if getattr(s, "kind", None) == "fallback"]
    assert any(cl(c.meta) for r in reps for c in layout.convolutions(r.graph))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_cnn_channels_last_on_the_cpu_matches_eager(dtype, monkeypatch):
    _check_small_cnn("cpu", dtype, {"conv_layout": "channels_last"}, monkeypatch)


def test_graph_outputs_of_channels_last_values_keep_eager_strides():
    model, x = ConvAffine(), torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, backend="fuse", options={"conv_layout": "channels_last"})
    with torch.no_grad(), records.collect() as reps:
        assert_matches(model, compiled, (x,))
        out, ref = compiled(x), model(x)
    assert [o.stride() for o in out] == [r.stride() for r in ref]
    assert any(cl(c.meta) for r in reps for c in layout.convolutions(r.graph))


def test_training_step_channels_last_on_the_cpu_matches_eager():
    model = ConvAffine(mid=80)           # wide enough for the training rule, forced here anyway
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, backend="fuse", options={"conv_layout": "channels_last"})
    with records.collect() as reps:
        out = compiled(x)
        (out[0].sum() + out[1].square().mean()).backward()
    ref = ref_model(x)
    (ref[0].sum() + ref[1].square().mean()).backward()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
        assert o.stride() == r.stride()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    assert any(cl(c.meta) for r in reps for c in layout.convolutions(r.graph))


@pytest.mark.gpu
def test_small_cnn_bf16_on_cuda_runs_its_convolutions_channels_last(monkeypatch):
    _check_small_cnn("cuda", torch.bfloat16, {"conv_layout": "auto"}, monkeypatch)


def test_the_last_block_pools_and_averages_nhwc_in_one_kernel_without_an_nchw_copy():
    """small_cnn's second block under channels-last: BN + ReLU, the pool's slices and the mean are one row
    kernel reading the convolution's NHWC output (no NCHW copy for the slices: they follow their base)."""
    model, inputs = small_cnn(torch.bfloat16)
    (gm,) = cuda_graphs(model, *inputs)
    fg = lower(gm)
    groups, _ = plan_groups(fg, 200, "auto")
    assert not [n.name for n in fg.nodes() if n.name.endswith("_nchw")]
    convs = layout.convolutions(fg)
    (last,) = [g for g in groups if any(fg.node(n).op_name.startswith("mean") for n in g.nodes)]
    ops = {fg.node(n).op_name.split(".")[0] for n in last.nodes}
    assert last.kind == "reduction" and {"relu", "slice", "maximum", "mean"} <= ops, ops
    assert fg.users(convs[1].name) and all(u in last.nodes for u in fg.users(convs[1].name))
    slices = [fg.node(n) for n in last.nodes if fg.node(n).op_name.startswith("slice")]
    assert slices and all(s.meta.stride[1] == 1 for s in slices)           # NHWC strides: channels innermost
    for g in groups:
        if g.is_kernel:
            assert emit_kernel(fg, g).target == "cuda"
