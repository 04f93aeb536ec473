"""Every zoo model, compiled with the backend under test, against eager PyTorch.

    python3 -m pytest -q tests/zoo                                   # backend "fuse"
    FUSEBACKEND_ZOO_BACKEND=aot_eager python3 -m pytest -q tests/zoo # check the tests with another backend
    python3 -m pytest -q -m gpu tests/zoo                            # the CUDA variants (skip without a GPU)

Small sizes only; `models.ZOO[...]` at size="bench" is for the benchmark scripts.
"""
from __future__ import annotations

import copy
import json
import pathlib
import sys
import warnings

import pytest
import torch

try:
    import models
except ImportError:  # not pip-installed: the zoo lives at the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    import models

from .util import (
    F32_RTOL,
    assert_low_precision_close,
    assert_rel_close,
    assert_train_step_close,
    backend_name,
    float64_reference,
    float64_train_step,
    require_backend,
    train_step,
)

BUDGETS_PATH = pathlib.Path(__file__).with_name("budgets.json")
NAMES = list(models.ZOO)
TRAINABLE = [n for n, e in models.ZOO.items() if e.trainable]

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _no_cuda])]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Each test compiles from scratch: no graph or guard of an earlier test may serve it.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def exact_float32():
    # TF32 would make float32 matmuls/convolutions on the GPU differ from eager by ~1e-3: keep it off.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def backend():
    name = backend_name()
    require_backend(name)
    return name


def _make(name, device, dtype, seed=0):
    entry = models.get(name)
    try:
        return entry, entry.make(size="small", device=device, dtype=dtype, seed=seed)
    except ImportError as e:  # hf_* entries with a transformers that cannot be imported
        pytest.skip(f"{name}: {e}")


def _compile(model, backend):
    return torch.compile(model, backend=backend)


def _dynamo_config(entry):
    return torch._dynamo.config.patch(**entry.dynamo_config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_eager(name, device, dtype, backend):
    if name.startswith("hf_") and device == "cpu" and dtype != torch.float32:
        pytest.skip("hf_* models run bf16 on CUDA only: their Dynamo compile alone costs seconds on a CPU")
    entry, (model, _) = _make(name, device, dtype)
    compiled = _compile(model, backend)
    # Two calls on fresh inputs: the second runs the cached compiled code, which must not have baked in
    # anything of the first call's inputs.
    for seed in (1, 2):
        inputs = entry.make_inputs(size="small", device=device, dtype=dtype, seed=seed)
        with torch.no_grad(), _dynamo_config(entry):
            expected = model(*inputs)
            actual = compiled(*inputs)
        what = f"{name} output (inputs seed {seed})"
        if dtype == torch.float32:
            assert_rel_close(actual, expected, F32_RTOL, what)
        else:
            assert_low_precision_close(actual, expected, float64_reference(model, inputs), what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step_matches_eager(name, device, backend):
    entry, (model, _) = _make(name, device, torch.float32)
    eager_model = copy.deepcopy(model).train()
    compiled_model = copy.deepcopy(model).train()  # its own copy: training mutates buffers (BatchNorm)
    inputs = entry.make_inputs(size="small", device=device, seed=1)
    with torch.no_grad():
        out_shape = model(*inputs).shape  # eval mode: no buffer updates
    out_weight = torch.randn(out_shape, generator=torch.Generator().manual_seed(3)).to(device)

    expected = train_step(eager_model, inputs, out_weight)
    with _dynamo_config(entry):
        actual = train_step(compiled_model, inputs, out_weight, run=_compile(compiled_model, backend))
    assert_train_step_close(actual, expected, F32_RTOL, reference=lambda: float64_train_step(model, inputs, out_weight))


def _budgets() -> dict:
    data = json.loads(BUDGETS_PATH.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" and the like


@pytest.mark.parametrize("name", NAMES)
def test_kernel_budget(name):
    budget = _budgets().get(name)
    if budget is None:
        pytest.skip(f"{name}: no kernel budget in {BUDGETS_PATH.name} yet; measure with "
                    f"fusebackend.explain(model, *inputs) and add {{\"kernels\": N, \"aten_calls\": M}}")
    fusebackend = pytest.importorskip("fusebackend")
    entry, (model, inputs) = _make(name, "cpu", torch.float32)
    with torch.no_grad(), _dynamo_config(entry):  # budgets count the inference program
        report = fusebackend.explain(model, *inputs)
    measured = {"kernels": report.num_kernels, "aten_calls": report.num_aten_calls}
    over = {k: (measured[k], budget[k]) for k in measured if k in budget and measured[k] > budget[k]}
    assert not over, f"{name}: over budget (measured, budget): {over}"
    under = {k: (measured[k], budget[k]) for k in measured if k in budget and measured[k] < budget[k]}
    if under:
        warnings.warn(f"{name}: under budget (measured, budget) {under}; lower its entry in {BUDGETS_PATH.name} "
                      f"to {measured}", stacklevel=1)
