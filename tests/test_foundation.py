"""The foundation's promises: the anchor patterns each become one kernel and match eager."""
import pytest
import torch
import torch.nn.functional as F

import fusebackend
from numerics import assert_matches


def pw_chain(x, y):
    return F.gelu(x * 1.5 + y) * torch.sigmoid(x) - torch.tanh(y) * 0.5


def masked_softmax(x, mask):
    return torch.softmax(x * 0.125 + mask, dim=-1)


def add_ln_gelu(x, r, w, b):
    return F.gelu(F.layer_norm(x + r, (x.shape[-1],), w, b))


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


CASES = {
    "pw_chain": (pw_chain, lambda dt: (r(4099, dtype=dt), r(4099, dtype=dt))),
    "masked_softmax": (masked_softmax, lambda dt: (r(33, 517, dtype=dt), r(33, 517, dtype=dt))),
    "add_ln_gelu": (add_ln_gelu, lambda dt: (r(33, 256, dtype=dt), r(33, 256, dtype=dt), r(256, dtype=dt),
                                             r(256, dtype=dt))),
    "rmsnorm": (rmsnorm, lambda dt: (r(33, 256, dtype=dt), r(256, dtype=dt))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_anchor_pattern_is_one_kernel_and_matches(case, dtype):
    fn, make = CASES[case]
    args = make(dtype)
    rep = fusebackend.explain(fn, *args)
    assert rep.num_kernels == 1, str(rep)
    assert rep.num_aten_calls == 0, str(rep)
    assert not rep.fallbacks, rep.fallbacks
    compiled = torch.compile(fn, backend="fuse")
    for _ in range(2):                                  # fresh random inputs each time
        assert_matches(fn, compiled, make(dtype))


def test_noncontiguous_and_broadcast_inputs():
    def f(x, y, z):
        return torch.sigmoid(x) * y + z
    compiled = torch.compile(f, backend="fuse")
    x = r(64, 48).t()                                  # transposed: [48, 64]
    y = r(96, 64)[::2]                                 # every other row: [48, 64], strided
    z = r(48, 1)                                       # broadcast along the last dim
    assert_matches(f, compiled, (x, y, z))
    assert_matches(f, compiled, (r(64, 48).t(), r(96, 64)[::2], r(48, 1)))
    rep = fusebackend.explain(f, r(64, 48).t(), r(48, 64), r(48, 1))
    assert rep.num_kernels == 1


def test_softmax_of_transposed_input_and_row_broadcast_mask():
    compiled = torch.compile(masked_softmax, backend="fuse")
    x = r(300, 40).t()
    assert_matches(masked_softmax, compiled, (x, r(1, 300)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_with_noncontiguous_residual(dtype):
    compiled = torch.compile(add_ln_gelu, backend="fuse")
    x = r(40, 128, dtype=dtype)
    res = r(128, 40, dtype=dtype).t()
    assert_matches(add_ln_gelu, compiled, (x, res, r(128, dtype=dtype), r(128, dtype=dtype)))


def test_new_batch_size_reuses_the_kernel_binary():
    from fusebackend.runtime import cpu_compiler
    compiled = torch.compile(rmsnorm, backend="fuse", dynamic=False)
    compiled(r(8, 64), r(64))
    before = len(cpu_compiler._loaded)
    assert_matches(rmsnorm, compiled, (r(24, 64), r(64)))     # Dynamo recompiles the graph ...
    assert len(cpu_compiler._loaded) == before                # ... but the kernel text is the same


class MLP(torch.nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.fc1, self.ln1 = torch.nn.Linear(d, h), torch.nn.LayerNorm(h)
        self.fc2, self.ln2 = torch.nn.Linear(h, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        x = F.gelu(self.ln1(self.fc1(x)))
        return self.ln2(self.fc2(x))


def test_training_step_matches_eager_gradients():
    torch.manual_seed(0)
    model = MLP()
    ref_model = MLP()
    ref_model.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="fuse")
    x, target = r(32, 64), r(32, 64)
    loss = F.mse_loss(compiled(x), target)
    loss.backward()
    ref_loss = F.mse_loss(ref_model(x), target)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: name + ": " + m)


def test_opaque_ops_run_as_aten_calls():
    def f(x, w):
        return torch.relu(x @ w + 1.0).sum(-1)
    rep = fusebackend.explain(f, r(16, 32), r(32, 8))
    assert rep.num_aten_calls >= 1 and rep.num_kernels == 1, str(rep)
    assert_matches(f, torch.compile(f, backend="fuse"), (r(16, 32), r(32, 8)))


def test_explain_report_is_readable():
    rep = fusebackend.explain(pw_chain, r(100), r(100))
    text = str(rep)
    assert "1 fused kernel" in text and "gelu" in text
    assert rep.groups[0]["kind"] == "pointwise" and rep.sources and "fb::Gelu" in rep.sources[0]


def test_horizontal_batch_is_one_launch():
    def horizontal(*xs):
        return [(x * 2.0 + 1.0).relu() for x in xs]
    xs = tuple(r(8 + 4 * (i % 5), 32) for i in range(20))
    rep = fusebackend.explain(horizontal, *xs)
    assert rep.num_kernels == 1, str(rep)
    assert rep.graph_reports[0].batches and len(rep.graph_reports[0].batches[0].groups) == 20
    compiled = torch.compile(horizontal, backend="fuse")
    for _ in range(2):
        xs = tuple(r(8 + 4 * (i % 5), 32) for i in range(20))
        assert_matches(horizontal, compiled, xs)
