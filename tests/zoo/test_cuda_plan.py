"""CUDA kernel budgets checked without a GPU: bench/plan_cuda.py traces each zoo model on fake CUDA tensors
and runs fuse's passes and CUDA emitter on it (nothing compiled). Budgets are `cuda_kernels` and
`cuda_aten_calls` in budgets.json (small size, bfloat16, inference). HF models are left out: their graphs
follow the installed transformers version. At 050dc34 the planner reproduced the H100's counts for hf_gpt2,
hf_llama and hf_bert exactly."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from fusebackend.capture import fake_cuda  # noqa: E402
import models  # noqa: E402
import plan_cuda  # noqa: E402
from fusebackend.options import FuseOptions  # noqa: E402

BUDGETS = {k: v for k, v in json.loads((ROOT / "tests/zoo/budgets.json").read_text()).items()
           if isinstance(v, dict) and "cuda_kernels" in v}


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_cuda_launches_within_budget(name):
    entry = models.get(name)
    model, inputs = entry.make(size="small", device="cpu", dtype=torch.bfloat16, seed=0)
    with torch._dynamo.config.patch(**entry.dynamo_config):
        plans = plan_cuda.plan_model(model, inputs, FuseOptions())
    got = {"cuda_kernels": sum(p["kernels"] for p in plans), "cuda_aten_calls": sum(p["aten_calls"] for p in plans)}
    assert plans and not any(p["failed"] for p in plans), [p["failed"] for p in plans]
    over = {k: (got[k], BUDGETS[name][k]) for k in got if got[k] > BUDGETS[name][k]}
    assert not over, "%s: over its CUDA budget (predicted, budget): %s\n%s" % (
        name, over, "\n".join(g for p in plans for g in p["groups"]))


@pytest.mark.parametrize("idx", [
    (slice(None), slice(None, 1)), 0, (Ellipsis, 1), (None, slice(1, 3), Ellipsis, None), (slice(None), "i"), "i",
    (slice(None), slice(None), "i"), (Ellipsis, slice(None, None, 2)), (-1, slice(2, None)), ("i", "j"),
])
def test_fake_cuda_getitem_is_python_indexing(idx):
    """The aten spelling of t[idx] the planner traces gives what Python's indexing gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g)
    sub = {"i": torch.tensor([0, 3, 2]), "j": torch.tensor([[1], [4]])}
    idx = tuple(sub.get(i, i) if isinstance(i, str) else i for i in idx) if isinstance(idx, tuple) else sub.get(idx, idx)
    assert torch.equal(fake_cuda.aten_getitem(x, idx), x[idx])
