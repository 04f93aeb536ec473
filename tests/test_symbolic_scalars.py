"""Symbolic ints (SymInt graph inputs, sizes read as values) are scalar kernel arguments: a mask built from a
sequence length fuses under dynamic=True; fallback warnings name the ATen ops and the user's source line."""
import warnings

import pytest
import torch

import hf_generate as G
from fusebackend.capture import records
from fusebackend.emit import EmitError
from numerics import assert_matches


def causal_mask_mix(x, past):
    """A decode-style mask: query i (offset by the past length) may see key positions <= its own."""
    n, p = x.shape[1], past.shape[1]
    keys = torch.arange(p + n)
    queries = torch.arange(n) + p
    mask = (keys[None, :] <= queries[:, None]).float()
    return x * 2 + mask.sum(-1) / (p + n) - (n - p)


def _compiled_reports(fn, calls):
    compiled = torch.compile(fn, backend="fuse", dynamic=True)
    with records.collect() as reps, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for args in calls:
            assert_matches(fn, compiled, args)
    return reps, [str(w.message) for w in caught if str(w.message).startswith("fusebackend")]


def test_mask_from_a_symbolic_length_is_one_kernel_reading_it_as_an_argument():
    calls = [(torch.randn(2, n), torch.randn(2, p)) for n, p in ((3, 4), (5, 2), (7, 9), (2, 11), (6, 6))]
    reps, warned = _compiled_reports(causal_mask_mix, calls)
    assert warned == []
    assert not any(r.fallbacks for r in reps), [r.fallbacks for r in reps]
    specs = [s for r in reps for s in r.specs.values()]
    with_scalars = [s for s in specs if s.scalars]
    assert with_scalars, "no kernel takes a symbolic int"
    # the mask's reduction and the final pointwise both read sizes as values, each as a by-value argument
    assert sum(r.num_aten_calls for r in reps) == 0


def test_symbolic_int_compares_like_a_python_int():
    """int32 positions against a SymInt: the result type and the comparison follow eager's scalar rules."""
    def f(x, pos):
        return torch.where(pos < x.shape[0] - 1, x, -x), (pos + x.shape[0]).to(torch.int32) * 3
    calls = [(torch.randn(n, 5), torch.arange(5, dtype=torch.int32)) for n in (2, 4, 7)]
    _, warned = _compiled_reports(f, calls)
    assert warned == []


def test_fallback_warning_names_the_ops_and_the_source_line(monkeypatch):
    from fusebackend.capture import kernels

    def refuse(fg, group):
        raise EmitError("refused for the test")
    monkeypatch.setattr(kernels, "emit_kernel", refuse)

    def user_code(x):
        y = torch.exp(x) * 2          # the line the warning must name
        return y

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches(user_code, torch.compile(user_code, backend="fuse"), (torch.randn(4, 5),))
    msgs = [str(w.message) for w in caught if str(w.message).startswith("fusebackend")]
    assert len(msgs) == 1, msgs
    assert "exp" in msgs[0] and "mul" in msgs[0] and "2 ATen calls" in msgs[0], msgs[0]
    assert "test_symbolic_scalars.py:" in msgs[0] and "user_code" in msgs[0] and "torch.exp(x) * 2" in msgs[0]
    assert "arg0_1" not in msgs[0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padded_generate_fuses_its_mask_without_a_warning(name):
    """HF generate() with left padding: the mask group reads the past length; it fuses, no fallback."""
    m = G.model(name)
    ids, mask = G.prompt(seed=1, left_pad=2)
    ref, _, _ = G.generate(m, ids, mask, new_tokens=5)
    out, _, warned = G.generate(m, ids, mask, new_tokens=5, backend="fuse")
    assert warned == [], warned
    assert torch.equal(out, ref)


def test_symbolic_int_argument_in_an_emulated_cuda_kernel():
    """The CUDA emitter takes the same scalar arguments (argument struct sized for them), run on the emulator."""
    import shutil
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    import cuda_emu
    from torch._dynamo.backends.common import aot_autograd
    from fusebackend.capture import decompositions
    from fusebackend.emit.cuda import emit_cuda
    from fusebackend.graph import lower
    from fusebackend.options import FuseOptions
    from fusebackend.passes import fuse_vertical, rematerialize
    from fusebackend.runtime import build_program
    used = []

    def compiler(gm, example_inputs):
        fg = rematerialize(lower(gm))
        groups = fuse_vertical(fg)
        kernels = {}
        for g in groups:
            if g.is_kernel:
                spec = emit_cuda(fg, g)
                kernels[g.id] = (spec, cuda_emu.launcher(spec))
                used.append(spec)
        return build_program(fg, groups, kernels, FuseOptions())
    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler, decompositions=decompositions.table())
    compiled = torch.compile(causal_mask_mix, backend=backend, dynamic=True)
    with torch.no_grad():
        for n, p in ((3, 4), (5, 2), (9, 7)):
            assert_matches(causal_mask_mix, compiled, (torch.randn(2, n), torch.randn(2, p)))
    assert any(s.scalars for s in used)
