"""clip_grad_norm_ captured with the optimizer step (issue "Horizontal fusion II"): the total norm (one
_foreach_norm and one vector norm, ATen calls), the clip coefficient, and each gradient's scaling written back
into the gradient in place (passes/inplace.py) by the kernel that also updates its parameter and state.

`opt.step()` starts with a graph break of torch's own (optimizer.py's _use_grad: AOT must see the step as an
inference graph), so `clip_grad_norm_(...); opt.step()` compiles as two graphs; the functional step
(torch.optim.adam.adam) under no_grad is one graph with the clipping, and there the scaling fuses into the
update.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.optim.adam import adam

import fusebackend

from test_inplace_mutations import DEVICES, _close, aten_calls, random_params

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def _state(opt, ps):
    out = [p.detach() for p in ps] + [p.grad for p in ps]
    for p in ps:
        st = opt.state[p]
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_clip_then_step_matches_eager(foreach, device):
    ps, ref_ps = random_params(20, device, seed=3), random_params(20, device, seed=3)
    for p, r in zip(ps, ref_ps):          # large gradients: the clip coefficient is well below 1
        p.grad.mul_(10)
        r.grad.mul_(10)
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=foreach)
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, weight_decay=0.01, foreach=foreach)

    def step(params, o):
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
        o.step()
        return norm
    compiled = torch.compile(lambda: step(ps, opt), backend="fuse")
    for _ in range(3):
        n_ref = step(ref_ps, ref)
        n = compiled()
        _close(n, n_ref)
    _close(_state(opt, ps), _state(ref, ref_ps), same_device=False)


def _functional_step(ps, ms, vs, steps, capturable=True):
    torch.nn.utils.clip_grad_norm_(ps, 1.0)
    adam(ps, [p.grad for p in ps], ms, vs, [], steps, foreach=True, capturable=capturable,
         decoupled_weight_decay=True, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.01,
         eps=1e-8, maximize=False)


def _functional_state(n, device, seed=4):
    ps = random_params(n, device, seed=seed)
    for p in ps:
        p.grad.mul_(10)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=device) for _ in ps]
    return ps, ms, vs, steps


@pytest.mark.parametrize("device", DEVICES)
def test_clip_and_step_in_one_graph_fuse(device):
    n = 16
    mine, ref = _functional_state(n, device), _functional_state(n, device)
    compiled = torch.compile(_functional_step, backend="fuse")
    with torch.no_grad():
        for _ in range(3):
            compiled(*mine)
            _functional_step(*ref, capturable=device != "cpu")     # eager takes capturable only on a GPU
        want = ref[0] + [p.grad for p in ref[0]] + ref[1] + ref[2] + ref[3]
        got = mine[0] + [p.grad for p in mine[0]] + mine[1] + mine[2] + mine[3]
        _close(got, want)
        rep = fusebackend.explain(_functional_step, *_functional_state(n, device))
    assert rep.num_graphs == 1, str(rep)
    groups = [g for r in rep.graph_reports for g in r.groups]
    # every tensor of more than one element: one kernel scales its gradient, updates its moments and itself,
    # and writes all four back in place
    updates = [g for g in groups if g.kind == "pointwise" and len(g.stores) == 4]
    assert len(updates) == sum(1 for p in mine[0] if p.numel() > 1), str(rep)
    opaque = sorted(r.graph.node(g.nodes[0]).op_name.split(".")[0] for r in rep.graph_reports
                    for g in r.groups if g.kind == "opaque")
    assert opaque == ["_foreach_norm", "linalg_vector_norm"], opaque      # the norms; no copy_


def test_clip_and_step_dispatch_only_the_norms():
    mine = _functional_state(12, "cpu")
    compiled = torch.compile(_functional_step, backend="fuse")
    with torch.no_grad():
        compiled(*mine)
        compiled(*mine)
        calls = aten_calls(lambda: compiled(*mine))
    assert calls["aten::copy_"] == 0, calls
    assert calls["aten::_foreach_norm"] == 1 and calls["aten::linalg_vector_norm"] == 1, calls
