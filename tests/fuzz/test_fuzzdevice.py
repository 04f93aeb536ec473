"""The fuzzer's device choice (fuzzdevice.py), its float64 tie-break, and bench/fuzz_gpu.py as a CPU smoke run."""
import os
import subprocess
import sys

import pytest
import torch

import fuzzcheck
from fuzzdevice import to_device
from graphgen import Case, InputSpec  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("make", [
    lambda b: b.permute(2, 0, 1), lambda b: b[:, 1::2], lambda b: b[..., 2:4], lambda b: b[:, :1].expand(3, 5, 6)])
def test_moving_an_input_keeps_its_layout(make):
    t = make(torch.randn(3, 5, 6))
    moved = to_device(t, "meta")
    assert moved.device.type == "meta"
    assert (moved.shape, moved.stride(), moved.storage_offset()) == (t.shape, t.stride(), t.storage_offset())


def _case():
    return Case.from_source(inputs=[InputSpec((16, 8), torch.float32)], seed=1, half_path=[], reassoc=[],
                            source="def f(a0):\n    v1 = a0 * 100.0\n    return (v1,)")


def test_a_difference_within_float32_rounding_of_the_output_is_settled_by_the_float64_tie_break():
    """An element near 0 off by 1e-5 (what an fma against a rounded product gives after cancellation): beyond
    rtol 1e-5 of that element, within float32 rounding of the output's scale (~100), which the GPU run allows."""
    case = _case()
    x = case.make_inputs()
    eager = case.function()(*x)[0]
    near = eager.abs().argmin()
    off = eager.clone()
    off.view(-1)[near] += 1e-5
    with pytest.raises(AssertionError):
        fuzzcheck.compare(case, case.function(), x, [off], [eager])
    fuzzcheck.compare(case, case.function(), x, [off], [eager], tie_break=True)
    with pytest.raises(AssertionError):                                 # far off: the tie-break says so too
        fuzzcheck.compare(case, case.function(), x, [eager * 1.001], [eager], tie_break=True)


def test_fuzz_gpu_script_runs_on_the_cpu(tmp_path):
    log = tmp_path / "fuzz.log"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fuzz_gpu.py"), "--device", "cpu",
                          "--seconds", "60", "--max-examples", "3", "--seed", "5", "--log", str(log)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert '"mismatches": 0' in res.stdout and '"graphs": ' in res.stdout
