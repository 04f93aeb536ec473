"""Where a call's time goes (inspection/call_profile.py): the summary of profiler events (GPU busy as a union of
intervals, TKLQT from each kernel's launch call), the launch-/GPU-bound verdict, and the `dump --profile` and
`explain(profile=True)` reports on the CPU."""
import pytest
import torch

import fusebackend
from fusebackend.inspection import cli
from fusebackend.inspection.call_profile import CallProfile, Event, profile_call, summarize


def test_summary_of_two_calls():
    us = 1000
    events = [
        Event("launch", "cuLaunchKernel", 0, 5 * us, corr=1), Event("kernel", "k1", 10 * us, 20 * us, corr=1),
        Event("launch", "cudaLaunchKernel", 6 * us, 5 * us, corr=2), Event("kernel", "k2", 25 * us, 10 * us, corr=2),
        Event("kernel", "k3", 100 * us, 10 * us, corr=3),             # its launch was not recorded: no TKLQT
        Event("memcpy", "Memcpy HtoD", 105 * us, 10 * us),            # overlaps k3: counted once
        Event("cpu", "aten::add", 0, 50 * us, corr=1),
    ]
    kernels, busy, tklqt = summarize(events, calls=2)
    assert kernels == 1.5
    assert busy == pytest.approx((25 + 15) / 2)       # [10, 35) and [100, 115), per call
    assert tklqt == pytest.approx((10 + 19) / 2)


def test_bound_verdict():
    assert CallProfile("fuse", wall_us=100, host_us=90, gpu_busy_us=95).bound == "GPU-bound"
    assert CallProfile("fuse", wall_us=100, host_us=90, gpu_busy_us=30).bound == "launch-bound"
    assert CallProfile("fuse", wall_us=100, host_us=90).bound == "host (CPU)"
    assert CallProfile("inductor", float("nan"), float("nan"), note="no compiler").bound == "-"


def test_profile_call_on_the_cpu_counts_every_call():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2
    p = profile_call(f, (torch.randn(8),), "eager", reps=5, warmup=2)
    assert len(calls) == 7 and p.wall_us > 0 and 0 < p.host_us and p.gpu_busy_us is None


def test_dump_profile_prints_the_three_backends(capsys):
    assert cli.main(["dump", "mlp", "--profile", "--profile-reps", "3", "-q"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "inductor", "fuse"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), out
    assert "TKLQT" in out and "host (CPU)" in out


def test_dump_profile_refuses_a_training_run(capsys):
    assert cli.main(["dump", "mlp", "--profile", "--train"]) == 2
    assert "--profile times inference calls" in capsys.readouterr().err


def test_explain_with_profile():
    def f(x, y):
        return torch.relu(x * y + 1.0).sum(-1)
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    rep = fusebackend.explain(f, x, y, profile=True)
    assert [p.backend for p in rep.profiles] == ["eager", "inductor", "fuse"]
    assert all(p.note or p.wall_us > 0 for p in rep.profiles)
    assert "limited by" in str(rep)
