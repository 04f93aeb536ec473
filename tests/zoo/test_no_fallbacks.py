"""Every group of the non-HF zoo models compiles, forward and backward: no group falls back to ATen.
(The MoE model's backward expanded to a data-dependent size inside a row kernel; the size was taken for an
operand and the group fell back, and the row planner could crash on it.)"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import models  # noqa: E402
from fusebackend.capture import records as report  # noqa: E402

NAMES = [n for n, e in models.ZOO.items() if e.trainable and not n.startswith("hf_")]


@pytest.mark.parametrize("name", NAMES)
def test_train_step_compiles_every_group(name):
    entry = models.get(name)
    model, inputs = entry.make(size="small", device="cpu", dtype=torch.float32, seed=0)
    model.train()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**entry.dynamo_config), report.collect() as reps:
        out = torch.compile(model, backend="fuse")(*inputs)
        out.float().square().mean().backward()
    assert reps and any(r.kind == "backward" for r in reps), [r.kind for r in reps]
    assert not [f for r in reps for f in r.fallbacks], [(r.kind, r.fallbacks) for r in reps if r.fallbacks]
