"""The rule deciding when a horizontal batch pays (passes/horizontal_cost.py): small launch-bound problems merge,
one big problem beside many tiny ones runs alone on the CPU, CUDA batches keep every problem, and `explain`
says which and why."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_cuda import capture  # noqa: E402

import fusebackend  # noqa: E402
from fusebackend.passes import batch_horizontal  # noqa: E402
from fusebackend.passes.horizontal_cost import split_batch  # noqa: E402


def chains(*xs):
    return [(x * 2.0 + 1.0).relu() for x in xs]


def _sizes(fg, groups):
    from fusebackend.passes.horizontal_cost import group_bytes
    return {g.id: group_bytes(fg, g) for g in groups if g.is_kernel}


def test_big_problem_beside_tiny_ones_runs_alone_on_cpu():
    xs = [torch.randn(1024, 1024)] + [torch.randn(4 + i, 32) for i in range(9)]
    fg, groups = capture(chains, xs)
    _, batches = batch_horizontal(fg, groups, threads=2)
    assert len(batches) == 1, [b.describe() for b in batches]
    b = batches[0]
    sizes = _sizes(fg, groups)
    big = max(sizes, key=sizes.get)
    assert big not in b.groups and len(b.groups) == 9
    assert [gid for gid, _ in b.apart] == [big] and "kept apart" in b.describe()


def test_comparable_problems_all_merge():
    xs = [torch.randn(64 * (1 + i % 3), 256) for i in range(8)]
    fg, groups = capture(chains, xs)
    _, batches = batch_horizontal(fg, groups, threads=2)
    assert len(batches) == 1 and len(batches[0].groups) == 8 and not batches[0].apart
    assert "saves 7 launches" in batches[0].describe()


def test_cuda_keeps_every_problem_and_tiny_cpu_problems_never_split():
    sizes = {0: 64 << 20, 1: 100, 2: 100}
    assert split_batch("cuda", [0, 1, 2], sizes, threads=2) == ([0, 1, 2], [])
    tiny = {0: 60000, 1: 100, 2: 100}       # below the size where a problem's own parallel loop pays
    assert split_batch("cpu", [1, 0, 2], tiny, threads=2) == ([1, 0, 2], [])
    kept, apart = split_batch("cpu", [1, 0, 2], sizes, threads=2)
    assert kept == [1, 2] and [g for g, _ in apart] == [0]


def test_a_batch_the_rule_dissolves_still_says_why():
    xs = [torch.randn(1024, 1024), torch.randn(8, 32)]
    fg, groups = capture(chains, xs)
    _, batches = batch_horizontal(fg, groups, threads=2)
    assert len(batches) == 1 and len(batches[0].groups) == 1
    assert "not merged" in batches[0].describe() and "alone" in batches[0].describe()


def test_explain_shows_batches_and_the_rule():
    xs = [torch.randn(1024, 1024)] + [torch.randn(8, 32) for _ in range(5)]
    text = str(fusebackend.explain(chains, *xs))
    assert "kernels in one launch" in text and "saves 4 launches" in text, text
    assert ("kept apart" in text) == (torch.get_num_threads() >= 2), text
